"""The run configuration: one dataclass tree, the single input of the ``fine_tune`` workflow.

Plain dataclasses (no flytekit import) so Flyte can serialise them as a typed input and
the core can use them directly. ``FineTuneConfig.from_json`` is what ``pyflyte run
--config file.yaml`` calls: it merges a partial file over the defaults and rejects
unknown keys (a typo in a key would otherwise be silently ignored and the run would
train with a default the user did not want).
"""

from __future__ import annotations

import importlib.util

import dataclasses
import difflib
import json
import re
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llm_finetune.errors import ConfigError
from llm_finetune.methods import DATA_FORMATS as METHOD_DATA, DEPRECATED_METHODS, METHODS, WEIGHTS
from llm_finetune import sweep as sweeps
from llm_finetune.sweep import SweepConfig

EMBEDDED_MODEL = "embedded://SmolLM2-135M-Instruct"
EMBEDDED_DATASET = "embedded://iso_dates"
EMBEDDED_PREFERENCE_DATASET = "embedded://iso_dates_preference"
EMBEDDED_UNPAIRED_DATASET = "embedded://iso_dates_unpaired"

DATA_FORMATS = ("auto", "alpaca", "dolly", "chat", "text", "preference", "unpaired")
INVALID_ROW_POLICIES = ("drop", "fail")
OVERLONG_POLICIES = ("drop", "truncate_prompt", "fail")
# int keys that also take the word "auto" in YAML/JSON (also inside the preference stage's
# sections); the dataclass stores the int on the right
AUTO_INT_KEYS = {"data.max_length": 0, "evaluate.max_new_tokens": 0, "train.sample_max_new_tokens": 0,
                 "train.per_device_batch_size": 0}
# train.per_device_batch_size: auto trains this many rows per micro-batch when they fit in memory;
# when not, get_data lowers it and raises gradient accumulation by the same factor (data/lengths.py)
AUTO_MICRO_BATCH = 4
QUANTIZE_BITS = (0, 4, 8)
QUANTIZE_VARIANTS = ("int8", "nf4", "gguf_q8_0", "gguf_f16", "gguf_q4_k_m", "gguf_q5_k_m")
PROMPT_TEMPLATES = ("alpaca", "plain")
LR_SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRACKING_BACKENDS = ("none", "mlflow", "wandb")
# accelerator names of GPUs older than Turing (sm_75): the CUDA 12.8 torch wheels dropped them
UNSUPPORTED_GPUS = ("k80", "m60", "p4", "p100", "v100")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "apo_down", "sigmoid_norm", "nca_pair", "bco_pair",
                  "sppo_hard", "discopop", "exo_pair")
