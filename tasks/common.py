"""What every task shares: cache versions, paths, and deck publishing."""

from __future__ import annotations

import contextlib
import html
import os
from pathlib import Path

import flytekit
from flytekit import Cache, Secret
from flytekit.core.context_manager import FlyteContextManager
from flytekit.exceptions.user import FlyteRecoverableException

from llm_finetune.errors import is_transient

REPO_ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED_DIR = REPO_ROOT / "deepspeed_configs"

# Bump a version when the task's code changes what it produces; cached results of the old
# version are then ignored. Separate versions keep, e.g., a new evaluation from re-training.
CACHE_MODEL = Cache(version="model-1")
CACHE_DATA = Cache(version="data-2")
CACHE_TRAIN = Cache(version="train-2")
CACHE_EVAL = Cache(version="eval-2")
CACHE_QUANTIZE = Cache(version="quantize-2")

LOCAL_DECK_DIR_ENV = "LLM_FINETUNE_DECK_DIR"

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


def local_deck_dir() -> Path:
    return Path(os.environ.get(LOCAL_DECK_DIR_ENV, "runs/decks")).resolve()


def publish_deck(task: str, sections: dict[str, str]) -> None:
    """Attach each section as a Flyte deck; on local runs also write one HTML page and print it.

    Flyte's own local deck file lands in a random temp dir and is only logged at INFO, so
    local users get a stable copy under runs/decks/ (or $LLM_FINETUNE_DECK_DIR).
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


def table_html(frame, max_rows: int = 50) -> str:
    return frame.head(max_rows).to_html(index=False, escape=True, border=0)
