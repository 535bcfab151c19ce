"""The sweep section: how it is written, which trials it makes, what it refuses, and how the winner is chosen.

No training here (tests/test_sweep_e2e.py runs a sweep through the workflow). ``choose_trial`` is run as the
Flyte task it is, on trial outputs written as the train task writes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from llm_finetune import sweep as sweeps
from llm_finetune.config import FineTuneConfig, TrainConfig, from_dict, load_config, sweep_trials, validate
from llm_finetune.errors import ConfigError
from llm_finetune.sweep import SweepConfig, Trial


def _cfg(sweep: dict, **train) -> FineTuneConfig:
    return from_dict(FineTuneConfig, {"sweep": sweep, "train": train})


def _problems(sweep: dict, **train) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(_cfg(sweep, **train))
    return e.value.problems


def test_the_issue_spellings_load_and_the_grid_is_every_combination_in_key_order(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("sweep:\n  train.learning_rate: [1.0e-4, 3.0e-4, 1.0e-3]\n  train.lora.r: [8, 16]\n  concurrency: 3\n")
    cfg = validate(load_config(path))
    assert cfg.sweep.concurrency == 3 and cfg.sweep.trials == 0
    assert sweep_trials(cfg.sweep) == [
        {"train.learning_rate": 1e-4, "train.lora.r": 8}, {"train.learning_rate": 1e-4, "train.lora.r": 16},
        {"train.learning_rate": 3e-4, "train.lora.r": 8}, {"train.learning_rate": 3e-4, "train.lora.r": 16},
        {"train.learning_rate": 1e-3, "train.lora.r": 8}, {"train.learning_rate": 1e-3, "train.lora.r": 16},
    ]
    # the explicit ``parameters`` spelling is the same sweep
    same = from_dict(FineTuneConfig, {"sweep": {"parameters": {"train.learning_rate": [1e-4, 3e-4, 1e-3],
                                                               "train.lora.r": [8, 16]}, "concurrency": 3}})
    assert same.sweep == cfg.sweep


def test_the_sweep_section_survives_flyte_serialisation():
    """The remote run hands the config to every task through Flyte's type engine, not through from_dict."""
    from flytekit.core.context_manager import FlyteContextManager
    from flytekit.core.type_engine import TypeEngine

    cfg = _cfg({"train.learning_rate": {"log_uniform": [1e-5, 1e-3]}, "train.lora.r": [8, 16, 32], "trials": 5, "seed": 3})
    ctx = FlyteContextManager.current_context()
    lit = TypeEngine.to_literal(ctx, cfg, FineTuneConfig, TypeEngine.to_literal_type(FineTuneConfig))
    back = TypeEngine.to_python_value(ctx, lit, FineTuneConfig)
    assert back.sweep == cfg.sweep
    assert sweep_trials(back.sweep) == sweep_trials(cfg.sweep)


def test_a_random_sweep_is_seeded_distinct_and_inside_its_ranges():
    cfg = validate(_cfg({"train.learning_rate": {"log_uniform": [1e-5, 1e-3]}, "train.lora.r": {"int_uniform": [4, 6]},
                         "train.lr_scheduler": ["cosine", "linear"], "trials": 12, "max_trials": 12}))
    trials = sweep_trials(cfg.sweep)
    assert len(trials) == 12 and trials == sweep_trials(cfg.sweep)  # the same seed, the same trials
    assert len({json.dumps(t, sort_keys=True) for t in trials}) == 12
    assert all(1e-5 <= t["train.learning_rate"] <= 1e-3 for t in trials)
    assert all(isinstance(t["train.lora.r"], int) and 4 <= t["train.lora.r"] <= 6 for t in trials)
    assert {t["train.lr_scheduler"] for t in trials} <= {"cosine", "linear"}
    other = from_dict(FineTuneConfig, {"sweep": {**json.loads(json.dumps(cfg.to_dict()["sweep"])), "seed": 1}})
    assert sweep_trials(other.sweep) != trials


