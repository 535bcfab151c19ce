"""Stop where the model stops: end-of-turn targets in three template styles, and the whole stop list in generation."""

import json

import pytest

from llm_finetune.config import DataConfig
from llm_finetune.data.prepare import prepare
from llm_finetune.encoding import IGNORE_INDEX, encode_messages
from tests.chat_tokenizers import STYLES, build_chat_tokenizer

ONE = [{"role": "user", "content": "Rewrite 5 March 2021 in ISO."}, {"role": "assistant", "content": "2021-03-05"}]
TWO = ONE + [{"role": "user", "content": "And 6 March?"}, {"role": "assistant", "content": "2021-03-06"}]


@pytest.fixture(scope="module", params=sorted(STYLES))
def styled(request, tmp_path_factory):
    style = request.param
    return style, build_chat_tokenizer(style, tmp_path_factory.mktemp(style))


def spans(labels):
    """(start, end) of each run of trained positions."""
    out, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("conv", [ONE, TWO], ids=["one-turn", "two-turns"])
def test_each_completion_ends_once_with_end_of_turn_and_nothing_follows(styled, conv):
    style, tok = styled
    eot = tok.convert_tokens_to_ids(STYLES[style]["eot"])
    enc = encode_messages(tok, conv)
    assert any(lab != IGNORE_INDEX for lab in enc.labels)  # the assistant mask is never all zero
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    runs = spans(enc.labels)
    assert len(runs) == len(answers)
    for (start, end), answer in zip(runs, answers):
        ids = enc.input_ids[start:end]
        assert ids[-1] == eot and ids.count(eot) == 1  # ends exactly once with the end-of-turn token
        assert tok.decode(ids[:-1]) == answer  # ... right after the answer: no newline, no extra EOS
    assert enc.input_ids[-1] == eot  # nothing follows the last completion
    if tok.eos_token_id != eot:
        assert tok.eos_token_id not in [i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    # the rendered template is what the model sees: input ids are its prefix, up to the last end-of-turn
    rendered = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    assert rendered[: len(enc.input_ids)] == enc.input_ids


def test_prepared_training_rows_end_with_end_of_turn(styled, tmp_path):
    """The production path (get_data's core) on a chat dataset in each style."""
    style, tok = styled
    eot = tok.convert_tokens_to_ids(STYLES[style]["eot"])
    rows = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]} for i in range(40)]
    src = tmp_path / "chat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = prepare(DataConfig(source=str(src), format="chat"), tok)
    frames = [p.train_tokens, p.validation, p.test]
    for frame in frames:
        for ids, labels in zip(frame["input_ids"], frame["labels"]):
            ids, labels = list(ids), list(labels)
            trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
            assert trained and trained[-1] == eot and trained.count(eot) == 1 and ids[-1] == eot


def _zero_head_llama(tok, out, eos_ids):
    """A tiny Llama whose LM head is zero: every logit ties, so greedy decoding always picks token id 0."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=eos_ids, pad_token_id=tok.pad_token_id,
    ))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model.eval()


def _count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_generation_stops_at_every_token_of_the_models_stop_list(tmp_path):
    """Llama-3 style: the tokenizer's EOS is <|eot_id|>, and generation_config also lists <|end_of_text|> (id 0).

    The model always emits id 0. Overriding the stop list with the tokenizer's EOS would run
    to max_new_tokens (one forward per token); the whole list stops after the first token.
    """
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from llm_finetune.evaluation.evaluate import generate
    from llm_finetune.evaluation.generation import stop_token_ids
    from llm_finetune.training.trainer import SampleGenerations

    tok = build_chat_tokenizer("llama3", tmp_path / "tok")
    tok.eos_token = "<|eot_id|>"  # as the instruct tokenizers declare it
    eot, end_of_text = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    assert end_of_text == 0 and tok.eos_token_id == eot
    model = _zero_head_llama(tok, tmp_path / "model", [end_of_text, eot])
    assert set(stop_token_ids(tok, model.generation_config)) == {0, eot}

    prompt = tok.apply_chat_template(ONE[:1], tokenize=False, add_generation_prompt=True)
    calls = _count_forwards(model)
    assert generate(model, tok, [prompt, prompt], max_new_tokens=20, batch_size=2) == (["", ""], [False, False])  # stopped, not cut
    assert len(calls) == 1  # stopped at <|end_of_text|> after one step

    calls.clear()  # the sample generations during training use the same stop list
    callback = SampleGenerations(tok, [(prompt, "2021-03-05")], max_new_tokens=20, zero3=False)
    state = TrainerState()
    state.global_step = 3
    callback.on_evaluate(TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[]), state, TrainerControl(),
                         model=model, metrics={"eval_loss": 1.0})
    assert len(calls) == 1 and callback.rows[0]["step"] == 3

    calls.clear()  # the control: with only the tokenizer's EOS, the same model runs to max_new_tokens
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert len(calls) == 20
