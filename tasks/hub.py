"""push_to_hub: publish adapter, merged model and every quantized variant, each to its own repo.

The token is the Flyte Secret huggingface/token (HF_TOKEN for local runs): never a task
input, so it is not in the execution's inputs, outputs, decks or cache keys.
"""

import os
import tempfile
from typing import Optional

from flytekit import Resources, Secret, current_context, task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.config import FineTuneConfig
from llm_finetune.hub import HUB_TOKEN_ENV, adapter_for_hub, card_metrics, model_card, push_folder
from llm_finetune.tracking import redacted  # credentials inside URIs (tracking.uri, data.source) stay out of cards
from tasks.common import write_run_file
from tasks.evaluate import EvalReport, VariantMetrics
from tasks.common import recoverable
from tasks.quantize import QuantizedModel

HF_SECRET = Secret(group="huggingface", key="token")

QUANTIZATION_TEXT = {
    "int8": "bitsandbytes LLM.int8() (8-bit); loads with `from_pretrained` (bitsandbytes installed).",
    "nf4": "bitsandbytes 4-bit NF4 with double quantization; loads with `from_pretrained` (bitsandbytes installed).",
    "gguf_q8_0": "GGUF q8_0 (8-bit blocks of 32) for llama.cpp and Ollama.",
    "gguf_f16": "GGUF f16 for llama.cpp and Ollama.",
}


def hub_token() -> str:
    """The Flyte secret huggingface/token, or HF_TOKEN for local runs."""
    try:
        return current_context().secrets.get(HF_SECRET.group, HF_SECRET.key).strip()
    except Exception:
        return os.environ.get(HUB_TOKEN_ENV, "").strip()


def card_table(base: EvalReport, tuned: EvalReport, variants: list[VariantMetrics]) -> dict[str, dict]:
    """Every card's metrics: base, tuned and each evaluated variant as columns of one table.

    Metric names stay clean (intervals go to their own column, see ``card_metrics``), so the
    same metric of every model lands on one row.
    """
    table = {"base": card_metrics(base.metrics, base.benchmarks), "tuned": card_metrics(tuned.metrics, tuned.benchmarks)}
    table.update({v.variant: card_metrics(v.metrics) for v in variants})
    return table


def variant_repo(repo_id: str, variant: str) -> str:
    """Each variant in its own repo: owner/name-int8, owner/name-nf4, owner/name-gguf-q8-0, ..."""
    return f"{repo_id}-{variant.replace('_', '-')}"


# retries on top of push_folder's own backoff: a re-run makes no duplicate commits. The disk holds
# the merged model and every variant while they upload.
@task(container_image=cpu_image, secret_requests=[HF_SECRET], retries=3, requests=Resources(cpu="1", mem="4Gi", ephemeral_storage="100Gi"))
@recoverable()
def push_to_hub(
    config: FineTuneConfig,
    model: FlyteDirectory,
    adapter: Optional[FlyteDirectory],
    quantized: list[QuantizedModel],
    base: EvalReport,
    tuned: EvalReport,
    variants: list[VariantMetrics],
) -> list[str]:
    """URLs of the pushed repos (merged model first); empty when ``hub.repo_id`` is empty (skipped)."""
    h = config.hub
    metrics = card_table(base, tuned, variants)
    preview = model_card(h.repo_id or "your-name/model", base_model=config.model.base_model, dataset=config.data.source,
                         config=config.to_dict(), license=h.license, metrics=metrics, variant="merged model")
    card_path = write_run_file("model_card.md", preview)  # local runs: runs/<execution id>/model_card.md
    if card_path is not None:
        print(f"[push_to_hub] model card preview: {card_path}", flush=True)
    if not h.repo_id:
        print("[push_to_hub] hub.repo_id is empty: not publishing (set hub.repo_id: owner/name to push)")
        return []
    token = hub_token()
    by_variant = {v.variant: v for v in variants}
    m = config.model
    common = dict(base_model=m.base_model, dataset=config.data.source, config=redacted(config.to_dict()), license=h.license,
                  base_revision=m.revision, dataset_revision=config.data.revision)
    push = dict(token=token, private=h.private, endpoint=h.endpoint or None, max_retries=h.max_retries)

    targets = [(model.download(), h.repo_id, model_card(h.repo_id, metrics=metrics, variant="merged model", **common))]
    if adapter is not None:
        name = f"{h.repo_id}-lora"
        # adapter_config.json names the base by hub id + revision, not the pod's temporary folder
        folder = adapter_for_hub(adapter.download(), tempfile.mkdtemp(prefix="adapter-hub-"), m.base_model, m.revision)
        targets.append((folder, name, model_card(name, metrics=metrics, variant="LoRA adapter", relation="adapter", **common)))
    for q in quantized:
        name = variant_repo(h.repo_id, q.variant)
        text = QUANTIZATION_TEXT[q.variant] + f" Weights: {q.size_mb:.1f} MB."
        if q.variant in by_variant:
            v = by_variant[q.variant]
            text += f" Change against the unquantized tuned model: loss {v.loss_delta:+.4f}, exact match {v.exact_match_delta:+.1%}."
        card = model_card(name, metrics=metrics, variant=f"{q.variant} quantized model", quantization=text,
                          relation="gguf" if q.gguf_file else "quantized", **common)
        targets.append((q.model.download(), name, card))

    urls = []
    for folder, name, card in targets:
        r = push_folder(folder, name, card=card, **push)
        print(f"[push_to_hub] {name}: {'new commit ' + r.commit[:10] if r.new_commit else 'unchanged (no new commit)'} {r.url}", flush=True)
        urls.append(r.url)
    return urls
