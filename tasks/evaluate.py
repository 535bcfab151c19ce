"""evaluate: score a model (base or tuned) on the held-out split, with a sample table deck."""

import pandas as pd
from flytekit import Resources, task
from flytekit.types.directory import FlyteDirectory
from flytekit.types.structured import StructuredDataset

from images.specs import cpu_image
from llm_finetune.config import DataConfig, EvalConfig
from llm_finetune.evaluate import EvalMetrics
from llm_finetune.evaluate import evaluate as score_model
from tasks.common import CACHE_EVAL, publish_deck, table_html


@task(
    container_image=cpu_image,
    cache=CACHE_EVAL,
    retries=1,
    requests=Resources(cpu="2", mem="8Gi"),
    enable_deck=True,
)
def evaluate_model(
    model: FlyteDirectory, eval_data: StructuredDataset, data: DataConfig, evaluate: EvalConfig, label: str
) -> EvalMetrics:
    """Completion loss, perplexity and exact match of ``model``; ``label`` names it in decks."""
    metrics, table = score_model(model.download(), eval_data.open(pd.DataFrame).all(), data, evaluate)
    publish_deck(
        f"evaluate_{label}",
        {
            f"{label} metrics": f"<p>{metrics.rows} held-out rows: loss {metrics.loss:.4f}, perplexity "
            f"{metrics.perplexity:.3f}, exact match {metrics.exact_match:.1%} ({metrics.exact_match_rows} rows).</p>",
            f"{label} generations": table_html(table, max_rows=100),
        },
    )
    return metrics

