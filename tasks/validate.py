"""First stage: reject a bad config before any download or GPU time, and pin what the run reads.

Its outputs are the config's sections, each a literal written here by Python. Downstream
tasks take those, never ``cfg.data``-style attribute access on a promise: on a cluster,
propeller resolves such attribute paths itself by decoding the msgpack into a Go map and
re-encoding it with keys in Go's random map order, so the bytes the cache hashes differ
between identical executions and cached tasks miss at random (flyteorg/flyte#6776;
``flytepropeller/pkg/controller/nodes/attr_path_resolver.go``). tests/test_cache_keys.py
checks the compiled workflow for such bindings.

It also pins moving names to content (``llm_finetune/revisions.py``): ``model.revision`` and
``data.revision`` become a commit sha or a content fingerprint, so a rerun after the data
or the hub model changed misses the cache, and an identical rerun hits it. The operational
train keys travel as ``train_ops``, which the training cache key ignores.

Before anything else it checks that the data files beside the code reached the pod
(``check_package_files``): with ``pyflyte run --remote`` and the default ``--copy auto`` they do
not, and the run would otherwise fail later in ``get_data`` or training.
"""

import dataclasses
import typing

from flytekit import task

from images.specs import cpu_image
from llm_finetune.config import (
    DataConfig,
    EvalConfig,
    FineTuneConfig,
    HubConfig,
    ModelConfig,
    QuantizeConfig,
    TrainConfig,
    TrainOps,
    split_train,
    validate,
)
from llm_finetune.errors import ConfigError
from llm_finetune.sweep import SweepConfig
from llm_finetune.package_data import missing_package_files
from llm_finetune.revisions import data_revision, model_revision
from llm_finetune.tracking import tracking_problems
from tasks.common import (
    DEEPSPEED_DIR, HF_TOKEN_ENV_SECRET, NOT_PUBLISHING, REPO_ROOT, WANDB_SECRET, is_local, recoverable, start_local_run,
    wandb_api_key,
)
from tasks.local_cache import forget_missing_outputs, report_forgotten

Sections = typing.NamedTuple(
    "Sections",
    [
        ("config", FineTuneConfig),  # the whole validated config with revisions pinned (for uncached tasks)
        ("data", DataConfig),
        ("model", ModelConfig),
        ("train", TrainConfig),  # operational keys at their defaults: this half keys the training cache
        ("train_ops", TrainOps),
        ("evaluate", EvalConfig),
        ("quantize", QuantizeConfig),
        ("hub", HubConfig),
        # the optional DPO stage after the first (preference: in the config; tasks/preference_stage.py)
        ("preference_enabled", bool),
        ("preference_data", DataConfig),
        ("preference_train", TrainConfig),
        ("preference_train_ops", TrainOps),
        # hub.repo_id is set: the workflow runs push_to_hub; otherwise an echo node answers [] without a pod
        ("publish", bool),
        ("sweep", SweepConfig),  # several trainings of the first stage, the best by validation loss goes on
    ],
)


def pin_revisions(config: FineTuneConfig) -> FineTuneConfig:
    """``config`` with model.revision and data.revision resolved to a commit sha or a content fingerprint."""
    import dataclasses

    m, d = config.model, config.data
    model = dataclasses.replace(m, revision=model_revision(m.base_model, m.revision))
    data = dataclasses.replace(d, revision=data_revision(d.source, d.revision))
    for key, before, after in (("model.revision", m.revision, model.revision), ("data.revision", d.revision, data.revision)):
        if before != after:
            print(f"[validate] {key}: {before or '(latest)'} -> {after}", flush=True)
    return dataclasses.replace(config, model=model, data=data)


def sections(config: FineTuneConfig) -> Sections:
    """Validate, pin revisions, and split the config into the literals downstream tasks take."""
    config = pin_revisions(validate(config, deepspeed_dir=DEEPSPEED_DIR))
    train, ops = split_train(config.train)
    stage = config.preference
    stage_data = stage.data
    if stage.enabled:
        stage_data = dataclasses.replace(stage_data, revision=data_revision(stage_data.source, stage_data.revision))
    stage_train, stage_ops = split_train(stage.train)
    publish = bool(config.hub.repo_id)
    if not publish:
        print(NOT_PUBLISHING, flush=True)
    return Sections(config, config.data, config.model, train, ops, config.evaluate, config.quantize, config.hub,
                    stage.enabled, stage_data, stage_train, stage_ops, publish, config.sweep)


def check_package_files() -> None:
    """Fail first, naming them, when the data files beside the code did not reach this pod (``--copy auto``)."""
    missing = missing_package_files(DEEPSPEED_DIR)
    if missing:
        names = ", ".join(_repo_path(f) for f in missing)
        raise ConfigError([
            f"{names}: missing from the code this task received. The images hold no source and "
            "`pyflyte run --remote` without `--copy all` ships only the imported Python modules, not these data files. "
            "Run pyflyte run --remote --copy all workflows/fine_tune.py fine_tune --config <file> "
            "(or register with `make register`, which passes --copy all, and launch the registered version)."
        ], source="deployment")


def _repo_path(f) -> str:
    """``f`` relative to the repository root when it lies under it (the names a user finds in the repo)."""
    try:
        return f.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(f)


def check_tracking(config: FineTuneConfig) -> None:
    """The tracking checks that need this task's environment: the W&B secret, and local or in a pod."""
    key = wandb_api_key() if config.tracking.backend == "wandb" else ""
    problems = tracking_problems(config.tracking, key, remote=not is_local())
    if problems:
        raise ConfigError(problems)


@task(container_image=cpu_image, retries=2, secret_requests=[HF_TOKEN_ENV_SECRET, WANDB_SECRET])
def validate_config(config: FineTuneConfig) -> Sections:
    """Raise ConfigError listing every problem; otherwise the pinned config and its sections."""
    check_package_files()  # first: without the data files every later check and task is moot
    check_tracking(config)
    if is_local():
        start_local_run()  # a new runs/<execution id>/ for this execution's decks, summary and model card
        report_forgotten(forget_missing_outputs())  # cached paths under a wiped /tmp: recompute, not crash
    with recoverable():
        return sections(config)
