"""GGUF exports run in llama.cpp (llama-cpp-python) the way the HF model runs in transformers.

For a tiny random model of each family users tune, with its real tokenizer and chat template
(tests/tiny_families.py), export f16 and q8_0 through the production path (``quantize_variant``:
llama.cpp's converter), load the file in llama.cpp and compare with the HF model: token ids
(pre-tokenizer, BOS rule, special tokens; also against llama.cpp's own tokenization cases for the
vocabulary), top-1 logits at every position, and greedy continuations. A wrong Q/K permutation, a
dropped bias, a missing rope factor, a wrong head_dim or tied/untied mix-up changes the
logits far beyond f16 / q8_0 rounding.
"""

import json

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="install the gguf-check extra: pip install -c constraints.txt '.[gguf-check]'")

from tests.tiny_families import FAMILIES as FAMILIES_SPEC, vocab_cases  # noqa: E402

pytestmark = pytest.mark.slow  # every test here trains a model or starts a process (tests/tiers.py)

FAMILIES = list(FAMILIES_SPEC)
SPM = {"phi3", "mistral", "gemma2", "gemma3"}  # SentencePiece vocabularies: tokenizer.model is the reference
TEXTS = [
    "Rewrite 5 March 2021 in ISO 8601: 2021-03-05.",
    "I've been told he's there, you're sure?\n\n  def add(a, b):\n\treturn a + b  # 12345",
    "Le café coûte 3,50 € — 東京 2020 🚀",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_families import save_family

    out = save_family(request.param, tmp_path_factory.mktemp(request.param), smollm_tokenizer=tokenizer)
    return request.param, out, AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(out)


def _llama(path):
    from llm_finetune.export.gguf_runtime import load_gguf

    return load_gguf(path, n_ctx=256, n_threads=2)


def _reference_ids(name, model_dir, tok, text: str) -> list[int]:
    """What the model's own tokenizer gives: for SentencePiece models that is tokenizer.model (transformers'
    conversion of a SentencePiece model splits whitespace runs differently), else tokenizer.json."""
    if name not in SPM:
        return tok(text)["input_ids"]
    import sentencepiece as spm

    return [tok.bos_token_id] + spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model")).encode(text)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_runs_in_llama_cpp_like_the_hf_model(family, gguf_type, tmp_path):
    from llm_finetune.export.quantize import quantize_variant

    name, model_dir, model, tok = family
    q = quantize_variant(model_dir, tmp_path, f"gguf_{gguf_type}", name=name)
    llm = _llama(q.path / q.gguf_file)

    # tokenization: pre-tokenizer regex, BOS rule (Llama 3 / Mistral add it, Qwen2 / SmolLM2 do not), special tokens
    chat = tok.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False, add_generation_prompt=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == _reference_ids(name, model_dir, tok, text), (name, text)
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    # the chat prompt with its special tokens parsed (SentencePiece: tokenizer.model after the leading <s>, where
    # the template's markers are plain text). Phi-3's markers are added tokens that only its published
    # tokenizer.json describes (whitespace stripped after them, no dummy prefix?), which we do not have: only
    # the markers themselves are compared; plain text is checked against llama.cpp's own cases below.
    vocab = FAMILIES_SPEC[name][0]
    # llama.cpp's own cases for the published vocabulary (made with the published HF tokenizer); not for the
    # Gemma stand-ins, Llama 2's vocabulary without the dummy prefix (as Gemma's tokenizer has none)
    if vocab and not name.startswith("gemma"):
        cases = vocab_cases(vocab)
        assert len(cases) > 30
        for text, ids in cases:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, (name, text)
    got_chat = llm.tokenize(chat.encode(), add_bos=False, special=True)
    if name == "phi3":
        markers = set(tok.convert_tokens_to_ids(["<|user|>", "<|end|>", "<|assistant|>"]))
        assert [t for t in got_chat if t in markers] == [t for t in chat_ids if t in markers]
    else:
        expected = chat_ids if name not in SPM else _reference_ids(name, model_dir, tok, chat.removeprefix(tok.bos_token))
        assert got_chat == expected
    assert llm.token_eos() == tok.eos_token_id
    if tok.bos_token_id is not None:
        assert llm.token_bos() == tok.bos_token_id

    # logits at every position of a prompt, then greedy decoding
    ids = tok(TEXTS[1])["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = _llama_logits(llm, ids)
    assert got.shape == ref.shape
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    err = np.abs(got - ref).max() / np.abs(ref).max()
    # f16 rounding only; q8_0 flips a few near-ties of these random models. A wrong tensor map,
    # permutation, bias, head_dim or rope factor gives top-1 agreement near 1/vocab and errors near 1.
    assert top1 >= (1.0 if gguf_type == "f16" else 0.8), (name, top1, err)
    assert err < (0.02 if gguf_type == "f16" else 0.15), (name, err)

    with torch.no_grad():
        hf = model.generate(torch.tensor([chat_ids]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                            pad_token_id=tok.pad_token_id or 0)[0, len(chat_ids):].tolist()
    n = 8 if gguf_type == "f16" else 1  # q8_0 flips near-ties of these random models, then continuations diverge
    assert _llama_greedy(llm, chat_ids, 8)[:n] == hf[:n], name


def test_modelfile_beside_the_gguf_names_it_and_stops_on_single_special_tokens(family, tmp_path):
    """The Ollama Modelfile: FROM the file, the family's chat format, stop strings that are one token each."""
    from llm_finetune.export.modelfile import chat_format
    from llm_finetune.export.quantize import quantize_variant

    name, model_dir, _, tok = family
    q = quantize_variant(model_dir, tmp_path, "gguf_q8_0", name=name)
    text = (q.path / "Modelfile").read_text()
    assert text.startswith(f"FROM ./{q.gguf_file}\n")
    fmt = {"llama3": "llama3", "qwen2": "chatml", "qwen3": "chatml", "smollm2": "chatml", "mistral": "mistral"}.get(name)
    assert chat_format(tok.chat_template) == fmt
    # a format we do not translate gets no TEMPLATE: Ollama then serves the chat template stored in the GGUF
    assert ('TEMPLATE """' in text) == (fmt is not None)
    stops = [json.loads(line.split(" ", 2)[2]) for line in text.splitlines() if line.startswith("PARAMETER stop ")]
    assert tok.eos_token in stops
    llm = _llama(q.path / q.gguf_file)
    if fmt is None:
        assert llm.metadata.get("tokenizer.chat_template") == tok.chat_template
    for stop in stops:
        if fmt != "mistral" or stop == tok.eos_token:  # [INST] is plain text in Mistral v0.1-v0.2 vocabularies
            assert len(llm.tokenize(stop.encode(), add_bos=False, special=True)) == 1, stop


def test_gguf_variants_are_scored_in_llama_cpp_like_the_hf_model(tokenizer, tmp_path, monkeypatch):
    """evaluate(gguf_file=...) runs the file in llama.cpp (transformers' GGUF loader is made to fail) and agrees with HF."""
    import transformers

    from llm_finetune.config import DataConfig, EvalConfig
    from llm_finetune.data.prepare import prepare
    from llm_finetune.evaluation.evaluate import evaluate
    from llm_finetune.export.quantize import quantize_variant
    from tests.tiny_families import save_family

    model_dir = save_family("smollm2", tmp_path / "m", smollm_tokenizer=tokenizer)
    data, cfg = DataConfig(), EvalConfig(max_samples=3, max_new_tokens=6, batch_size=3)
    frame = prepare(data, tokenizer).test
    ref, ref_table = evaluate(model_dir, frame, data, cfg)
    q = quantize_variant(model_dir, tmp_path / "q", "gguf_f16", name="m")

    def no_dequantizing(*args, gguf_file=None, **kwargs):
        raise AssertionError("the GGUF variant was de-quantized by transformers instead of run in llama.cpp")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_dequantizing)
    got, table = evaluate(q.path, frame, data, cfg, gguf_file=q.gguf_file)
    assert got.rows == ref.rows and list(table["prompt"]) == list(ref_table["prompt"])
    assert abs(got.loss - ref.loss) < 0.01 * ref.loss, (got.loss, ref.loss)  # f16 rounding only
    assert list(table["prediction"]) == list(ref_table["prediction"])


def test_llama_cpp_threads_follow_the_container_cpu_limit(tokenizer, tmp_path, monkeypatch):
    """The evaluation pod's llama.cpp runs one thread per CPU of its limit (llama-cpp-python's own
    default is half of os.cpu_count(): dozens of threads in a 2-CPU pod on a large node)."""
    import os

    from llm_finetune.export.gguf_runtime import load_gguf
    from llm_finetune.export.quantize import quantize_variant
    from tests.tiny_families import save_family

    q = quantize_variant(save_family("smollm2", tmp_path / "m", smollm_tokenizer=tokenizer), tmp_path / "q", "gguf_q8_0", name="m")
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    monkeypatch.setattr("llm_finetune.cpus.CGROUP", cgroup)
    for cpu_max, want in (("100000 100000", 1), ("max 100000", len(os.sched_getaffinity(0)))):
        (cgroup / "cpu.max").write_text(cpu_max + "\n")
        llm = load_gguf(q.path / q.gguf_file, n_ctx=64)
        assert (llm.context_params.n_threads, llm.context_params.n_threads_batch) == (want, want), cpu_max
        llm.close()


@pytest.mark.parametrize("variant,kind", [("gguf_q4_k_m", "Q4_K"), ("gguf_q5_k_m", "Q5_K")])
def test_k_quants_are_llama_cpps_own_and_run_there_close_to_the_hf_model(variant, kind, tokenizer, tmp_path):
    """Q4_K_M / Q5_K_M, what Ollama users pull: our f16 export through llama.cpp's quantizer. A tiny Llama whose
    rows are multiples of 256 (k-quant blocks), so the k-quant types are really used, not a fallback."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from llm_finetune.export.quantize import quantize_variant
    from tests.tiny import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "m", tokenizer, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512)
    q = quantize_variant(model_dir, tmp_path / variant, variant, name="m")
    assert q.gguf_file == f"m-{variant.removeprefix('gguf_')}.gguf"
    assert not list(q.path.glob("*.tmp.gguf"))  # the intermediate f16 is gone
    assert (q.path / "Modelfile").read_text().startswith(f"FROM ./{q.gguf_file}")
    types = {t.tensor_type.name for t in GGUFReader(q.path / q.gguf_file).tensors}
    assert kind in types, types
    f16 = quantize_variant(model_dir, tmp_path / "f16", "gguf_f16", name="m")
    assert q.size_mb < 0.45 * f16.size_mb, (q.size_mb, f16.size_mb)  # 4.5-5.5 bits a weight against 16

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(TEXTS[1])["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = _llama_logits(_llama(q.path / q.gguf_file), ids)
    # 4-5 bit weights of a random model: logits stay highly correlated (a wrong tensor map gives ~0)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.95


def test_gguf_scoring_stops_on_the_models_whole_stop_list(tokenizer, tmp_path):
    """llama.cpp generation in evaluation stops where HF generation does. A Llama 3 base model tuned with the
    instruct chat template: EOS is <|end_of_text|>, but a chat turn ends with <|eot_id|>; stopping at EOS
    only (as before) would run every answer on to the budget."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.evaluation import gguf_eval
    from llm_finetune.evaluation.generation import stop_token_ids
    from llm_finetune.export.quantize import quantize_variant
    from tests.tiny_families import save_family

    model_dir = save_family("llama3", tmp_path / "instruct", smollm_tokenizer=tokenizer)
    base_style = tmp_path / "base-style"
    shutil.copytree(model_dir, base_style)
    tok = AutoTokenizer.from_pretrained(base_style)
    tok.eos_token = "<|end_of_text|>"
    tok.save_pretrained(base_style)
    model = AutoModelForCausalLM.from_pretrained(base_style)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(base_style)
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id
    assert eot != eos

    q = quantize_variant(base_style, tmp_path / "q", "gguf_q8_0", name="llama3")
    got = gguf_eval.stop_ids(_llama(q.path / q.gguf_file), AutoTokenizer.from_pretrained(base_style))
    assert set(stop_token_ids(tok, model.generation_config)) <= got
    assert {eot, eos} <= got
