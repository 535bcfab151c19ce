"""The Ollama Modelfile serves the prompt the model was trained on, default system turn included."""

from llm_finetune.export.modelfile import chat_format, default_system_prompt, write_modelfile
from tests.chat_tokenizers import build_chat_tokenizer


def test_a_template_that_adds_a_default_system_turn_gets_it_as_SYSTEM(tmp_path):
    tok = build_chat_tokenizer("qwen2.5", tmp_path / "qwen")
    write_modelfile(tmp_path / "qwen", tmp_path / "qwen" / "m-q8_0.gguf")
    text = (tmp_path / "qwen" / "Modelfile").read_text()
    assert 'SYSTEM """You are Qwen, a helpful assistant."""' in text
    # what Ollama renders with that SYSTEM (a system message, then the user's) is what training rendered
    # for the user's message alone
    system = default_system_prompt(tok, chat_format(tok.chat_template))
    user = [{"role": "user", "content": "Rewrite 5 March 2021 in ISO 8601."}]
    trained = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    served = tok.apply_chat_template([{"role": "system", "content": system}, *user], tokenize=False, add_generation_prompt=True)
    assert served == trained


def test_a_template_without_a_default_system_turn_gets_no_SYSTEM(tmp_path):
    build_chat_tokenizer("llama3", tmp_path / "llama")
    write_modelfile(tmp_path / "llama", tmp_path / "llama" / "m-q8_0.gguf")
    text = (tmp_path / "llama" / "Modelfile").read_text()
    assert "SYSTEM" not in text and "<|start_header_id|>" in text
