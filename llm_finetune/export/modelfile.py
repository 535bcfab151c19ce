"""An Ollama ``Modelfile`` beside each GGUF, so ``ollama create NAME -f Modelfile`` is one command.

Ollama's templates are Go templates, not Jinja, so the model's chat template cannot be copied:
the chat format is recognised from the markers the Jinja template emits (ChatML as in Qwen2 and
SmolLM2, Llama 3 headers, Mistral [INST]) and written as the equivalent Go template, with the
format's turn markers and the tokenizer's EOS as stop tokens. An unrecognised template gets no
TEMPLATE line (Ollama then uses the chat template stored in the GGUF) and the EOS as stop.
BOS is not in the templates: llama.cpp adds it from the GGUF's add_bos_token.

Chat templates that add a system turn when the conversation has none (Qwen2.5's "You are Qwen,
created by Alibaba Cloud...", Llama 3.1's knowledge-date preamble) trained the model on prompts
that begin with it. The Go templates render only the messages they get, so that default goes
into the Modelfile as ``SYSTEM``: Ollama prepends it to a conversation without a system
message, and the served prompt is the trained one (``default_system_prompt``).
"""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = {
    "chatml": (
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ["<|im_start|>", "<|im_end|>"],
    ),
    "llama3": (
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    ),
    "mistral": (
        "[INST]",
        '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}',
        ["[INST]", "[/INST]"],
    ),
}


# Where a format's system turn starts and ends, as its Go template above renders a message
SYSTEM_TURNS = {"chatml": ("<|im_start|>system\n", "<|im_end|>"),
                "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}


def default_system_prompt(tokenizer, fmt: str | None) -> str | None:
    """The system text the chat template inserts when a conversation has no system message; None if it inserts none."""
    if fmt not in SYSTEM_TURNS:
        return None
    head, end = SYSTEM_TURNS[fmt]
    marker = "\x00user question\x00"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render a lone user turn inserts nothing we can copy
        return None
    user_at, start = text.find(marker), text.find(head)
    if start < 0 or start > user_at:
        return None
    stop = text.find(end, start + len(head))
    return text[start + len(head):stop] if 0 <= stop < user_at else None


def chat_format(chat_template: str) -> str | None:
    return next((name for name, (marker, _, _) in FORMATS.items() if marker in (chat_template or "")), None)


def modelfile(gguf_file: str, chat_template: str, eos_token: str | None, system: str | None = None) -> str:
    """Modelfile text for ``gguf_file`` (a path relative to the Modelfile); ``system``: the default system turn."""
    fmt = chat_format(chat_template)
    lines = [f"FROM ./{gguf_file}", ""]
    stops = []
    if fmt:
        _, template, stops = FORMATS[fmt]
        lines += [f'TEMPLATE """{template}"""', ""]
        if system and '"""' not in system:
            lines += [f'SYSTEM """{system}"""', ""]
    for stop in dict.fromkeys([*stops, *([eos_token] if eos_token else [])]):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def write_modelfile(model_dir: str | Path, gguf_path: str | Path) -> Path:
    """Write ``Modelfile`` beside ``gguf_path`` from the tokenizer files in ``model_dir``."""
    from llm_finetune.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    out = Path(gguf_path).parent / "Modelfile"
    system = default_system_prompt(tok, chat_format(template))
    out.write_text(modelfile(Path(gguf_path).name, template, tok.eos_token, system))
    return out
