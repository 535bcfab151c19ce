"""Greedy answers read off the loss pass (llm_finetune/evaluation/draft_answers.py) equal plain greedy generation.

Evaluation skips generating a row when the loss pass shows the model reproducing the
reference and then stopping. The answers must be the ones plain generation gives: checked
against transformers' ``generate`` (one prompt at a time, no padding) and llama.cpp's
token-by-token loop, on the embedded model, with half the references set to the model's own
answers (verified in the pass) and half to answers it does not give (generated).
"""

import json

import pytest
import torch

from llm_finetune.evaluation.draft_answers import drafted_answers, read_greedy

STOP = 9


def test_read_greedy_follows_the_draft_to_a_stop():
    ids = [1, 2, 3, 4, 5, STOP]  # prompt [1, 2, 3], answer [4, 5], stop
    assert read_greedy([0, 0, 4, 5, STOP, 0], ids, 3, {STOP}, 32) == [4, 5]
    assert read_greedy([0, 0, STOP, 0, 0, 0], ids, 3, {STOP}, 32) == []  # stops at once
    assert read_greedy([0, 0, 4, 7, STOP, 0], ids, 3, {STOP}, 32) is None  # leaves the draft: generate
    assert read_greedy([0, 0, 4, 5, 6, 0], ids, 3, {STOP}, 32) is None  # the model would not stop there
    assert read_greedy([0, 0, 4, 5, 6, 0], ids, 3, {STOP}, 2) == [4, 5]  # token limit reached first
    assert read_greedy([0, 0, 4, 5, 5, 5], [1, 2, 3, 4, 5], 3, {STOP}, 32) is None  # past the end of the draft


def test_rows_that_do_not_map_onto_prompts_are_generated():
    ex = {"input_ids": [1, 2, 3, 4, STOP]}
    assert drafted_answers([[0, 0, 4, STOP, 0]], [ex], [[1, 2, 3]], {STOP}, 8) == [[4]]
    assert drafted_answers([[0, 0, 4, STOP, 0]], [ex], [[1, 2, 8]], {STOP}, 8) == [None]  # another prompt
    assert drafted_answers([[0, 0, 4, STOP, 0]], [dict(ex, seq_lens=[2, 3])], [[1, 2, 3]], {STOP}, 8) == [None]  # packed
    assert drafted_answers([[0, 0, 4, STOP, 0]] * 2, [ex, ex], [[1, 2, 3]], {STOP}, 8) == [None]  # blocks


def _split(tokenizer, rows: int):
    from llm_finetune.config import DataConfig
    from llm_finetune.data.prepare import prepare

    data = DataConfig()
    return data, prepare(data, tokenizer).test.head(rows).reset_index(drop=True)


def _with_references(frame, answers: list[str]):
    """Even rows: the model's own answer as reference; odd rows: one it does not give.

    The token columns go: evaluation encodes the edited conversations (get_data's tokens
    hold the original answers)."""
    out = frame.drop(columns=["input_ids", "labels", "seq_lens"])
    for i in range(len(out)):
        conv = json.loads(out.at[i, "messages"])
        conv[-1]["content"] = answers[i].strip() if i % 2 == 0 else "no answer " + str(i)
        out.at[i, "messages"] = json.dumps(conv)
    return out


def _prompts(tokenizer, frame, data):
    from llm_finetune.encoding import prompt_and_reference

    return [prompt_and_reference(tokenizer, json.loads(m), data.prompt_template)[0] for m in frame["messages"]]


def _spy(monkeypatch, module, name):
    seen = []
    real = getattr(module, name)

    def spy(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def _read_off_the_pass(generated: list[str], prompts: list[str]) -> None:
    """Every odd row (reference not the model's answer) was generated; some even rows were not.

    An even row is still generated where its answer does not survive the round trip through
    the reference text (trailing blank lines or a space stripped from the reference): the
    draft then differs from the model's tokens and generation decides.
    """
    assert set(prompts[1::2]) <= set(generated) and len(generated) <= len(prompts) - 2, len(generated)


def test_evaluate_answers_equal_transformers_generate(base_model_dir, tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    import llm_finetune.evaluation.evaluate as ev
    from llm_finetune.config import EvalConfig
    from llm_finetune.evaluation.generation import stop_token_ids

    data, frame = _split(tokenizer, 8)
    cfg = EvalConfig(max_samples=0, max_new_tokens=12, batch_size=4)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32).eval()
    stops = stop_token_ids(tokenizer, model.generation_config)

    def plain(prompt: str) -> str:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=cfg.max_new_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    answers = [plain(p) for p in _prompts(tokenizer, frame, data)]
    frame = _with_references(frame, answers)
    generated = _spy(monkeypatch, ev, "generate")
    _, table = ev.evaluate(base_model_dir, frame, data, cfg)
    assert list(table["prediction"]) == [a.strip() for a in answers]
    _read_off_the_pass(generated, _prompts(tokenizer, frame, data))
    assert list(table["correct"])[1::2] == [False] * 4


@pytest.mark.slow
def test_gguf_answers_equal_llama_cpp_token_by_token(base_model_dir, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="install the gguf-check extra: pip install -c constraints.txt '.[gguf-check]'")
    import llm_finetune.evaluation.evaluate as ev
    from llm_finetune.evaluation import gguf_eval
    from llm_finetune.config import EvalConfig
    from llm_finetune.export.quantize import quantize_variant

    data, frame = _split(tokenizer, 8)
    cfg = EvalConfig(max_samples=0, max_new_tokens=12, batch_size=4)
    q = quantize_variant(base_model_dir, tmp_path / "q", "gguf_q8_0", name="m")
    gguf_tok = ev.eval_tokenizer(q.path, q.gguf_file)
    llm = gguf_eval.load(q.path, q.gguf_file, n_ctx=512)
    answers = gguf_eval.generate(llm, gguf_tok, _prompts(gguf_tok, frame, data), cfg.max_new_tokens)
    llm.close()
    frame = _with_references(frame, answers)
    generated = _spy(monkeypatch, gguf_eval, "generate_with_cuts")  # what evaluate calls for GGUF rows
    _, table = ev.evaluate(q.path, frame, data, cfg, gguf_file=q.gguf_file)
    assert list(table["prediction"]) == [a.strip() for a in answers]
    _read_off_the_pass(generated, _prompts(gguf_tok, frame, data))