def test_log_uniform_spreads_evenly_over_the_decades_and_int_uniform_reaches_both_ends():
    many = SweepConfig(parameters={"train.learning_rate": json.dumps({"log_uniform": [1e-6, 1e-2]}),
                                   "train.lora.r": json.dumps({"int_uniform": [1, 3]})}, trials=400, max_trials=400)
    trials = sweeps.expand(many)
    decades = [sum(10 ** -(k + 1) <= t["train.learning_rate"] < 10 ** -k for t in trials) for k in range(2, 6)]
    assert all(70 <= n <= 130 for n in decades), decades  # ~100 per decade; uniform in value would put ~90% in the top one
    assert {t["train.lora.r"] for t in trials} == {1, 2, 3}


@pytest.mark.parametrize("sweep,train,expected", [
    ({"train.learing_rate": [1e-4]}, {}, "sweep.train.learing_rate: unknown key. Did you mean 'train.learning_rate'?"),
    ({"learning_rate": [1e-4]}, {}, "written train.<key>"),
    ({"train.weights": ["lora", "full"]}, {}, "sweep.train.weights: cannot be swept"),
    ({"train.per_device_batch_size": [1, 2]}, {}, "fitted to memory by get_data"),
    ({"train.memory": ["4Gi", "8Gi"]}, {}, "does not change the trained weights"),
    ({"train.dpo.beta": [0.1, 0.5]}, {}, "trials' losses could not be compared"),
    ({"train.learning_rate": []}, {}, "sweep.train.learning_rate: an empty list tries nothing"),
    ({"train.learning_rate": [1e-4, 1e-4]}, {}, "repeats a value"),
    ({"train.learning_rate": {"uniform": [1e-3, 1e-4]}, "trials": 2}, {}, "the range [0.001, 0.0001] is empty"),
    ({"train.learning_rate": {"log_uniform": [0, 1e-3]}, "trials": 2}, {}, "low must be > 0 on a log scale"),
    ({"train.learning_rate": {"normal": [0, 1]}, "trials": 2}, {}, "give a list of values or one distribution"),
    ({"train.learning_rate": {"log_uniform": [1e-5, 1e-3]}}, {}, "set sweep.trials to the number of random settings"),
    ({"train.learning_rate": [1e-4, 2e-4, 3e-4], "train.lora.r": [4, 8, 16], "max_trials": 8}, {},
     "sweep: the grid has 9 trials (3 (train.learning_rate) x 3 (train.lora.r)), more than sweep.max_trials 8; shorten a "
     "list, sample with sweep.trials, or raise sweep.max_trials"),
    ({"train.learning_rate": {"log_uniform": [1e-5, 1e-3]}, "trials": 20}, {}, "sweep.trials: 20 is more than sweep.max_trials 16"),
    ({"train.lora.r": [8, 16], "trials": 3}, {}, "the lists hold only 2 distinct ones"),
    ({"train.lora.r": {"uniform": [4, 16]}, "trials": 2}, {}, "an integer key; sample it with int_uniform"),
    ({"train.lora.r": [8, "sixteen"]}, {}, "sweep.train.lora.r: expected an integer, got 'sixteen'"),
    ({"train.lora.r": [8, -4]}, {}, "sweep trial 1 (lora.r=-4): train.lora.r: must be > 0, got -4"),
    ({"train.learning_rate": [1e-4, 1e-3]}, {"eval_steps": 0}, "never computes a validation loss"),
    ({"train.learning_rate": [1e-4, 1e-3]}, {"max_steps": 10, "eval_steps": 20, "save_steps": 20}, "never computes a validation loss"),
    ({"train.learning_rate": [1e-4, 1e-3], "concurrency": 0}, {}, "sweep.concurrency: must be >= 1"),
])
def test_bad_sweeps_are_refused_with_the_key_and_the_fix(sweep, train, expected):
    problems = _problems(sweep, **train)
    assert any(expected in p for p in problems), problems


def test_no_sweep_is_one_ordinary_run():
    cfg = validate(FineTuneConfig())
    assert not cfg.sweep.enabled and sweeps.problems(cfg.sweep) == []


