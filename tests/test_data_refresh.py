"""The event-driven pieces of workflows/data_refresh.py, run locally (no cluster, no training)."""

import threading
import time

from llm_finetune.config import FineTuneConfig, TrainConfig


def test_file_sensor_waits_until_the_data_lands(tmp_path):
    from workflows.data_refresh import wait_for_data

    target = tmp_path / "2026-11-22.jsonl"
    threading.Timer(2.0, lambda: target.write_text('{"instruction": "x", "output": "y"}\n')).start()
    start = time.monotonic()
    wait_for_data(path=str(target))
    assert target.exists() and time.monotonic() - start >= 2.0


def test_point_config_at_replaces_only_the_data_source():
    from workflows.data_refresh import point_config_at

    cfg = FineTuneConfig(train=TrainConfig(max_steps=7))
    out = point_config_at(config=cfg, data_uri="s3://bucket/new.jsonl")
    assert out.data.source == "s3://bucket/new.jsonl"
    assert out.train == cfg.train and out.data.format == cfg.data.format
