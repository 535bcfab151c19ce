"""push_to_hub: publish the tuned model with a model card; the token is a Flyte Secret."""

import os
from typing import Optional

from flytekit import Resources, Secret, current_context, task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.config import FineTuneConfig
from llm_finetune.evaluate import EvalMetrics
from llm_finetune.hub import HUB_TOKEN_ENV, model_card, push_folder

HF_SECRET = Secret(group="huggingface", key="token")


def hub_token() -> str:
    """The Flyte secret huggingface/token, or HF_TOKEN for local runs."""
    try:
        return current_context().secrets.get(HF_SECRET.group, HF_SECRET.key).strip()
    except Exception:
        return os.environ.get(HUB_TOKEN_ENV, "").strip()


@task(container_image=cpu_image, secret_requests=[HF_SECRET], retries=3, requests=Resources(cpu="1", mem="4Gi"))
def push_to_hub(
    config: FineTuneConfig,
    model: FlyteDirectory,
    adapter: Optional[FlyteDirectory],
    quantized: Optional[FlyteDirectory],
    base_metrics: EvalMetrics,
    tuned_metrics: EvalMetrics,
) -> str:
    """URL of the pushed model repo; empty when ``hub.repo_id`` is empty (skipped)."""
    repo_id = config.hub.repo_id
    if not repo_id:
        print("[push_to_hub] hub.repo_id is empty: not publishing (set hub.repo_id: owner/name to push)")
        return ""
    token = hub_token()
    metrics = {
        "exact match (base)": f"{base_metrics.exact_match:.3f}",
        "exact match (tuned)": f"{tuned_metrics.exact_match:.3f}",
        "loss (base)": f"{base_metrics.loss:.4f}",
        "loss (tuned)": f"{tuned_metrics.loss:.4f}",
    }
    card_args = dict(base_model=config.model.base_model, dataset=config.data.source, config=config.to_dict(), metrics=metrics)
    url = push_folder(model.download(), repo_id, token, config.hub.private, model_card(repo_id, variant="merged model", **card_args))
    if adapter is not None:
        push_folder(adapter.download(), f"{repo_id}-lora", token, config.hub.private, model_card(f"{repo_id}-lora", variant="LoRA adapter", **card_args))
    if quantized is not None:
        name = f"{repo_id}-{'int8' if config.quantize.bits == 8 else 'nf4'}"
        push_folder(quantized.download(), name, token, config.hub.private, model_card(name, variant=f"{config.quantize.bits}-bit bitsandbytes", **card_args))
    return url
