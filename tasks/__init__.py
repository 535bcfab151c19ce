"""Thin typed Flyte wrappers around llm_finetune: resources, cache, retries, secrets, decks."""
