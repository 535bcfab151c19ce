"""What every task shares: cache versions, paths, and deck publishing."""

from __future__ import annotations

import contextlib
import html
import os
import secrets
import time
from pathlib import Path

import flytekit
import pandas as pd
from flytekit import Cache, Secret
from flytekit.core.context_manager import FlyteContextManager
from flytekit.exceptions.user import FlyteRecoverableException

from llm_finetune.errors import is_transient
from llm_finetune.evaluation.report import table_html  # noqa: F401 - the tasks import it from here

REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_DIR = REPO_ROOT / "deepspeed_configs"

# Bump a version when the task's code changes what it produces; cached results of the old
# version are then ignored. Separate versions keep, e.g., a new evaluation from re-training.
CACHE_MODEL = Cache(version="model-1")
CACHE_DATA = Cache(version="data-3")
CACHE_TRAIN = Cache(version="train-3")
CACHE_EVAL = Cache(version="eval-3")
CACHE_QUANTIZE = Cache(version="quantize-2")

# Disk (ephemeral storage) of the pods that hold a whole model whose size is not known when the workflow
# is compiled: prepare_base_model (the download) and push_to_hub (the merged model, then each variant, one
# at a time). On Flyte a request is also the pod's limit (llm_finetune/disk.py), and it must fit the
# smallest node a CPU pod lands on: about 44 GiB on the runbook's GKE default pool, 100 GB boot disk
# (deploy/node-pools.yaml). 40Gi holds up to about 38 GB of weights (a 13B model in bf16 is 26 GB). For a
# larger model give the default pool a larger boot disk, update deploy/node-pools.yaml and raise this.
# (The training, evaluation and quantization pods are sized from the model at run time instead.)
MODEL_DISK = "40Gi"
# printed where publishing is decided (validate_config) and by push_to_hub if called without a repo
NOT_PUBLISHING = "[push_to_hub] hub.repo_id is empty: not publishing (set hub.repo_id: owner/name to push)"

LOCAL_DECK_DIR_ENV = "LLM_FINETUNE_DECK_DIR"  # an explicit deck folder (overrides runs/<execution id>/decks)
RUNS_DIR_ENV = "LLM_FINETUNE_RUNS_DIR"  # where local executions keep their folders; default ./runs
RUN_ID_ENV = "LLM_FINETUNE_RUN_ID"  # the current local execution, inherited by the Elastic worker processes

# Gated or private hub models and datasets: the cluster secret huggingface/token, exposed as
# the HF_TOKEN that huggingface_hub reads by itself (locally, export HF_TOKEN instead).
HF_TOKEN_ENV_SECRET = Secret(group="huggingface", key="token", env_var="HF_TOKEN", mount_requirement=Secret.MountType.ENV_VAR)

# W&B tracking (tracking.backend: wandb): the cluster secret wandb/api_key (locally, export WANDB_API_KEY).
WANDB_SECRET = Secret(group="wandb", key="api_key")


def wandb_api_key() -> str:
    """The Flyte secret wandb/api_key, or WANDB_API_KEY for local runs; never a task input."""
    try:
        return flytekit.current_context().secrets.get(WANDB_SECRET.group, WANDB_SECRET.key).strip()
    except Exception:
        return os.environ.get("WANDB_API_KEY", "").strip()


@contextlib.contextmanager
def recoverable():
    """Let Flyte retry transient faults, and only those.

    flytekit marks every user exception NON_RECOVERABLE except ``FlyteRecoverableException``
    (``flytekit/bin/entrypoint.py``), and propeller spends a task's ``retries`` only on
    RECOVERABLE errors, so without this a ``retries: 2`` never retries anything. Transient
    faults (``llm_finetune.errors.is_transient``: network, hub/object-store 408/429/5xx, a
    collective that lost its peer) are re-raised as ``FlyteRecoverableException``; config,
    data and out-of-memory errors pass through unchanged and fail the run at once with their
    message. In an Elastic worker the plugin records the recoverable kind for the launcher.
    """
    try:
        yield
    except FlyteRecoverableException:
        raise
    except Exception as e:
        if is_transient(e):
            raise FlyteRecoverableException(f"transient failure, Flyte will retry: {type(e).__name__}: {e}") from e
        raise


