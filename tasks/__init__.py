"""Thin typed Flyte wrappers around llm_finetune: resources, cache, retries, secrets, decks."""

from tasks import schema_cache

schema_cache.install()  # before any module of this package declares a @task: see tasks/schema_cache.py
