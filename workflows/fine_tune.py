"""The fine_tune workflow: one typed config in, a typed result out.

    pyflyte run workflows/fine_tune.py fine_tune                        # embedded defaults, local CPU
    pyflyte run workflows/fine_tune.py fine_tune --config configs/x.yaml
    pyflyte run --remote workflows/fine_tune.py fine_tune --config configs/x.yaml

validate_config -> prepare_base_model (cached) -> get_data -> train_model (Elastic)
-> evaluate base and tuned -> quantize_model -> push_to_hub -> summarize
"""

from flytekit import workflow

from llm_finetune.config import FineTuneConfig
from tasks.data import get_data
from tasks.evaluate import evaluate_model
from tasks.hub import push_to_hub
from tasks.model import prepare_base_model
from tasks.quantize import quantize_model
from tasks.result import FineTuneResult, summarize
from tasks.train import train_model
from tasks.validate import validate_config


@workflow
def fine_tune(config: FineTuneConfig = FineTuneConfig()) -> FineTuneResult:
    cfg = validate_config(config=config)
    base = prepare_base_model(model=cfg.model)
    splits = get_data(data=cfg.data, base_model=base)
    trained = train_model(
        base_model=base, train_data=splits.train, eval_data=splits.heldout, data=cfg.data, train=cfg.train
    )
    base_metrics = evaluate_model(model=base, eval_data=splits.heldout, data=cfg.data, evaluate=cfg.evaluate, label="base")
    tuned_metrics = evaluate_model(
        model=trained.model, eval_data=splits.heldout, data=cfg.data, evaluate=cfg.evaluate, label="tuned"
    )
    quantized = quantize_model(model=trained.model, quantize_cfg=cfg.quantize)
    hub_url = push_to_hub(
        config=cfg,
        model=trained.model,
        adapter=trained.adapter,
        quantized=quantized,
        base_metrics=base_metrics,
        tuned_metrics=tuned_metrics,
    )
    return summarize(
        tuned_model=trained.model,
        adapter=trained.adapter,
        quantized_model=quantized,
        base_metrics=base_metrics,
        tuned_metrics=tuned_metrics,
        hub_url=hub_url,
    )
