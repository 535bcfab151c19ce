"""The fine_tune workflow: one typed config in, a typed result out.

    pyflyte run workflows/fine_tune.py fine_tune                        # embedded defaults, local CPU
    pyflyte run workflows/fine_tune.py fine_tune --config configs/x.yaml
    pyflyte run --remote workflows/fine_tune.py fine_tune --config configs/x.yaml

validate_config -> prepare_base_model (cached) -> check_outputs -> get_data -> train_model (Elastic: SFT, or DPO
with train.method: dpo) -> preference_stage (optional DPO after SFT) -> assess (evaluate base and tuned, quantize, evaluate the variants) -> push_to_hub -> summarize
start_tracking (after validate_config) -> ... -> finish_tracking (last): one MLflow / W&B run per execution
push_to_hub runs only when hub.repo_id is set; otherwise an echo node (no pod) gives summarize an empty list.
"""

from flytekit import conditional, workflow

from llm_finetune.config import FineTuneConfig
from tasks.assess import assess, sft_task_scores
from tasks.data import get_data
from tasks.hub import no_hub_urls, push_to_hub
from tasks.model import prepare_base_model
from tasks.preference_stage import preference_stage
from tasks.quantize import check_outputs
from tasks.result import FineTuneResult, summarize
from tasks.train import train_model
from tasks.tracking import finish_tracking, start_tracking
from tasks.validate import validate_config


@workflow
def fine_tune(config: FineTuneConfig = FineTuneConfig()) -> FineTuneResult:
    # Every cached task takes whole outputs of an upstream task, never `cfg.train`-style attribute
    # paths: propeller would re-encode those with random key order and the cache would miss at
    # random (tasks/validate.py). tests/test_cache_keys.py holds the compiled workflow to that.
    s = validate_config(config=config)
    run = start_tracking(config=s.config)  # one MLflow / W&B run per execution (tracking.backend)
    base = prepare_base_model(model=s.model)
    checked = check_outputs(base_model=base, evaluate=s.evaluate, quantize=s.quantize)  # before any training
    # train / train_ops size data.max_length: auto to the training hardware
    splits = get_data(data=s.data, base_model=base, train=s.train, train_ops=s.train_ops)
    trained = train_model(  # validation rows choose the checkpoint and stop early; test rows only score
        base_model=base,
        train_data=splits.train_tokens,
        eval_data=splits.validation,
        data=s.data,
        train=s.train,
        train_ops=s.train_ops,
        tracking=run,
        batch=splits.batch,  # the micro-batch fitted so that the rows fit (data/lengths.py)
        sweep=s.sweep,  # sweep: one training node per trial; the best by validation loss goes on (tasks/sweep.py)
    )
    checked >> trained.model  # orders the train node after the checks (any of its outputs names the node)
    # SFT then DPO (config section `preference`); hands the first stage's outputs through when disabled
    final = preference_stage(
        enabled=s.preference_enabled, model=trained.model, adapter=trained.adapter, heldout=splits.test,
        preference_data=s.preference_data, preference_train=s.preference_train, preference_train_ops=s.preference_train_ops,
        tracking=run, first_stage_steps=trained.steps,
    )
    a = assess(base_model=base, tuned_model=final.model, eval_data=final.heldout, config=s.config)
    # after SFT -> DPO, the SFT task too (base, SFT, SFT+DPO on its test split); no node without a DPO stage
    task_scores = sft_task_scores(enabled=s.preference_enabled, base_model=base, sft_model=trained.model,
                                  final_model=final.model, eval_data=splits.test, config=s.config)
    # no pod, and no 40Gi disk to find, when there is nothing to publish (hub.repo_id empty: s.publish is false)
    hub_urls = (
        conditional("publish")
        .if_(s.publish.is_true())
        .then(push_to_hub(
            config=s.config,
            model=final.model,
            adapter=final.adapter,
            quantized=a.quantized,
            base=a.base,
            tuned=a.tuned,
            variants=a.variants,
            sft_model=final.sft_model,  # SFT -> DPO: the DPO adapter's base, published beside it
            task_scores=task_scores,
            sweep=trained.sweep,
        ))
        .else_()
        .then(no_hub_urls(urls=[]))
    )
    result = summarize(
        tuned_model=final.model,
        adapter=final.adapter,
        quantized=a.quantized,
        base=a.base,
        tuned=a.tuned,
        variants=a.variants,
        tuned_mb=a.tuned_mb,
        hub_urls=hub_urls,
        data_report=splits.report,
        train_steps=trained.steps,
        best_step=trained.best_step,
        best_eval_loss=trained.best_eval_loss,
        tracking=run,
        task_scores=task_scores,
        sweep=trained.sweep,
    )
    finish_tracking(run=run, config=s.config, train_metrics=trained.metrics, tracked_run_id=trained.tracked_run_id,
                    result=result, dpo_metrics=final.metrics, dpo_tracked_run_id=final.tracked_run_id)  # last: final metrics, summary, model card; ends the run
    return result
