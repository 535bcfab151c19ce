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
    # Every cached task takes whole outputs of an upstream task, never `cfg.train`-style attribute
    # paths: propeller would re-encode those with random key order and the cache would miss at
    # random (tasks/validate.py). tests/test_cache_keys.py holds the compiled workflow to that.
    s = validate_config(config=config)
    run = start_tracking(config=s.config)  # one MLflow / W&B run per execution (tracking.backend)
    base = prepare_base_model(model=s.model)
    checked = check_outputs(base_model=base, evaluate=s.evaluate, quantize=s.quantize)  # before any training
    splits = get_data(data=s.data, base_model=base)
    trained = train_model(
        base_model=base,
        train_data=splits.train_tokens,
        eval_data=splits.heldout,
        data=s.data,
        train=s.train,
        train_ops=s.train_ops,
        tracking=run,
    )
    checked >> trained.model  # orders the train node after the checks (any of its outputs names the node)
    a = assess(base_model=base, tuned_model=trained.model, eval_data=splits.heldout, config=s.config)
    hub_urls = push_to_hub(
        config=s.config,
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
    finish_tracking(run=run, config=s.config, train_metrics=trained.metrics, tracked_run_id=trained.tracked_run_id,
                    result=result)  # last: final metrics, summary, model card; ends the run
    return result
