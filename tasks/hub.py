"""push_to_hub: publish adapter, merged model and every quantized variant, each to its own repo.

The token is the Flyte Secret huggingface/token (HF_TOKEN for local runs): never a task
input, so it is not in the execution's inputs, outputs, decks or cache keys.

The workflow runs it only when ``hub.repo_id`` is set (validate_config's ``publish``); otherwise
``no_hub_urls`` answers an empty list without a pod (workflows/fine_tune.py). The local model
card preview is written by finish_tracking, which always runs.
"""

import contextlib
import os
import shutil
import tempfile
from typing import Optional

from flytekit import Resources, Secret, current_context, task
from flytekit.core.task import Echo
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.config import FineTuneConfig
from llm_finetune.export.hub import HUB_TOKEN_ENV, adapter_for_hub, card_metrics, model_card, push_folder
from llm_finetune.tracking import redacted  # credentials inside URIs (tracking.uri, data.source) stay out of cards
from tasks.assess import SFT_TASK_MODELS
from tasks.common import MODEL_DISK, NOT_PUBLISHING, recoverable
from tasks.evaluate import EvalReport, VariantMetrics
from tasks.sweep import SweepReport, card_section, chosen_config
from tasks.quantize import QuantizedModel

HF_SECRET = Secret(group="huggingface", key="token")

QUANTIZATION_TEXT = {
    "int8": "bitsandbytes LLM.int8() (8-bit); loads with `from_pretrained` (bitsandbytes installed).",
    "nf4": "bitsandbytes 4-bit NF4 with double quantization; loads with `from_pretrained` (bitsandbytes installed).",
    "gguf_q8_0": "GGUF q8_0 (8-bit blocks of 32) for llama.cpp and Ollama.",
    "gguf_f16": "GGUF f16 for llama.cpp and Ollama.",
    "gguf_q4_k_m": "GGUF Q4_K_M (llama.cpp's 4-bit k-quant mix, the common Ollama default) for llama.cpp and Ollama.",
    "gguf_q5_k_m": "GGUF Q5_K_M (llama.cpp's 5-bit k-quant mix) for llama.cpp and Ollama.",
}


def hub_token() -> str:
    """The Flyte secret huggingface/token, or HF_TOKEN for local runs."""
    try:
        return current_context().secrets.get(HF_SECRET.group, HF_SECRET.key).strip()
    except Exception:
        return os.environ.get(HUB_TOKEN_ENV, "").strip()


def card_table(base: EvalReport, tuned: EvalReport, variants: list[VariantMetrics],
               task_scores: Optional[list[EvalReport]] = None) -> dict[str, dict]:
    """Every card's metrics: base, tuned and each evaluated variant as columns of one table.

    Metric names stay clean (intervals go to their own column, see ``card_metrics``), so the
    same metric of every model lands on one row.
    """
    table = {"base": card_metrics(base.metrics, base.benchmarks), "tuned": card_metrics(tuned.metrics, tuned.benchmarks)}
    table.update({v.variant: card_metrics(v.metrics) for v in variants})
    # SFT -> DPO: the supervised task for base, SFT and SFT+DPO beside the pairs' preference accuracy
    table.update({f"{label} (SFT task)": card_metrics(r.metrics) for label, r in zip(SFT_TASK_MODELS, task_scores or [])})
    return table


def variant_repo(repo_id: str, variant: str) -> str:
    """Each variant in its own repo: owner/name-int8, owner/name-nf4, owner/name-gguf-q8-0, ..."""
    return f"{repo_id}-{variant.replace('_', '-')}"


# The branch of the workflow that does not publish (hub.repo_id empty): propeller's echo plugin hands its
# input ([]) back as its output without a pod (enabled in deploy/flyte-binary-values.yaml); locally it is
# a plain function call.
no_hub_urls = Echo(name="no_hub_urls", inputs={"urls": list[str]})


@contextlib.contextmanager
def fetched(directory: FlyteDirectory):
    """A local copy of ``directory`` while it is pushed. A downloaded copy is deleted afterwards, so the
    pod's disk holds one artifact at a time (MODEL_DISK); a local folder (a local run) is left alone."""
    path = directory.download()
    try:
        yield path
    finally:
        if getattr(directory, "_remote_source", None):
            shutil.rmtree(path, ignore_errors=True)


