"""push_folder with the real huggingface_hub client against the local hub stand-in (tests/hub_standin.py)."""

import logging

import pytest

from llm_finetune.errors import HubError
from llm_finetune.export.hub import card_metrics, model_card, push_folder
from tests.hub_standin import HubStandIn

TOKEN = "hf_standinSECRETtoken1234567890"
READ_ONLY = "hf_readonlyTOKEN0987654321"


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants as constants

    # hf_xet needs the hub's Xet storage service; without it the client uses the LFS basic transfer
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = HubStandIn({TOKEN: ("alice", ["alice", "org"]), READ_ONLY: ("bob", ["bob"])}).start()
    yield server
    server.stop()


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)  # goes through LFS
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    return d


def card(metrics=None):
    return model_card("alice/tuned", "HuggingFaceTB/SmolLM2-135M-Instruct", "embedded://iso_dates", {"train": {"max_steps": 6}},
                      metrics or {"base": {"loss": 0.61}, "tuned": {"loss": 0.01}}, "merged model")


def test_push_commits_every_file_and_card(hub, folder):
    r = push_folder(folder, "alice/tuned", TOKEN, True, card(), endpoint=hub.url, backoff_s=0.01)
    repo = hub.repos["alice/tuned"]
    assert r.new_commit and r.commit == repo.sha and len(repo.commits) == 1
    assert set(repo.files) == {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert repo.files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert "model.safetensors" in repo.lfs and repo.private
    assert b"base_model:\n- HuggingFaceTB/SmolLM2-135M-Instruct" in repo.files["README.md"]
    assert not (folder / "README.md").exists()  # the (cached) model folder is left untouched


def test_identical_second_push_makes_no_commit_and_a_change_makes_one(hub, folder):
    first = push_folder(folder, "alice/tuned", TOKEN, True, card(), endpoint=hub.url, backoff_s=0.01)
    again = push_folder(folder, "alice/tuned", TOKEN, True, card(), endpoint=hub.url, backoff_s=0.01)
    assert not again.new_commit and again.commit == first.commit and len(hub.repos["alice/tuned"].commits) == 1
    (folder / "config.json").write_text('{"model_type": "llama", "x": 1}')
    third = push_folder(folder, "alice/tuned", TOKEN, True, card(), endpoint=hub.url, backoff_s=0.01)
    commits = hub.repos["alice/tuned"].commits
    assert third.new_commit and len(commits) == 2 and commits[-1]["files"] == ["config.json"]


def test_transient_503s_are_retried(hub, folder, capsys):
    hub.fail_next("POST", "/api/repos/create", 503, times=2)
    hub.fail_next("POST", "/commit/", 502, times=1)
    r = push_folder(folder, "alice/tuned", TOKEN, True, card(), endpoint=hub.url, backoff_s=0.01)
    assert r.new_commit and len(hub.repos["alice/tuned"].commits) == 1
    assert capsys.readouterr().out.count("transient error") == 3


def test_persistent_5xx_gives_up_with_the_status(hub, folder):
    hub.fail_next("POST", "/api/repos/create", 500, times=10)
    with pytest.raises(HubError, match=r"HTTP 500"):
        push_folder(folder, "alice/tuned", TOKEN, True, card(), endpoint=hub.url, max_retries=3, backoff_s=0.01)


def test_missing_token_is_explained_before_any_request(hub, folder):
    with pytest.raises(HubError, match="no hub token was found.*huggingface/token.*HF_TOKEN"):
        push_folder(folder, "alice/tuned", "", True, card(), endpoint=hub.url)
    assert hub.requests == []


def test_permission_and_bad_token_errors_are_clear(hub, folder):
    with pytest.raises(HubError, match=r"HTTP 403.*no write permission for the namespace 'alice'"):
        push_folder(folder, "alice/tuned", READ_ONLY, True, card(), endpoint=hub.url, backoff_s=0.01)
    with pytest.raises(HubError, match=r"HTTP 401.*invalid or expired"):
        push_folder(folder, "alice/tuned", "hf_wrong", True, card(), endpoint=hub.url, backoff_s=0.01)


def test_token_never_appears_in_logs_card_or_errors(hub, folder, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    hub.fail_next("POST", "/commit/", 503, times=1)
    r = push_folder(folder, "alice/tuned", TOKEN, True, card(), endpoint=hub.url, backoff_s=0.01)
    with pytest.raises(HubError) as e:
        push_folder(folder, "bob/x", TOKEN, True, card(), endpoint=hub.url, backoff_s=0.01)
    out = capsys.readouterr()
    texts = [caplog.text, out.out, out.err, str(e.value), repr(r)] + [v.decode("utf-8", "replace") for v in hub.repos["alice/tuned"].files.values()]
    assert all(TOKEN not in t for t in texts)
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)  # it was really sent, only to the hub


def parse_table(card: str) -> tuple[list[str], dict[str, list[str]]]:
    """The card's metrics table read back from the markdown: header cells, and each row's cells by metric name."""
    from huggingface_hub import ModelCard

    lines = [ln.strip() for ln in ModelCard(card).text.splitlines() if ln.strip().startswith("|")]
    header, sep, *rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert set("".join(sep)) <= set("-:") and len(sep) == len(header)
    assert all(len(r) == len(header) for r in rows)
    names = [r[0] for r in rows]
    assert len(names) == len(set(names)), f"a metric on more than one row: {names}"
    return header, {r[0]: r[1:] for r in rows}


def test_card_table_has_one_row_per_metric_with_intervals_in_their_own_columns():
    from huggingface_hub import ModelCard

    from llm_finetune.evaluation.evaluate import EvalMetrics

    def metrics(loss, ppl, scores):  # scores: name -> (value, low, high), a JSON task
        return EvalMetrics(rows=120, loss=loss, perplexity=ppl, exact_match=scores["exact_match"][0], exact_match_rows=120,
                           task_metric="json_field_f1", task_kind="json", scores={k: v[0] for k, v in scores.items()},
                           scores_low={k: v[1] for k, v in scores.items()}, scores_high={k: v[2] for k, v in scores.items()})

    inputs = {
        "base": (1.8342, 6.2607, {"exact_match": (0.05, 0.0167, 0.0917), "json_field_f1": (0.4123, 0.3561, 0.4702),
                                  "json_structure": (0.6, 0.5083, 0.6833)}, {"arc_easy": 0.5412}),
        "tuned": (0.3127, 1.3671, {"exact_match": (0.7833, 0.7083, 0.85), "json_field_f1": (0.9517, 0.9288, 0.9731),
                                   "json_structure": (0.9917, 0.975, 1.0)}, {"arc_easy": 0.5377}),
        "int8": (0.3161, 1.3718, {"exact_match": (0.775, 0.7, 0.85), "json_field_f1": (0.9489, 0.9247, 0.9712),
                                  "json_structure": (0.9917, 0.975, 1.0)}, None),  # variants run no benchmarks
    }
    table = {name: card_metrics(metrics(loss, ppl, scores), bench) for name, (loss, ppl, scores, bench) in inputs.items()}
    text = model_card("alice/tuned", "HuggingFaceTB/SmolLM2-135M-Instruct", "embedded://iso_dates", {"train": {"max_steps": 6}},
                      table, "merged model")

    header, rows = parse_table(text)
    assert header == ["metric", "base", "base 95% CI", "tuned", "tuned 95% CI", "int8", "int8 95% CI"]
    # loss and perplexity, the headline first, the other task metrics sorted, then benchmarks; names carry no intervals
    assert list(rows) == ["loss", "perplexity", "json_field_f1", "exact_match", "json_structure", "arc_easy"]
    for i, (name, (loss, ppl, scores, bench)) in enumerate(inputs.items()):
        value = {m: cells[2 * i] for m, cells in rows.items()}
        ci = {m: cells[2 * i + 1] for m, cells in rows.items()}
        assert float(value["loss"]) == pytest.approx(loss, abs=5e-5) and float(value["perplexity"]) == pytest.approx(ppl, abs=5e-5)
        assert ci["loss"] == ci["perplexity"] == ci["arc_easy"] == ""
        for metric, (v, low, high) in scores.items():
            assert float(value[metric]) == pytest.approx(v, abs=5e-5)
            assert [float(x) for x in ci[metric].split("-")] == pytest.approx([low, high], abs=5e-5)
        if bench is None:
            assert value["arc_easy"] == ""  # an empty cell where a model has no value
        else:
            assert float(value["arc_easy"]) == pytest.approx(bench["arc_easy"], abs=5e-5)
    data = ModelCard(text).data  # the YAML metadata still parses
    assert data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct"] and data.license == "apache-2.0"


def test_a_dpo_runs_card_shows_preference_accuracy_and_the_sft_task_side_by_side():
    """After SFT -> DPO the card's table holds the pairs' preference accuracy (with its interval) for base and
    tuned, and the SFT task's metric for base, SFT and SFT+DPO, each model a column."""
    from llm_finetune.evaluation.evaluate import EvalMetrics

    def pairs(acc, low, high):
        return EvalMetrics(rows=40, loss=0.62, perplexity=1.86, task_metric="preference_accuracy", task_kind="preference",
                           preference_accuracy=acc, preference_ci_low=low, preference_ci_high=high, mean_logp_margin=1.25)

    def task(em, low, high):
        return EvalMetrics(rows=100, loss=0.3, perplexity=1.35, exact_match=em, exact_match_rows=100,
                           scores={"exact_match": em}, scores_low={"exact_match": low}, scores_high={"exact_match": high})

    table = {"base": card_metrics(pairs(0.55, 0.4, 0.7)), "tuned": card_metrics(pairs(0.85, 0.725, 0.95)),
             "base (SFT task)": card_metrics(task(0.03, 0.0, 0.07)), "SFT (SFT task)": card_metrics(task(0.8, 0.72, 0.87)),
             "SFT+DPO (SFT task)": card_metrics(task(0.78, 0.7, 0.85))}
    header, rows = parse_table(model_card("alice/tuned", "org/base", "embedded://iso_dates", {}, table, "merged model"))
    col = {name: i for i, name in enumerate(header[1:])}
    assert rows["preference_accuracy"][col["tuned"]] and float(rows["preference_accuracy"][col["tuned"]]) == pytest.approx(0.85)
    assert rows["preference_accuracy"][col["tuned 95% CI"]] != ""
    assert float(rows["exact_match"][col["SFT+DPO (SFT task)"]]) == pytest.approx(0.78)
    assert rows["exact_match"][col["tuned"]] == "" and rows["preference_accuracy"][col["SFT (SFT task)"]] == ""
