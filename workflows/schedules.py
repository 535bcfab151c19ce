"""Scheduled retraining: launch plans of ``fine_tune`` that run on a clock.

Both are registered inactive (``auto_activate=False``): registering never starts
spending GPU hours by itself. Activate one with
``pyflyte launchplan --activate fine_tune_nightly <version>`` (or in the console).

Their default ``config`` comes from ``configs/retrain_nightly.yaml``; a one-off run
can still pass another config, a schedule uses the default.

They use the cache like any run. The config names the data by a fixed URI
(``.../latest.jsonl``) whose content changes between runs; validate_config pins that URI
to its content (the object's ETag/generation, tasks/validate.py) and the hub model at
``main`` to its commit, so a night with new data or a moved model retrains, and a night
with neither is served from the cache instead of paying for the same GPU hours again.
"""

from datetime import timedelta
from pathlib import Path

from flytekit import CronSchedule, FixedRate, LaunchPlan

from llm_finetune.config import load_config
from workflows.fine_tune import fine_tune

RETRAIN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "retrain_nightly.yaml"
NIGHTLY_CRON = "0 3 * * *"  # 03:00 UTC every day
WEEKLY = timedelta(days=7)

fine_tune_nightly = LaunchPlan.get_or_create(
    workflow=fine_tune,
    name="fine_tune_nightly",
    schedule=CronSchedule(schedule=NIGHTLY_CRON),
    default_inputs={"config": load_config(RETRAIN_CONFIG)},
    auto_activate=False,
)

fine_tune_weekly = LaunchPlan.get_or_create(
    workflow=fine_tune,
    name="fine_tune_weekly",
    schedule=FixedRate(duration=WEEKLY),
    default_inputs={"config": load_config(RETRAIN_CONFIG)},
    auto_activate=False,
)