def test_a_trial_s_settings_land_in_nested_train_sections_and_nothing_else_changes():
    base = TrainConfig()
    out = sweeps.apply(base, {"train.learning_rate": 3e-4, "train.lora.r": 64})
    assert out.learning_rate == 3e-4 and out.lora.r == 64
    assert base.learning_rate != 3e-4 and base.lora.r != 64  # the base is not modified
    assert out.lora.alpha == base.lora.alpha and out.max_steps == base.max_steps and out.dpo == base.dpo


def _trial(i, loss, chosen=False):
    return Trial(index=i, settings={"train.learning_rate": json.dumps(10.0 ** -(i + 3))}, validation_loss=loss,
                 best_step=10, steps=10, runtime_s=1.0, chosen=chosen)


def test_the_lowest_finite_validation_loss_wins_and_ties_go_to_the_earlier_trial():
    assert sweeps.choose([_trial(0, 0.5), _trial(1, math.nan), _trial(2, 0.2), _trial(3, math.inf)]) == 2
    assert sweeps.choose([_trial(0, 0.3), _trial(1, 0.3)]) == 0
    with pytest.raises(ValueError, match="no sweep trial has a finite validation loss"):
        sweeps.choose([_trial(0, math.nan), _trial(1, math.inf)])


def test_a_trial_is_scored_by_the_checkpoint_it_returns():
    history = [{"step": 5, "eval_loss": 0.4}, {"step": 10, "eval_loss": 0.6}]
    assert sweeps.score(0.4, 5, history) == 0.4  # the best checkpoint was returned
    assert sweeps.score(math.nan, -1, history) == 0.6  # no selection: the last step was returned
    assert math.isnan(sweeps.score(math.nan, -1, [{"step": 5, "loss": 1.0}]))


@pytest.mark.parametrize("n,concurrency", [(4, 2), (5, 2), (7, 3), (3, 5), (6, 1)])
def test_lanes_never_let_more_than_concurrency_trials_run_at_once(n, concurrency):
    """Simulate the scheduler: a trial starts when the trial it waits for has finished; trials take unequal time."""
    from tasks.sweep import lanes

    waits = {later: earlier for earlier, later in lanes(n, concurrency)}
    durations = [3 + (7 * i) % 5 for i in range(n)]
    start, end = {}, {}
    for i in range(n):  # every trial starts as soon as its dependency ends (a scheduler with free capacity)
        start[i] = end[waits[i]] if i in waits else 0
        end[i] = start[i] + durations[i]
    peak = max(sum(start[i] <= t < end[i] for i in range(n)) for t in range(max(end.values())))
    assert peak == min(n, concurrency)


@pytest.mark.slow  # flytekit's local task execution starts a process
def test_choose_trial_hands_on_the_winner_and_writes_the_sweep_deck(tmp_path, monkeypatch):
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.file import FlyteFile

    from llm_finetune.tracking import TrackedRun
    from tasks.sweep import choose_trial, summary_section

    monkeypatch.setenv("LLM_FINETUNE_DECK_DIR", str(tmp_path / "decks"))
    losses = [[0.9, 0.7], [0.8, 0.35], [0.6, 0.5]]  # trial 1 ends lowest
    files, models = [], []
    for i, curve in enumerate(losses):
        (tmp_path / f"m{i}").mkdir()
        models.append(FlyteDirectory(str(tmp_path / f"m{i}")))
        path = tmp_path / f"summary{i}.json"
        path.write_text(json.dumps({"log_history": [{"step": 5 * (k + 1), "eval_loss": v} for k, v in enumerate(curve)]}))
        files.append(FlyteFile(str(path)))
    settings = [{"train.learning_rate": json.dumps(lr)} for lr in (1e-4, 3e-4, 1e-3)]
    out = choose_trial(
        settings=settings, model=models, adapter=[None, None, None], steps=[10] * 3, first_loss=[1.0] * 3,
        final_loss=[0.5, 0.3, 0.4], trained_tokens=[100] * 3, tokens_per_s=[10.0] * 3, runtime_s=[5.0, 6.0, 7.0],
        world_size=[2] * 3, best_step=[10, 10, 5], best_eval_loss=[c[-1] if i < 2 else 0.5 for i, c in enumerate(losses)],
        resumed_from_step=[0] * 3, metrics=files, tracked_run_id=[""] * 3, trial_runs=[TrackedRun()] * 3,
        concurrency=2, parameters={"train.learning_rate": "[0.0001, 0.0003, 0.001]"},
    )
    assert str(out.model.path) == str(tmp_path / "m1") and out.final_loss == 0.3 and out.runtime_s == 6.0
    report = out.sweep
    assert report.chosen == 1 and [t.chosen for t in report.trials] == [False, True, False]
    section = summary_section(report)
    assert section["chosen"] == {"trial": 1, "settings": {"train.learning_rate": 3e-4}, "validation_loss": 0.35}
    assert [t["validation_loss"] for t in section["trials"]] == [0.7, 0.35, 0.5]
    deck = (tmp_path / "decks" / "sweep.html").read_text()
    assert "Chosen: trial 1 (learning_rate=0.0003)" in deck and "Validation curves" in deck