def is_local() -> bool:
    """True on a local ``pyflyte run``, also inside its Elastic worker processes.

    The workers execute in TASK_EXECUTION mode even locally, so they are recognised by
    their raw output prefix: a local path rather than a blob store URI.
    """
    ctx = FlyteContextManager.current_context()
    if ctx.execution_state.is_local_execution():
        return True
    prefix = str(ctx.user_space_params.raw_output_prefix) if ctx.user_space_params else ""
    return bool(prefix) and ("://" not in prefix or prefix.startswith("file://"))


def start_local_run() -> str:
    """Begin a new local execution: later tasks (and their worker processes) write under its folder.

    A local ``pyflyte run`` has no execution id of its own (flytekit names every local
    execution "local"), so the first task of the workflow makes one.
    """
    run_id = time.strftime("local-%Y%m%d-%H%M%S", time.gmtime()) + f"-{secrets.token_hex(3)}"
    os.environ[RUN_ID_ENV] = run_id
    return run_id


def execution_id() -> str:
    """The Flyte execution id remotely; the local run's id (``start_local_run``) locally."""
    if os.environ.get(RUN_ID_ENV):
        return os.environ[RUN_ID_ENV]
    ctx = FlyteContextManager.current_context()
    exec_id = getattr(ctx.user_space_params, "execution_id", None) if ctx.user_space_params else None
    name = getattr(exec_id, "name", "") or ""
    return name if name and name != "local" else start_local_run()


def runs_root() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, "runs")).resolve()


def run_dir() -> Path:
    """``runs/<execution id>/`` (decks, summary.json, model_card.md); ``runs/latest`` points at the newest."""
    root = runs_root()
    out = root / execution_id()
    if not out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        link = root / "latest"
        tmp = root / f".latest-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(out.name, target_is_directory=True)  # relative: the folder can move
        os.replace(tmp, link)
    return out


def local_deck_dir() -> Path:
    if os.environ.get(LOCAL_DECK_DIR_ENV):
        return Path(os.environ[LOCAL_DECK_DIR_ENV]).resolve()
    return run_dir() / "decks"


def write_run_file(name: str, text: str) -> Path | None:
    """Write ``runs/<execution id>/<name>`` on local runs (remote runs keep their outputs in Flyte)."""
    if not is_local():
        return None
    out = run_dir() / name
    out.write_text(text, encoding="utf-8")
    return out


def publish_deck(task: str, sections: dict[str, str]) -> None:
    """Attach each section as a Flyte deck; on local runs also write one HTML page and print it.

    Flyte's own local deck file lands in a random temp dir and is only logged at INFO, so
    local users get a copy under runs/<execution id>/decks/ (or $LLM_FINETUNE_DECK_DIR),
    kept after later runs.
    """
    for title, body in sections.items():
        flytekit.Deck(title, body)
    if not is_local():
        return
    out = local_deck_dir() / f"{task}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<section><h2>{html.escape(t)}</h2>{b}</section>" for t, b in sections.items()]
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(task)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        ".trained{background:#c8f7c5}.prompt{color:#666}</style></head><body>"
        f"<h1>{html.escape(task)}</h1>{''.join(parts)}</body></html>",
        encoding="utf-8",
    )
    print(f"[{task}] deck: file://{out}", flush=True)


def length_histogram(lengths: pd.Series, max_length: int, truncation: bool) -> str:
    """Tokens per example before and after the max_length limit (prompt truncation or dropping)."""
    import plotly.graph_objects as go

    after = lengths.clip(upper=max_length) if truncation else lengths[lengths <= max_length]
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=lengths, name="before", opacity=0.6, nbinsx=40))
    fig.add_trace(go.Histogram(x=after, name="after " + ("truncation" if truncation else "dropping too long"), opacity=0.6, nbinsx=40))
    fig.add_vline(x=max_length, line_dash="dash", annotation_text=f"max_length {max_length}")
    fig.update_layout(barmode="overlay", height=340, title="Tokens per example", xaxis_title="tokens", yaxis_title="examples")
    return fig.to_html(full_html=False, include_plotlyjs=True)