DPO_REFERENCES = ("auto",)
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes training examples."""

    source: str = EMBEDDED_DATASET  # hub dataset id, local path, fsspec URI, or embedded://iso_dates
    format: str = "auto"  # auto | alpaca | dolly | chat | text
    subset: str = ""  # hub dataset config name
    split: str = "train"  # hub dataset split to read
    columns: dict[str, str] = field(default_factory=dict)  # canonical name -> column in the source
    explode: str = ""  # a column holding a list of records: one row per element, fields as "<column>.<field>"
    eval_fraction: float = -1.0  # deprecated alias of test_fraction; -1 = not set
    seed: int = 42  # seed of the train/validation/test split
    # tokens per example (and per packed row). "auto" (stored as 0, the default): the smallest length
    # that keeps >= 99% of rows, capped by the model's context and the training memory (data/lengths.py)
    max_length: int = 0
    truncation: bool = False  # deprecated: true means overlong: truncate_prompt
    packing: bool = False  # pack examples into max_length rows (block-diagonal attention, no cross-talk)
    on_invalid: str = "drop"  # drop bad rows (and count them) or fail
    min_train_rows: int = 16  # never train on fewer rows than this
    train_on_prompt: bool = False  # False: loss on completions only
    prompt_template: str = "alpaca"  # used when the tokenizer has no chat template
    # hub datasets: a branch, tag or commit. validate_config resolves it (and, for files, a content
    # fingerprint) before the run, so the data cache key changes exactly when the data does
    revision: str = ""
    validation_fraction: float = 0.05  # rows that choose the checkpoint and stop early; never scored
    test_fraction: float = 0.1  # rows that score base vs tuned; never seen by training or selection
    overlong: str = "drop"  # rows longer than max_length: drop | truncate_prompt (from the left) | fail
    max_drop_fraction: float = 0.05  # more rows dropped than this (any rule) fails the run before training


@dataclass
class ModelConfig:
    """The base model: a hub id, a local HF directory, or the embedded default."""

    base_model: str = EMBEDDED_MODEL
    revision: str = "main"  # hub branch, tag or commit; validate_config resolves it to a commit sha


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    # 0.0 as in PEFT's and torchtune's defaults and in `make bench`: dropout draws a fresh
    # random mask over every LoRA module's input, 7 per layer, which measured 19% of a CPU
    # training step of the embedded run (bench/NOTES.md). Set 0.05-0.1 when validation loss
    # shows over-fitting on small data.
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


def _choice(key: str, value, allowed) -> list[str]:
    if value in allowed:
        return []
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return [f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}{hint}"]


@dataclass
class DPOSettings:
    """Direct preference optimisation (TRL's DPOTrainer) when ``train.method`` is ``dpo``."""

    beta: float = 0.1  # how far the policy may move from the reference (higher = closer); IPO's tau
    loss_type: str = "sigmoid"  # sigmoid (DPO), ipo, hinge, robust, apo_zero, apo_down, ... (TRL's loss_type)
    # auto: LoRA/QLoRA use the adapter-disabled base as the reference (no second copy of the weights);
    # full fine-tuning loads a frozen copy of the starting model
    reference: str = "auto"
    weights: str = ""  # deprecated: train.weights (still accepted, moved there with a warning)
    label_smoothing: float = 0.0  # robust / exo_pair only: assumed share of flipped preference labels

    def problems(self, key: str) -> list[str]:
        p = _choice(f"{key}.loss_type", self.loss_type, DPO_LOSS_TYPES) + _choice(f"{key}.reference", self.reference, DPO_REFERENCES)
        if self.beta <= 0:
            p.append(f"{key}.beta: must be > 0 (typical 0.01 to 0.5), got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            p.append(f"{key}.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "exo_pair" and self.label_smoothing == 0.0:
            p.append(f"{key}.label_smoothing: loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 0.001)")
        return p


@dataclass
class KTOSettings:
    """Kahneman-Tversky optimisation (TRL's KTOTrainer) when ``train.method`` is ``kto``."""

    beta: float = 0.1  # how far the policy may move from the reference (higher = closer)
    loss_type: str = "kto"  # kto | apo_zero_unpaired
    # weights of the desirable / undesirable losses; with unbalanced labels keep
    # desirable_weight x desirable rows / (undesirable_weight x undesirable rows) in [1, 4/3] (KTO paper, eq. 8)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def problems(self, key: str) -> list[str]:
        p = _choice(f"{key}.loss_type", self.loss_type, KTO_LOSS_TYPES)
        if self.beta <= 0:
            p.append(f"{key}.beta: must be > 0 (typical 0.01 to 0.5), got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                p.append(f"{key}.{name}: must be > 0, got {getattr(self, name)}")
        return p


@dataclass
class ORPOSettings:
    """Odds-ratio preference optimisation (TRL's ORPOTrainer) when ``train.method`` is ``orpo``."""

    beta: float = 0.1  # weight of the odds-ratio term beside the SFT loss (the paper's lambda)

    def problems(self, key: str) -> list[str]:
        return [] if self.beta > 0 else [f"{key}.beta: must be > 0 (the paper uses 0.1 to 0.25), got {self.beta}"]


SHARDING = ("none", "fsdp2")


@dataclass
class FSDPSettings:
    """FSDP2 (torch's ``fully_shard``, through the HF Trainer and accelerate) when ``train.sharding`` is ``fsdp2``.

    Parameters, gradients and optimizer states are sharded over all processes (as ZeRO-3);
    ``train.gradient_checkpointing`` becomes FSDP's own activation checkpointing for full weights
    (LoRA keeps transformers' own: training/fsdp.py says why).
    """

    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer states in CPU memory (GPU runs only)
    reshard_after_forward: bool = True  # free gathered layers after forward, gather again for backward (less memory)


@dataclass
class TrainConfig:
    """How to train, and on what hardware (the resources are declarative, see tasks/train.py)."""

    method: str = "sft"  # the objective: sft | dpo | kto | orpo (the registry, llm_finetune/methods.py)
    weights: str = "lora"  # which weights train: lora | qlora (adapters, settings in train.lora) | full
    max_steps: int = 60  # optimizer steps; 0 (or -1) means train for num_epochs
    num_epochs: float = 1.0
    learning_rate: float = 1e-3
    # rows per micro-batch; auto (0, the default): 4 when 4 rows of data.max_length fit in memory,
    # else fewer with more gradient accumulation (same tokens per optimizer step): the rows are the
    # user's data and the micro-batch a throughput choice. A number is kept as given.
    per_device_batch_size: int = 0
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    precision: str = "auto"  # auto = bf16 on GPUs that have it, fp32 on CPU
    gradient_checkpointing: bool = False
    seed: int = 42
    logging_steps: int = 5
    save_steps: int = 20  # checkpoint (and upload to Flyte's intra-task checkpoint) every N steps; 0 = never
    eval_steps: int = 20  # validation loss + sample generations every N steps; 0 = never
    eval_max_samples: int = 100  # held-out rows used for validation loss during training (0 = all)
    sample_prompts: int = 4  # first N held-out prompts generated (greedy) at each evaluation
    sample_max_new_tokens: int = 0  # auto (0): the longest sampled reference plus a margin (generation.py)
    collective_timeout_s: int = 600  # a rank stuck this long in a collective fails the run instead of hanging
    profile_interval_s: float = 2.0  # resource sampling period (CPU/RAM, GPU via NVML)
    lora: LoraSettings = field(default_factory=LoraSettings)
    deepspeed: str = "none"  # a file name in deepspeed_configs/ (with or without .json), or none
    sharding: str = "none"  # none | fsdp2 (FSDP2 over all processes; the other way to shard besides train.deepspeed)
    fsdp: FSDPSettings = field(default_factory=FSDPSettings)  # used when sharding is fsdp2
    nnodes: int = 1
    nproc_per_node: int = 2
    gpus_per_node: int = 0  # 0 = CPU training
    accelerator: str = ""  # e.g. nvidia-h100, nvidia-tesla-a100; empty = any
    cpu: str = "2"
    memory: str = "8Gi"
    # spot/preemptible nodes for the training pods: true | false | auto (None, the default) = true exactly when
    # gpus_per_node > 0. The runbook's only spot pools are GPU pools (docs/deploy.md), so an interruptible CPU
    # pod would never schedule; GPU training takes spot first and propeller runs its last attempt on-demand
    # (interruptible-failure-threshold in deploy/flyte-binary-values.yaml). See is_interruptible.
    interruptible: Optional[bool] = None
    retries: int = 2
    keep_checkpoints: int = 2  # newest complete checkpoints kept in the checkpoint store (plus the best one they name)
    dpo: DPOSettings = field(default_factory=DPOSettings)  # used when method is dpo
    kto: KTOSettings = field(default_factory=KTOSettings)  # used when method is kto
    orpo: ORPOSettings = field(default_factory=ORPOSettings)  # used when method is orpo
    early_stopping_patience: int = 0  # stop after N validations without a better validation loss; 0 = off

    def __post_init__(self):
        """The old spellings still work: ``train.method: lora|qlora|full`` (supervised training of those
        weights) and ``train.dpo.weights``; each is moved to ``train.weights`` once, with a warning."""
        if self.method in DEPRECATED_METHODS:
            warnings.warn(f"train.method: {self.method} is deprecated: write train.method: sft and train.weights: "
                          f"{DEPRECATED_METHODS[self.method]}", FutureWarning, stacklevel=3)
            self.method, self.weights = "sft", DEPRECATED_METHODS[self.method]
        if self.dpo.weights:
            warnings.warn(f"train.dpo.weights is deprecated: write train.weights: {self.dpo.weights}", FutureWarning, stacklevel=3)
            self.weights, self.dpo.weights = self.dpo.weights, ""


# TrainConfig keys that change how a run executes or is watched, never the weights it returns.
# validate_config moves them into TrainOps, an input the training cache key ignores, so raising
# train.memory or train.retries reruns nothing. A key not listed here keys the cache (the safe side).
OPERATIONAL_TRAIN_KEYS = (
    "gradient_checkpointing",  # recomputes activations: same math, less memory
    "logging_steps",
    "sample_prompts",
    "sample_max_new_tokens",
    "collective_timeout_s",
    "profile_interval_s",
    "accelerator",
    "cpu",
    "memory",
    "interruptible",
    "retries",
    "keep_checkpoints",  # how many checkpoints the store retains, not what is trained
)


@dataclass
class TrainOps:
    """The operational part of ``TrainConfig`` (same keys, same defaults): see OPERATIONAL_TRAIN_KEYS."""

    gradient_checkpointing: bool = False
    logging_steps: int = 5
    sample_prompts: int = 4
    sample_max_new_tokens: int = 0
    collective_timeout_s: int = 600
    profile_interval_s: float = 2.0
    accelerator: str = ""
    cpu: str = "2"
    memory: str = "8Gi"
    interruptible: Optional[bool] = None
    retries: int = 2
    keep_checkpoints: int = 2


def is_interruptible(cfg: TrainConfig | TrainOps, gpus_per_node: int | None = None) -> bool:
    """Whether the training pods go to spot nodes: ``train.interruptible``, or for auto (None) whether they use GPUs.

    ``gpus_per_node`` is needed when ``cfg`` is a ``TrainOps`` (it lives in the keyed ``TrainConfig``).
    """
    if cfg.interruptible is not None:
        return cfg.interruptible
    gpus = cfg.gpus_per_node if gpus_per_node is None else gpus_per_node
    return gpus > 0


def split_train(cfg: TrainConfig) -> tuple[TrainConfig, TrainOps]:
    """(weight-affecting TrainConfig with operational keys at their defaults, the operational keys)."""
    ops = TrainOps(**{k: getattr(cfg, k) for k in OPERATIONAL_TRAIN_KEYS})
    keyed = dataclasses.replace(cfg, **{k: getattr(TrainOps(), k) for k in OPERATIONAL_TRAIN_KEYS})
    return keyed, ops


def join_train(train: TrainConfig, ops: TrainOps) -> TrainConfig:
    """The full TrainConfig a run uses: ``split_train``'s two halves put back together."""
    return dataclasses.replace(train, **{k: getattr(ops, k) for k in OPERATIONAL_TRAIN_KEYS})


@dataclass
class EvalConfig:
    """Base-vs-tuned evaluation on the test split."""

    max_samples: int = 100  # held-out rows scored (0 = all)
    # greedy tokens per answer; auto (0, the default): the longest reference of the scored rows plus a
    # margin, capped by the model's context (generation.py). A number is kept; answers that reach it
    # without a stop token are counted as cut in the summary
    max_new_tokens: int = 0
    batch_size: int = 16  # rows per loss-pass forward (it holds [rows, length, vocabulary] logits)
    # rows per greedy generation batch: a KV cache per row and one position's logits, so larger
    # batches fit; on 2 CPU cores 48 rows took 24 s where 16 took 37 s (bench/NOTES.md)
    generate_batch_size: int = 48
    # exact match is the task metric when the median reference is at most this many words;
    # longer answers (free text) are judged from the generation sample table instead
    short_answer_words: int = 8
    # optional zero-shot multiple-choice benchmarks via lm-eval-harness (pip install .[lm-eval]),
    # e.g. [piqa, boolq, openbookqa]; empty = off
    lm_eval_tasks: list[str] = field(default_factory=list)
    lm_eval_limit: int = 0  # examples per benchmark (0 = all)
    lm_eval_include_path: str = ""  # a folder of extra task YAMLs (local tasks)


@dataclass
class QuantizeConfig:
    """Which quantized copies of the merged model to make; each is evaluated like the tuned model."""

    # int8 / nf4: bitsandbytes, load with from_pretrained; gguf_q8_0 / gguf_f16 / gguf_q4_k_m / gguf_q5_k_m:
    # one .gguf file (the k-quants by llama.cpp's own quantizer, llama-cpp-python)
    # for llama.cpp and Ollama (Llama-architecture models). Empty list = skip quantization.
    variants: list[str] = field(default_factory=lambda: ["int8", "gguf_q8_0"])
    evaluate: bool = True  # score every variant on the held-out split, deltas vs the unquantized model
    bits: int = -1  # deprecated (use variants): 8 = [int8], 4 = [nf4], 0 = []; -1 = not set


def micro_batch(t: TrainConfig) -> int:
    """Rows per micro-batch: ``train.per_device_batch_size``, or the auto default before get_data fits it."""
    return t.per_device_batch_size if t.per_device_batch_size > 0 else AUTO_MICRO_BATCH


def effective_test_fraction(d: DataConfig) -> float:
    """The test share, honouring the deprecated ``eval_fraction`` key when it is set."""
    return d.test_fraction if d.eval_fraction == -1.0 else d.eval_fraction


def overlong_policy(d: DataConfig) -> str:
    """``data.overlong``, honouring the deprecated ``truncation: true`` (= truncate_prompt)."""
    return "truncate_prompt" if d.truncation and d.overlong == "drop" else d.overlong


def quantize_variants(q: QuantizeConfig) -> list[str]:
    """The variants to build, honouring the deprecated ``bits`` key when it is set."""
    if q.bits == -1:
        return list(dict.fromkeys(q.variants))
    return {0: [], 4: ["nf4"], 8: ["int8"]}.get(q.bits, [])


@dataclass
class HubConfig:
    """Where to publish: the merged model at repo_id, the adapter at repo_id-lora, variants at repo_id-<variant>."""

    repo_id: str = ""  # empty = do not push
    private: bool = True
    license: str = "apache-2.0"  # model card licence; must allow redistribution under the base model's licence
    endpoint: str = ""  # hub URL; empty = HF_ENDPOINT or https://huggingface.co
    max_retries: int = 5  # attempts per repo on transient errors (HTTP 429/5xx, connection errors)


@dataclass
class PreferenceDataConfig(DataConfig):
    """DataConfig whose defaults are the embedded preference pairs (defaults of a partial YAML section)."""

    source: str = EMBEDDED_PREFERENCE_DATASET
    format: str = "preference"


@dataclass
class DPOTrainConfig(TrainConfig):
    """TrainConfig with DPO defaults: a lower learning rate, fewer steps."""

    method: str = "dpo"
    max_steps: int = 40
    learning_rate: float = 2e-4


@dataclass
class PreferenceStage:
    """Optional second stage: DPO on preference data, starting from the model the first stage trained.

    The first stage is the top-level ``data`` / ``train`` (usually SFT). The stage's tasks take
    the first stage's output model as their base, so they are cached separately: re-running
    with a new ``preference.train.dpo.beta`` re-trains only this stage.
    """

    enabled: bool = False
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: DPOTrainConfig = field(default_factory=DPOTrainConfig)


@dataclass
class TrackingConfig:
    """Experiment tracking: one MLflow or W&B run per workflow execution (see tracking.py)."""

    backend: str = "none"  # none | mlflow | wandb
    project: str = ""  # MLflow experiment / W&B project; empty = flyte-llm-finetune
    run_name: str = ""  # empty = the Flyte execution id
    uri: str = ""  # MLflow tracking URI (empty = a local SQLite store, runs/mlflow.db) / W&B server URL (empty = wandb.ai)
    tags: dict[str, str] = field(default_factory=dict)  # added to the run's tags


@dataclass
class FineTuneConfig:
    """Single input of the ``fine_tune`` workflow."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    preference: PreferenceStage = field(default_factory=PreferenceStage)  # SFT then DPO in one execution
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # several trainings, the best by validation loss goes on

    @classmethod
    def from_json(cls, text: str) -> "FineTuneConfig":
        """Called by ``pyflyte run --config file.yaml`` with the file's content as JSON."""
        return from_dict(cls, json.loads(text))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: typing.Any, where: str = "") -> typing.Any:
    """Build dataclass ``cls`` from a (partial) dict: missing keys keep their defaults.

    Unknown keys and values of the wrong type raise ``ConfigError`` naming the key path
    and, for typos, the closest valid key.
    """
    problems: list[str] = []
    obj = _build(cls, data, where, problems)
    if problems:
        raise ConfigError(problems)
    return obj


def _build(cls: type, data: typing.Any, where: str, problems: list[str]) -> typing.Any:
    if data is None:
        return cls()
    if cls is SweepConfig and isinstance(data, dict):
        data = sweeps.normalize(data)  # ``train.learning_rate: [...]`` keys move under ``parameters``
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"{path}: unknown key.{hint} Valid keys here: {', '.join(fields)}")
            continue
        kwargs[key] = _coerce(hints[key], value, path, problems)
    return cls(**kwargs)


def _coerce(tp: typing.Any, value: typing.Any, path: str, problems: list[str]) -> typing.Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {value!r}")
            return []
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        return {str(k): str(v) for k, v in value.items()}
    if tp == Optional[bool]:  # true | false | auto (or null): None stands for auto
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true, false or auto, got {value!r}")
            return None
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {value!r}")
        return bool(value)
    if tp is int:
        auto_key = next((k for k in AUTO_INT_KEYS if path == k or path.endswith("." + k)), None)
        if auto_key and isinstance(value, str) and value.strip().lower() == "auto":
            return AUTO_INT_KEYS[auto_key]
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            also = " or auto" if auto_key else ""
            problems.append(f"{path}: expected an integer{also}, got {value!r}")
            return 0
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return 0.0
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            problems.append(f"{path}: expected a string, got {value!r}")
            return ""
        return str(value)
    return value


def load_config(path: str | Path) -> FineTuneConfig:
    """Load a YAML or JSON run config, merged over the defaults."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    try:
        return from_dict(FineTuneConfig, data or {})
    except ConfigError as e:
        raise ConfigError(e.problems, source=f"config file {path}") from None


def deepspeed_config_path(name: str, search_dir: Path) -> Path | None:
    """Resolve ``train.deepspeed`` (a file name in deepspeed_configs/) to a path, None for 'none'."""
    if not name or name.lower() == "none":
        return None
    file = name if name.endswith(".json") else f"{name}.json"
    return search_dir / file


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Problems(list):
    """Problems of one config section, each with its key path and the fix."""

    def one_of(self, key: str, value, allowed) -> None:
        self.extend(_choice(key, value, allowed))

    def positive(self, key: str, value) -> None:
        if value <= 0:
            self.append(f"{key}: must be > 0, got {value}")


def data_problems(d: DataConfig) -> list[str]:
    """``data``: the source, format, split fractions, length and row policies."""
    p = _Problems()
    one_of, positive = p.one_of, p.positive
    if not d.source.strip():
        p.append("data.source: empty; give a hub dataset id, a local file, an fsspec URI or embedded://iso_dates")
    one_of("data.format", d.format, DATA_FORMATS)
    one_of("data.on_invalid", d.on_invalid, INVALID_ROW_POLICIES)
    one_of("data.prompt_template", d.prompt_template, PROMPT_TEMPLATES)
    one_of("data.overlong", d.overlong, OVERLONG_POLICIES)
    if d.eval_fraction != -1.0:
        if not 0.0 < d.eval_fraction <= 0.5:
            p.append(f"data.eval_fraction: must be in (0, 0.5], got {d.eval_fraction} (deprecated: use data.test_fraction)")
        elif d.test_fraction != DataConfig().test_fraction and d.test_fraction != d.eval_fraction:
            p.append("data.eval_fraction: deprecated alias of data.test_fraction and conflicts with it; remove data.eval_fraction")
    if not 0.0 < d.test_fraction <= 0.5:
        p.append(f"data.test_fraction: must be in (0, 0.5], got {d.test_fraction}")
    if not 0.0 < d.validation_fraction <= 0.5:
        p.append(f"data.validation_fraction: must be in (0, 0.5], got {d.validation_fraction}")
    if effective_test_fraction(d) + d.validation_fraction >= 0.9:
        p.append(
            f"data.test_fraction + data.validation_fraction: {effective_test_fraction(d) + d.validation_fraction:g} leaves "
            "under 10% of the rows to train on; lower them"
        )
    if d.max_length != 0 and d.max_length < 16:
        p.append(f"data.max_length: must be auto or at least 16 tokens, got {d.max_length}")
    if not 0.0 <= d.max_drop_fraction <= 1.0:
        p.append(f"data.max_drop_fraction: must be in [0, 1], got {d.max_drop_fraction}")
    if d.truncation and d.overlong == "fail":
        p.append("data.truncation: deprecated (it means data.overlong: truncate_prompt) and conflicts with data.overlong: fail; remove data.truncation")
    positive("data.min_train_rows", d.min_train_rows)
    if d.explode.strip() and "." in d.explode:
        p.append(f"data.explode: {d.explode!r} must be a top-level column name (nested fields are addressed as column.field)")
    return p


def model_problems(m: ModelConfig) -> list[str]:
    """``model``: the base model."""
    p = _Problems()
    if not m.base_model.strip():
        p.append(f"model.base_model: empty; give a hub id, a local model directory or {EMBEDDED_MODEL}")
    return p


def train_problems(t: TrainConfig, deepspeed_dir: Path | None = None) -> list[str]:
    """``train``: method and weights, steps and schedule, checkpoints, hardware and DeepSpeed."""
    p = _Problems()
    one_of, positive = p.one_of, p.positive
    one_of("train.method", t.method, tuple(METHODS))
    one_of("train.weights", t.weights, WEIGHTS)
    one_of("train.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS)
    one_of("train.precision", t.precision, PRECISIONS)
    if t.max_steps < -1:
        p.append(
            f"train.max_steps: {t.max_steps} is not a step count; give a positive number of optimizer steps, "
            "or 0 (or -1) to train for train.num_epochs"
        )
    elif t.max_steps <= 0 and t.num_epochs <= 0:
        p.append("train.max_steps / train.num_epochs: set max_steps > 0 or num_epochs > 0")
    positive("train.learning_rate", t.learning_rate)
    if t.per_device_batch_size < 0:
        p.append(f"train.per_device_batch_size: must be auto or >= 1, got {t.per_device_batch_size}")
    positive("train.gradient_accumulation_steps", t.gradient_accumulation_steps)
    positive("train.nnodes", t.nnodes)
    positive("train.nproc_per_node", t.nproc_per_node)
    positive("train.logging_steps", t.logging_steps)
    if t.gpus_per_node < 0:
        p.append(f"train.gpus_per_node: must be >= 0, got {t.gpus_per_node}")
    elif t.gpus_per_node > 0 and t.nproc_per_node > t.gpus_per_node:
        p.append(
            f"train.nproc_per_node: {t.nproc_per_node} processes but only {t.gpus_per_node} GPUs per node; "
            "use one process per GPU (set nproc_per_node = gpus_per_node)"
        )
    for key in ("save_steps", "eval_steps", "eval_max_samples", "sample_prompts"):
        if getattr(t, key) < 0:
            p.append(f"train.{key}: must be >= 0 (0 turns it off), got {getattr(t, key)}")
    if t.save_steps > 0 and t.eval_steps > 0 and t.save_steps % t.eval_steps:
        p.append(
            f"train.save_steps: {t.save_steps} is not a multiple of train.eval_steps ({t.eval_steps}); every checkpoint "
            "needs a validation loss to pick the best one, e.g. set save_steps equal to eval_steps"
        )
    if t.early_stopping_patience < 0:
        p.append(f"train.early_stopping_patience: must be >= 0 (0 turns it off), got {t.early_stopping_patience}")
    elif t.early_stopping_patience > 0 and (t.eval_steps == 0 or t.save_steps == 0):
        p.append(
            "train.early_stopping_patience: stopping early compares validation losses of saved checkpoints; "
            "set train.eval_steps > 0 and train.save_steps > 0, or set early_stopping_patience: 0"
        )
    if t.sample_max_new_tokens < 0:
        p.append(f"train.sample_max_new_tokens: must be auto or >= 1, got {t.sample_max_new_tokens}")
    positive("train.collective_timeout_s", t.collective_timeout_s)
    if t.keep_checkpoints < 1:
        p.append(
            f"train.keep_checkpoints: must be >= 1 (the newest checkpoint is what a retry resumes from), got "
            f"{t.keep_checkpoints}; to turn checkpoints off set train.save_steps: 0"
        )
    positive("train.profile_interval_s", t.profile_interval_s)
    if not 0.0 <= t.warmup_ratio < 1.0:
        p.append(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.retries < 0:
        p.append(f"train.retries: must be >= 0, got {t.retries}")
    if t.weights in ("lora", "qlora"):
        positive("train.lora.r", t.lora.r)
        positive("train.lora.alpha", t.lora.alpha)
        if not 0.0 <= t.lora.dropout < 1.0:
            p.append(f"train.lora.dropout: must be in [0, 1), got {t.lora.dropout}")
        if not t.lora.target_modules:
            p.append("train.lora.target_modules: empty; use [all-linear] or name the modules, e.g. [q_proj, v_proj]")
    if any(old in t.accelerator.lower() for old in UNSUPPORTED_GPUS):
        p.append(
            f"train.accelerator: {t.accelerator!r} is a GPU generation (Kepler/Maxwell/Pascal/Volta) that the GPU image's "
            "torch 2.13 CUDA 12.8 wheels do not support; choose nvidia-tesla-t4, nvidia-l4, nvidia-tesla-a100, "
            "nvidia-a100-80gb, nvidia-h100 or newer"
        )
    if t.weights == "qlora" and t.gpus_per_node == 0:
        p.append(
            "train.weights: qlora quantizes the base model to 4-bit with bitsandbytes CUDA kernels and needs a GPU; "
            "set train.gpus_per_node >= 1, or use train.weights: lora on CPU"
        )
    if t.precision == "bf16" and t.gpus_per_node == 0:
        p.append("train.precision: bf16 training needs a GPU here; use auto or fp32 on CPU")
    if t.precision == "fp16" and t.gpus_per_node == 0:
        p.append("train.precision: fp16 mixed precision needs a GPU; use auto or fp32 on CPU")
    ds = deepspeed_config_path(t.deepspeed, deepspeed_dir or Path("deepspeed_configs"))
    if ds is not None:
        if t.weights == "qlora":
            p.append("train.deepspeed: QLoRA with DeepSpeed ZeRO is not supported here; set train.deepspeed: none")
        if deepspeed_dir is not None and not ds.is_file():
            names = sorted(f.stem for f in deepspeed_dir.glob("*.json"))
            p.append(f"train.deepspeed: no file {ds.name} in deepspeed_configs/; choose one of: none, {', '.join(names)}")
    p += sharding_problems(t, ds is not None)
    return p


def sharding_problems(t: TrainConfig, deepspeed: bool) -> list[str]:
    """``train.sharding`` and ``train.fsdp``: FSDP2, and the mixes it refuses (docs/training.md, FSDP2)."""
    p = _choice("train.sharding", t.sharding, SHARDING)
    if t.sharding != "fsdp2":
        return p
    if deepspeed:
        p.append(f"train.sharding: fsdp2 and train.deepspeed: {t.deepspeed} both shard the model, and only one can; "
                 "set train.deepspeed: none to shard with FSDP2, or train.sharding: none to keep DeepSpeed")
    if t.weights == "qlora":
        p.append("train.sharding: fsdp2 with train.weights: qlora is not supported here (4-bit bitsandbytes weights under "
                 "fully_shard were never verified); use train.weights: lora with fsdp2, or qlora with train.sharding: none")
    if t.nnodes * t.nproc_per_node == 1:
        p.append("train.sharding: fsdp2 shards the model over processes, but train.nnodes x train.nproc_per_node is 1: "
                 "there is nothing to shard over; set train.nproc_per_node >= 2 (one per GPU) or train.sharding: none")
    if t.fsdp.cpu_offload and t.gpus_per_node == 0:
        p.append("train.fsdp.cpu_offload: offloads from GPU memory to CPU memory, and this run trains on the CPU "
                 "(train.gpus_per_node: 0); set train.fsdp.cpu_offload: false")
    return p


def evaluate_problems(e: EvalConfig) -> list[str]:
    """``evaluate``: batch sizes, generation budget, sample counts, benchmarks."""
    p = _Problems()
    positive = p.positive
    positive("evaluate.batch_size", e.batch_size)
    positive("evaluate.generate_batch_size", e.generate_batch_size)
    if e.max_new_tokens < 0:
        p.append(f"evaluate.max_new_tokens: must be auto or >= 1, got {e.max_new_tokens}")
    if e.max_samples < 0:
        p.append(f"evaluate.max_samples: must be >= 0 (0 = all rows), got {e.max_samples}")

    if e.short_answer_words < 1:
        p.append(f"evaluate.short_answer_words: must be >= 1, got {e.short_answer_words}")
    if e.lm_eval_limit < 0:
        p.append(f"evaluate.lm_eval_limit: must be >= 0 (0 = all examples), got {e.lm_eval_limit}")
    return p


def quantize_problems(q: QuantizeConfig) -> list[str]:
    """``quantize``: the variants and what they need installed."""
    p = _Problems()
    one_of = p.one_of
    if q.bits != -1:
        one_of("quantize.bits", q.bits, QUANTIZE_BITS)
    for i, v in enumerate(q.variants):
        one_of(f"quantize.variants[{i}]", v, QUANTIZE_VARIANTS)
    k_quants = [v for v in q.variants if v in ("gguf_q4_k_m", "gguf_q5_k_m")]
    if k_quants and importlib.util.find_spec("llama_cpp") is None:
        p.append(f"quantize.variants: {', '.join(k_quants)} {'is' if len(k_quants) == 1 else 'are'} made by llama.cpp's quantizer, which needs "
                 f"llama-cpp-python (both task images carry it); locally: pip install -c constraints.txt '.[gguf-check]', "
                 f"or use gguf_q8_0")
    if q.bits != -1 and q.variants != QuantizeConfig().variants and q.variants != quantize_variants(q):
        p.append(f"quantize.bits: deprecated and conflicts with quantize.variants {q.variants}; remove quantize.bits")
    return p


def hub_problems(h: HubConfig) -> list[str]:
    """``hub``: the repo id and retries."""
    p = _Problems()
    if h.max_retries < 1:
        p.append(f"hub.max_retries: must be >= 1, got {h.max_retries}")
    if h.repo_id and not _REPO_ID.match(h.repo_id):
        p.append(f"hub.repo_id: {h.repo_id!r} is not of the form owner/name (leave it empty to skip publishing)")
    return p


def validate(config: FineTuneConfig, deepspeed_dir: Path | None = None) -> FineTuneConfig:
    """Check every value a run depends on before any GPU time is spent.

    Collects all problems of every section (one function each, above) and raises one
    ``ConfigError`` listing them, each with the key path and the fix. Returns the config
    unchanged when it is valid.
    """
    p = (data_problems(config.data) + model_problems(config.model) + train_problems(config.train, deepspeed_dir)
         + evaluate_problems(config.evaluate) + quantize_problems(config.quantize) + hub_problems(config.hub)
         + preference_problems(config, deepspeed_dir) + _choice("tracking.backend", config.tracking.backend, TRACKING_BACKENDS)
        + sweep_problems(config, deepspeed_dir))
    if p:
        raise ConfigError(p)
    return config


def preference_problems(config: FineTuneConfig, deepspeed_dir: Path | None = None) -> list[str]:
    """Problems of the method's data and settings (the registry, methods.py) and of the optional ``preference`` stage."""
    p: list[str] = []
    d, t = config.data, config.train
    spec = METHODS.get(t.method)
    if spec is not None:
        settings = getattr(t, t.method, None)  # train.dpo, train.kto, ...: the method's own section, if it has one
        if settings is not None:
            p += settings.problems(f"train.{t.method}")
        if d.format not in METHOD_DATA[spec.data]:
            takes = sorted(name for name, m in METHODS.items() if d.format in METHOD_DATA[m.data])
            p.append(f"data.format: {d.format!r} is not data train.method {t.method} trains on ({spec.data} rows: data.format "
                     f"{' or '.join(METHOD_DATA[spec.data])}); {d.format} data trains with train.method "
                     f"{' or '.join(takes) or 'none'}. Set data.format and data.source to match train.method"
                     + (", or use the preference section to run it after this stage" if spec.data == "sft" else ""))
        if d.packing and not spec.can_pack:
            p.append(f"data.packing: train.method {t.method} trains on whole {spec.data} rows (answers compared side by "
                     "side) and cannot pack them; set data.packing: false")
    stage = config.preference
    if stage.enabled:
        if spec is not None and spec.data != "sft":
            p.append(f"preference.enabled: the preference stage tunes on preferences after the first stage, so train.method "
                     f"must be sft (supervised); for {t.method} alone set preference.enabled: false")
        if stage.data.prompt_template != d.prompt_template:
            p.append(f"preference.data.prompt_template: {stage.data.prompt_template!r} differs from data.prompt_template "
                     f"{d.prompt_template!r}; DPO must see prompts rendered as the first stage trained them")
        stage_spec = METHODS.get(stage.train.method)
        if stage_spec is not None and stage_spec.data == "sft":
            p.append(f"preference.train.method: the preference stage tunes on preferences, so it takes "
                     f"{' or '.join(n for n, m in METHODS.items() if m.data != 'sft')}, got {stage.train.method!r}")
        inner = FineTuneConfig(data=stage.data, train=stage.train, model=config.model, evaluate=config.evaluate,
                               quantize=QuantizeConfig(variants=[]), hub=HubConfig())
        try:
            validate(inner, deepspeed_dir)
        except ConfigError as e:
            p += [f"preference.{problem}" for problem in e.problems]
    return p


# train keys a sweep may not vary, and why (the rest of the train section's scalar keys may be swept)
SWEEP_REFUSED = {
    "method": "changes the data the run trains on; run one config per method",
    "weights": "changes the memory and the outputs (adapter or full model); run one config per choice",
    "per_device_batch_size": "is fitted to memory by get_data (data/lengths.py), which would overwrite the swept value; "
                             "sweep train.learning_rate or train.max_steps instead",
    "gradient_accumulation_steps": "is fitted with the micro-batch by get_data (data/lengths.py), which would overwrite "
                                   "the swept value",
    "eval_max_samples": "changes the validation rows the trials are compared on",
    "deepspeed": "changes how training is sharded, not what it learns",
    "sharding": "changes how training is sharded, not what it learns",
    "fsdp": "changes how training is sharded, not what it learns",
    "nnodes": "is hardware, not a hyperparameter",
    "nproc_per_node": "is hardware, not a hyperparameter",
    "gpus_per_node": "is hardware, not a hyperparameter",
    "dpo": "changes what the validation loss measures, so the trials' losses could not be compared",
    "kto": "changes what the validation loss measures, so the trials' losses could not be compared",
    "orpo": "changes what the validation loss measures, so the trials' losses could not be compared",
}


def _train_leaves(cls=None, prefix: str = "train") -> dict[str, typing.Any]:
    """Every scalar key under ``train`` (``train.lora.r``, ...) with its type."""
    cls = cls or TrainConfig
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        path = f"{prefix}.{name}"
        out.update(_train_leaves(tp, path) if dataclasses.is_dataclass(tp) else {path: tp})
    return out


def sweep_problems(config: FineTuneConfig, deepspeed_dir: Path | None = None) -> list[str]:
    """``sweep``: its axes and trial count (sweep.py), the keys it varies, and every trial's train section."""
    s = config.sweep
    p = sweeps.problems(s)
    if not s.enabled or p:
        return p
    leaves = _train_leaves()
    for key in s.parameters:
        parts = key.split(".")
        refused = next((SWEEP_REFUSED[x] for x in parts[1:2] if x in SWEEP_REFUSED), None)
        if key not in leaves:
            close = difflib.get_close_matches(key, leaves, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = "" if parts[0] == "train" else " (a sweep varies keys of the train section, written train.<key>)"
            p.append(f"sweep.{key}: unknown key{where}.{hint}")
        elif refused or parts[1] in OPERATIONAL_TRAIN_KEYS:
            why = refused or "does not change the trained weights (an operational key: resources, logging, retries)"
            p.append(f"sweep.{key}: cannot be swept: it {why}")
        elif typing.get_origin(leaves[key]) in (list, dict):
            p.append(f"sweep.{key}: a list or mapping key cannot be swept; sweep scalar keys (numbers, strings, booleans)")
        elif leaves[key] is int and next(iter(_as_dict(s.parameters[key])), "") in ("uniform", "log_uniform"):
            p.append(f"sweep.{key}: an integer key; sample it with int_uniform: [low, high] or list its values")
    if p:
        return p
    trials = sweeps.expand(s)
    for i, settings in enumerate(trials):
        typed, wrong = {}, []
        for key, value in settings.items():
            typed[key] = _coerce(leaves[key], value, f"sweep.{key}", wrong)
        if wrong:
            p += sorted(set(wrong) - set(p))
            continue
        train = sweeps.apply(config.train, typed)
        where = f"sweep trial {i} ({sweeps.label(settings)})"
        p += [f"{where}: {problem}" for problem in train_problems(train, deepspeed_dir)]
        if train.eval_steps <= 0 or (0 < train.max_steps < train.eval_steps):
            p.append(f"{where}: trains {train.max_steps} steps with train.eval_steps {train.eval_steps}, so it never "
                     "computes a validation loss and cannot be compared; set train.eval_steps between 1 and train.max_steps")
    return p


def _as_dict(text: str) -> dict:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def sweep_trials(sweep: SweepConfig) -> list[dict]:
    """The trials' settings with each value of its key's type (call after ``validate``)."""
    leaves = _train_leaves()
    return [{k: _coerce(leaves[k], v, k, []) for k, v in t.items()} for t in sweeps.expand(sweep)]
