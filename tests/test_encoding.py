import copy

from llm_finetune.encoding import IGNORE_INDEX, encode_messages, encode_text, prompt_and_reference

CONV = [{"role": "user", "content": "Rewrite 5 March 2021 in ISO."}, {"role": "assistant", "content": "2021-03-05"}]


def trained_text(tok, enc):
    return tok.decode([i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX])


def test_loss_only_on_completion_ending_with_eos(tokenizer):
    enc = encode_messages(tokenizer, CONV)
    assert len(enc.input_ids) == len(enc.labels)
    text = trained_text(tokenizer, enc)
    assert text.startswith("2021-03-05") and tokenizer.eos_token in text
    assert "Rewrite" not in text
    # the trained tokens are exactly what follows the generation prompt
    prompt, ref = prompt_and_reference(tokenizer, CONV)
    assert ref == "2021-03-05"
    assert tokenizer.decode(enc.input_ids).startswith(prompt)


def test_train_on_prompt_trains_every_token(tokenizer):
    enc = encode_messages(tokenizer, CONV, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    conv = CONV + [{"role": "user", "content": "And 6 March?"}, {"role": "assistant", "content": "2021-03-06"}]
    text = trained_text(tokenizer, encode_messages(tokenizer, conv))
    assert "2021-03-05" in text and "2021-03-06" in text and "And 6 March" not in text


def test_named_template_without_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    enc = encode_messages(tok, CONV, template="alpaca")
    full = tok.decode(enc.input_ids)
    assert "### Instruction:\nRewrite 5 March 2021 in ISO." in full and "### Response:\n2021-03-05" in full
    assert trained_text(tok, enc).startswith("2021-03-05")
    assert tok.eos_token_id in [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]


def test_text_trains_all_and_ends_with_eos(tokenizer):
    enc = encode_text(tokenizer, "Rivers carry sediment to the sea.")
    assert enc.labels == enc.input_ids and enc.input_ids[-1] == tokenizer.eos_token_id
