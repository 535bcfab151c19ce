"""The fine_tune workflow: one typed config in, a typed result out.

    pyflyte run workflows/fine_tune.py fine_tune                        # embedded defaults, local CPU
    pyflyte run workflows/fine_tune.py fine_tune --config configs/x.yaml
    pyflyte run --remote workflows/fine_tune.py fine_tune --config configs/x.yaml

validate_config -> prepare_base_model (cached) -> check_outputs -> get_data -> train_model (Elastic)
-> assess (evaluate base and tuned, quantize, evaluate the variants) -> push_to_hub -> summarize
start_tracking (after validate_config) -> ... -> finish_tracking (last): one MLflow / W&B run per execution
"""

from flytekit import workflow

from llm_finetune.config import FineTuneConfig
from tasks.data import get_data
from tasks.hub import push_to_hub
from tasks.model import prepare_base_model
from tasks.quantize import check_outputs
from tasks.result import FineTuneResult, summarize
from tasks.train import train_model
from tasks.tracking import finish_tracking, start_tracking
from tasks.validate import validate_config

# Imported after tasks.train on purpose. Observed: with tasks.assess imported first, the GPU
# ImageSpec tag in `pyflyte package` differs from the one the train_model pod recomputes
# (LOADED_MODULES copy mode hashes the repo modules loaded when the tag is first computed),
# so the pod would ask for an image that was never built (tests/test_serialization.py).
from tasks.assess import assess  # noqa: E402,I001


@workflow
def fine_tune(config: FineTuneConfig = FineTuneConfig()) -> FineTuneResult:
    cfg = validate_config(config=config)
    run = start_tracking(config=cfg)
    base = prepare_base_model(model=cfg.model)
    checked = check_outputs(base_model=base, config=cfg)  # GGUF / lm-eval prerequisites, before any training
    splits = get_data(data=cfg.data, base_model=base)
    trained = train_model(
        base_model=base, train_data=splits.train_tokens, eval_data=splits.heldout, data=cfg.data, train=cfg.train,
        tracking=run,
    )
    checked >> trained
    a = assess(base_model=base, tuned_model=trained.model, eval_data=splits.heldout, config=cfg)
    hub_urls = push_to_hub(
        config=cfg,
        model=trained.model,
        adapter=trained.adapter,
        quantized=a.quantized,
        base=a.base,
        tuned=a.tuned,
        variants=a.variants,
    )
    result = summarize(
        tuned_model=trained.model,
        adapter=trained.adapter,
        quantized=a.quantized,
        base=a.base,
        tuned=a.tuned,
        variants=a.variants,
        tuned_mb=a.tuned_mb,
        hub_urls=hub_urls,
        tracking=run,
    )
    finish_tracking(run=run, config=cfg, trained=trained, result=result)
    return result