@pytest.mark.slow
def test_a_trial_whose_loss_turns_nan_is_listed_as_diverged_while_a_plain_run_still_fails(tmp_path, tokenizer):
    """train_elastic's real container command (2 gloo ranks) on a model whose loss is NaN from the first step."""
    import torch
    from flyteidl.core import literals_pb2
    from flytekit.models.literals import LiteralMap
    from flytekit.types.directory import FlyteDirectory
    from flytekit.types.structured import StructuredDataset
    from transformers import AutoModelForCausalLM

    from llm_finetune.config import DataConfig, split_train
    from llm_finetune.data.prepare import prepare
    from tasks.train import train_elastic
    from tests.test_retries import _error_kind, _execute
    from tests.tiny import save_tiny_llama

    poisoned = save_tiny_llama(tmp_path / "poisoned", tokenizer)
    model = AutoModelForCausalLM.from_pretrained(poisoned)
    with torch.no_grad():
        model.model.norm.weight.fill_(math.inf)
    model.save_pretrained(poisoned)
    prepared = prepare(DataConfig(), tokenizer)
    train, ops = split_train(TrainConfig(weights="full", max_steps=6, save_steps=0, eval_steps=3, per_device_batch_size=2,
                                         nproc_per_node=2, sample_prompts=0))
    inputs = {"base_model": FlyteDirectory(str(poisoned)), "train_data": StructuredDataset(dataframe=prepared.train_tokens),
              "eval_data": StructuredDataset(dataframe=prepared.validation.head(4)), "data": DataConfig(), "train": train,
              "train_ops": ops}

    rc, log = _execute(train_elastic, {**inputs, "sweep_trial": True}, tmp_path / "trial", timeout=300)
    assert rc == 0 and not (tmp_path / "trial" / "out" / "error.pb").exists(), log[-4000:]
    msg = literals_pb2.LiteralMap()
    msg.ParseFromString((tmp_path / "trial" / "out" / "outputs.pb").read_bytes())
    out = LiteralMap.from_flyte_idl(msg).literals
    assert math.isnan(out["best_eval_loss"].scalar.primitive.float_value) and out["steps"].scalar.primitive.integer == 1
    summary = json.loads(Path(out["metrics"].scalar.blob.uri.removeprefix("file://")).read_text())
    assert summary["diverged"].startswith("FloatingPointError: training loss is nan at step 1")
    trial = Trial(index=0, settings={"train.learning_rate": "0.001"}, best_step=-1, steps=1, runtime_s=0.0,
                  validation_loss=sweeps.score(math.nan, -1, summary["log_history"]), note=summary["diverged"])
    assert "diverged" in "\n".join(sweeps.table([trial]))

    _execute(train_elastic, inputs, tmp_path / "plain", timeout=300)  # not a trial: the run fails as before
    kind, message = _error_kind(tmp_path / "plain")
    assert kind == "NON_RECOVERABLE" and "training loss is nan at step 1" in message