# retries on top of push_folder's own backoff: a re-run makes no duplicate commits. The disk holds the
# largest single artifact (the merged model): each is downloaded, pushed and deleted in turn.
@task(container_image=cpu_image, secret_requests=[HF_SECRET], retries=3,
      requests=Resources(cpu="1", mem="4Gi", ephemeral_storage=MODEL_DISK))
@recoverable()
def push_to_hub(
    config: FineTuneConfig,
    model: FlyteDirectory,
    adapter: Optional[FlyteDirectory],
    quantized: list[QuantizedModel],
    base: EvalReport,
    tuned: EvalReport,
    variants: list[VariantMetrics],
    sft_model: Optional[FlyteDirectory] = None,  # SFT -> DPO: the first stage's model, which the DPO adapter was trained on
    task_scores: Optional[list[EvalReport]] = None,  # SFT -> DPO: the SFT task for base, SFT, SFT+DPO (tasks/assess.py)
    sweep: Optional[SweepReport] = None,  # the sweep that chose the trained model (tasks/sweep.py); None without one
) -> list[str]:
    """URLs of the pushed repos (merged model first); empty when ``hub.repo_id`` is empty (skipped).

    After SFT -> DPO the adapter is the DPO adapter, trained on the merged SFT model, not on the
    hub base: loaded on the base it would give base + DPO without the SFT. So the SFT model is
    pushed as ``<repo>-sft`` and the adapter names that repo, at the commit just pushed, as its
    base (in adapter_config.json and in the card's snippet). ``<repo>`` holds SFT + DPO merged.
    """
    h = config.hub
    if not h.repo_id:
        print(NOT_PUBLISHING)
        return []
    metrics = card_table(base, tuned, variants, task_scores)
    token = hub_token()
    by_variant = {v.variant: v for v in variants}
    m = config.model
    # after a sweep, the card's training config holds the winning trial's settings, and a section lists every trial
    common = dict(base_model=m.base_model, dataset=config.data.source, config=redacted(chosen_config(config, sweep).to_dict()),
                  license=h.license, base_revision=m.revision, dataset_revision=config.data.revision,
                  sweep=card_section(sweep))
    options = dict(token=token, private=h.private, endpoint=h.endpoint or None, max_retries=h.max_retries)
    urls = []

    def push(folder, name: str, card: str):
        r = push_folder(folder, name, card=card, **options)
        print(f"[push_to_hub] {name}: {'new commit ' + r.commit[:10] if r.new_commit else 'unchanged (no new commit)'} {r.url}", flush=True)
        urls.append(r.url)
        return r

    with fetched(model) as folder:
        push(folder, h.repo_id, model_card(h.repo_id, metrics=metrics, variant="merged model", **common))
    adapter_base = dict(base_model=m.base_model, base_revision=m.revision)
    if sft_model is not None:
        name = f"{h.repo_id}-sft"
        with fetched(sft_model) as folder:
            r = push(folder, name, model_card(name, metrics=metrics, variant=f"SFT stage model (the base of the DPO "
                                              f"adapter {h.repo_id}-lora; {h.repo_id} is SFT + DPO merged)", **common))
        adapter_base = dict(base_model=name, base_revision=r.commit)
    if adapter is not None:
        name = f"{h.repo_id}-lora"
        with fetched(adapter) as downloaded:
            # adapter_config.json names the base by hub id + revision, not the pod's temporary folder
            folder = adapter_for_hub(downloaded, tempfile.mkdtemp(prefix="adapter-hub-"), adapter_base["base_model"],
                                     adapter_base["base_revision"])
            kind = "DPO LoRA adapter on the SFT model" if sft_model is not None else "LoRA adapter"
            push(folder, name, model_card(name, metrics=metrics, variant=kind, relation="adapter",
                                          **{**common, **adapter_base}))
            shutil.rmtree(folder, ignore_errors=True)
    for q in quantized:
        name = variant_repo(h.repo_id, q.variant)
        text = QUANTIZATION_TEXT[q.variant] + f" Weights: {q.size_mb:.1f} MB."
        if q.variant in by_variant:
            v = by_variant[q.variant]
            text += f" Change against the unquantized tuned model: loss {v.loss_delta:+.4f}, exact match {v.exact_match_delta:+.1%}."
        card = model_card(name, metrics=metrics, variant=f"{q.variant} quantized model", quantization=text,
                          relation="gguf" if q.gguf_file else "quantized", **common)
        with fetched(q.model) as folder:
            push(folder, name, card)
    return urls
