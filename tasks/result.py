"""The typed result of a fine-tuning run, and the task that assembles and reports it."""

from dataclasses import dataclass
from typing import Optional

from flytekit import task
from flytekit.types.directory import FlyteDirectory

from images.specs import cpu_image
from llm_finetune.evaluate import EvalMetrics
from tasks.common import is_local, local_deck_dir, publish_deck


@dataclass
class FineTuneResult:
    tuned_model: FlyteDirectory  # merged full model, loads with from_pretrained
    adapter: Optional[FlyteDirectory]  # LoRA adapter (None for full fine-tuning)
    quantized_model: Optional[FlyteDirectory]  # bitsandbytes model (None when quantize.bits is 0)
    base_metrics: EvalMetrics
    tuned_metrics: EvalMetrics
    hub_url: str  # empty when publishing was skipped


@task(container_image=cpu_image, enable_deck=True)
def summarize(
    tuned_model: FlyteDirectory,
    adapter: Optional[FlyteDirectory],
    quantized_model: Optional[FlyteDirectory],
    base_metrics: EvalMetrics,
    tuned_metrics: EvalMetrics,
    hub_url: str,
) -> FineTuneResult:
    """Compare base and tuned, and say where every output is."""
    rows = [
        ("exact match", f"{base_metrics.exact_match:.1%}", f"{tuned_metrics.exact_match:.1%}"),
        ("loss", f"{base_metrics.loss:.4f}", f"{tuned_metrics.loss:.4f}"),
        ("perplexity", f"{base_metrics.perplexity:.3f}", f"{tuned_metrics.perplexity:.3f}"),
    ]
    table = "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows)
    publish_deck("summary", {"Base vs tuned": f"<table><tr><th>metric</th><th>base</th><th>tuned</th></tr>{table}</table>"})
    lines = [f"  {name:<12} base {b:>8}   tuned {c:>8}" for name, b, c in rows]
    lines += [
        f"  tuned model: {tuned_model.path}",
        f"  adapter:     {adapter.path if adapter else '(none: full fine-tuning)'}",
        f"  quantized:   {quantized_model.path if quantized_model else '(skipped: quantize.bits is 0)'}",
        f"  hub:         {hub_url or '(not published: hub.repo_id is empty)'}",
    ]
    if is_local():
        lines.append(f"  decks:       {local_deck_dir()}/*.html")
    print("[summary] fine-tune results\n" + "\n".join(lines), flush=True)
    return FineTuneResult(tuned_model, adapter, quantized_model, base_metrics, tuned_metrics, hub_url)
