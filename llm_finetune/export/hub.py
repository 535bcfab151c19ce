"""Publish model folders to the Hugging Face hub with a generated model card.

The token comes from the caller (a Flyte Secret in the task, HF_TOKEN locally). It is
never a workflow input and never written to logs, cards, decks or outputs: error
messages are scrubbed of it before they are raised.

A push is one ``HfApi.create_commit`` with every file of the folder plus the card. The
client asks the hub for the remote oid of each path first and drops unchanged files, so
re-publishing the same model makes no new commit; that also makes retrying a push whose
response was lost safe, which is why transient failures (HTTP 408/429/5xx, connection
errors) are retried here with exponential backoff.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from llm_finetune.errors import HubError

HUB_TOKEN_ENV = "HF_TOKEN"
# embedded models and the hub repos they come from (for the card's base_model field)
EMBEDDED_ORIGIN = {"embedded://SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
log = logging.getLogger(__name__)


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit: str  # head commit after the push
    new_commit: bool  # False when nothing changed (an identical re-run)
    files: int


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


INTERVAL = " interval"  # metrics[model][f"{metric} interval"] = (low, high): the metric's 95% interval


def card_metrics(m, benchmarks: dict[str, float] | None = None) -> dict:
    """One model's column of the card's table, from an ``EvalMetrics`` (duck-typed, so this module needs no torch).

    Rows: loss, perplexity, every task metric in ``m.scores`` (headline ``m.task_metric`` first,
    the rest sorted, whatever their names) with its bootstrap interval under ``"<name> interval"``,
    then ``benchmarks``. Names stay clean so base, tuned and variants share one row per metric.
    """
    out = {"loss": m.loss, "perplexity": m.perplexity}
    if getattr(m, "task_metric", "") == "preference_accuracy":  # preference pairs: the headline lives outside scores
        out["preference_accuracy"] = m.preference_accuracy
        out["preference_accuracy" + INTERVAL] = (m.preference_ci_low, m.preference_ci_high)
        out["mean log-prob margin"] = m.mean_logp_margin
    for k in sorted(m.scores, key=lambda k: (k != m.task_metric, k)):
        out[k] = m.scores[k]
        if k in m.scores_low and k in m.scores_high:
            out[k + INTERVAL] = (m.scores_low[k], m.scores_high[k])
    if "exact_match" not in m.scores and m.exact_match_rows:  # metrics computed without per-metric scores
        out["exact_match"] = m.exact_match
    out.update(benchmarks or {})
    return out


def metrics_table(metrics: dict[str, dict]) -> str:
    """Markdown table: one row per metric, a column per model (base, tuned, variants) and, when any
    interval is known, a "<model> 95% CI" column right after it; a cell is empty where a model has no value."""
    names = list(metrics)
    keys = list(dict.fromkeys(k for m in metrics.values() for k in m if not k.endswith(INTERVAL)))
    with_ci = any(k.endswith(INTERVAL) for m in metrics.values() for k in m)

    def cells(n: str, k: str) -> list[str]:
        v, ci = metrics[n].get(k), metrics[n].get(k + INTERVAL)
        value = "" if v is None else _fmt(v)
        return [value, f"{_fmt(ci[0])}-{_fmt(ci[1])}" if ci else ""] if with_ci else [value]

    header = ["metric"] + [c for n in names for c in ([n, f"{n} 95% CI"] if with_ci else [n])]
    rows = [[k] + [c for n in names for c in cells(n, k)] for k in keys]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def hub_id(name: str) -> str:
    """The hub repo id a base model or dataset name stands for ("" for a local path or an embedded dataset)."""
    name = EMBEDDED_ORIGIN.get(name, name)
    is_id = "://" not in name and not name.startswith(("/", ".", "~")) and name.count("/") == 1
    return name if is_id else ""


def hub_revision(revision: str) -> str:
    """A revision the hub can resolve: a commit sha or branch/tag; "" for content fingerprints (sha256:..., etag:...)."""
    return "" if not revision or ":" in revision else revision


def adapter_for_hub(adapter_dir: str | Path, out_dir: str | Path, base_model: str, revision: str) -> Path:
    """A copy of a PEFT adapter folder whose adapter_config.json names the base by hub id and revision.

    PEFT writes the local path the base was loaded from (a pod's temporary folder); whoever
    loads the adapter from the hub needs the hub id instead. The cached adapter is not modified.
    """
    import shutil

    out = Path(out_dir)
    shutil.copytree(adapter_dir, out, dirs_exist_ok=True)
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    base_id = hub_id(base_model)
    if base_id:
        cfg["base_model_name_or_path"] = base_id
        cfg["revision"] = hub_revision(revision) or None
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def adapter_snippet(repo_id: str, base_model: str, revision: str, prompt: str, max_new_tokens: int = 32) -> str:
    """Python that loads the base by hub id, applies the adapter from ``repo_id`` and generates (the card's example)."""
    base_id = hub_id(base_model) or base_model
    rev = hub_revision(revision)
    at = f", revision={rev!r}" if rev else ""
    return (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"base = AutoModelForCausalLM.from_pretrained({base_id!r}{at})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({base_id!r}{at})\n"
        f"model = PeftModel.from_pretrained(base, {repo_id!r})\n"
        f"messages = [{{\"role\": \"user\", \"content\": {prompt!r}}}]\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
        f"output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)\n"
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n"
    )


def code_blocks(card: str, language: str = "python") -> list[str]:
    """The fenced ``language`` blocks of a card, in order (tests run the card's own example)."""
    import re

    return re.findall(rf"```{language}\n(.*?)```", card, flags=re.S)


INTENDED_USE = (
    "Intended use: the task of the training data (see the dataset and the sample generations in the run's decks), "
    "evaluated only on its held-out split. Limits: a small fine-tune inherits the base model's limitations and "
    "biases; it is not evaluated for safety, factuality outside the task, or other languages and domains; check "
    "the metrics' intervals before relying on small differences."
)


def model_card(
    repo_id: str,
    base_model: str,
    dataset: str,
    config: dict,
    metrics: dict[str, dict],
    variant: str,
    license: str = "apache-2.0",
    quantization: str = "",
    relation: str = "finetune",
    base_revision: str = "",
    dataset_revision: str = "",
    example_prompt: str = "Rewrite 5 March 2021 in ISO 8601.",
    files: str = "",
    sweep: str = "",
) -> str:
    """README.md (``huggingface_hub.ModelCard``) with hub metadata and the run's evidence.

    Metadata: base model (hub id) and relation, its resolved revision, dataset and its
    revision, licence, tags, the training config. ``metrics`` maps a model name (base, tuned,
    int8, ...) to its values (``card_metrics``; ``"<metric> interval"`` holds a (low, high) 95%
    interval); ``metrics_table`` shows them side by side, plus how to load the artifact, intended use and limits.
    """
    from huggingface_hub import ModelCard, ModelCardData

    base_id, data_id = hub_id(base_model), hub_id(dataset)
    rel = "quantized" if relation in ("quantized", "gguf") else "adapter" if relation == "adapter" else "finetune"
    data = ModelCardData(
        license=license,
        library_name={"gguf": "gguf", "adapter": "peft"}.get(relation, "transformers"),
        base_model=[base_id] if base_id else None,
        base_model_relation=rel if base_id else None,
        datasets=[data_id] if data_id else None,
        pipeline_tag="text-generation",
        tags=["fine-tuned", "flyte", variant.replace(" ", "-")] + (["gguf"] if relation == "gguf" else []),
        base_model_revision=hub_revision(base_revision) or base_revision or None,
        dataset_revision=dataset_revision or None,
        training_config=config,
    )
    table = metrics_table(metrics)
    if relation == "adapter":
        load = f"```python\n{adapter_snippet(repo_id, base_model, base_revision, example_prompt)}```"
    elif relation == "gguf":
        load = (f"```bash\nllama-cli -hf {repo_id}\n```\n\nOllama, with the `Modelfile` in this repo "
                f"(chat template and stop tokens):\n\n```bash\nollama create {repo_id.split('/')[-1]} -f Modelfile\n"
                f"ollama run {repo_id.split('/')[-1]}\n```")
    else:
        load = (f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo_id!r})\ntokenizer = AutoTokenizer.from_pretrained({repo_id!r})\n```")
    base_line = f"`{base_id or base_model}`" + (f" (revision `{base_revision}`)" if base_revision else "")
    data_line = f"`{data_id or dataset}`" + (f" (revision `{dataset_revision}`)" if dataset_revision else "")
    content = (
        f"---\n{data.to_yaml()}\n---\n\n# {repo_id.split('/')[-1]}\n\n{variant} of {base_line} fine-tuned on {data_line} "
        "with the flyte-llm-finetune pipeline.\n\n"
        f"## Evaluation (held-out split)\n\n{table}\n\n"
        + (f"## Quantization\n\n{quantization}\n\n" if quantization else "")
        + (f"## Hyperparameter sweep\n\n{sweep}\n\n" if sweep else "")
        + f"## Use\n\n{load}\n\n" + (f"{files}\n\n" if files else "")
        + f"## Intended use and limits\n\n{INTENDED_USE}\n\n"
        f"## Licence\n\n{license}; the base model's licence and the dataset's terms also apply.\n\n"
        f"## Training config\n\n```json\n{json.dumps(config, indent=2, sort_keys=True)}\n```\n"
    )
    return str(ModelCard(content))


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _transient(exc: Exception) -> int | None:
    """The HTTP status (or 0 for a connection error) when ``exc`` is worth retrying, else None."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        return status if status in RETRY_STATUS else None
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older huggingface_hub
        import httpx
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return 0
    return None


def push_folder(
    folder: str | Path,
    repo_id: str,
    token: str,
    private: bool,
    card: str,
    endpoint: str | None = None,
    max_retries: int = 5,
    backoff_s: float = 2.0,
    commit_message: str = "Upload model (flyte-llm-finetune)",
) -> PushResult:
    """Create ``repo_id`` if needed and commit ``folder`` plus ``card`` as README.md.

    The folder is not modified (it may be a cached task output).
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if not token:
        raise HubError(
            f"hub.repo_id is {repo_id!r} but no hub token was found: create the Flyte secret huggingface/token "
            f"(docs/evaluate-quantize-publish.md) or set {HUB_TOKEN_ENV} for local runs; "
            "or leave hub.repo_id empty to skip publishing"
        )
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md" and ".cache" not in p.parts)
    api = HfApi(endpoint=endpoint or None, token=token, library_name="flyte-llm-finetune")

    for attempt in range(1, max_retries + 1):
        ops = [CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p)) for p in files]
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            before = api.repo_info(repo_id, repo_type="model").sha
            info = api.create_commit(repo_id, operations=ops, commit_message=commit_message, repo_type="model")
            new = info.oid != before
            log.info("pushed %s: %s (%s)", repo_id, info.oid, "new commit" if new else "unchanged, no commit")
            return PushResult(repo_id, str(url), info.oid, new, len(ops))
        except HfHubHTTPError as e:
            status = getattr(e.response, "status_code", None)
            if status == 401:
                raise HubError(
                    f"the hub rejected the token for {repo_id!r} (HTTP 401): it is invalid or expired; "
                    "create a new write token and update the Flyte secret huggingface/token (or HF_TOKEN)"
                ) from None
            if status == 403:
                raise HubError(
                    f"the hub refused to write {repo_id!r} (HTTP 403): the token has no write permission for the "
                    f"namespace {repo_id.split('/')[0]!r}; use a write token of that user/organization or change hub.repo_id"
                ) from None
            if isinstance(e, RepositoryNotFoundError) or status == 404:
                raise HubError(f"the hub says {repo_id!r} does not exist or is not visible to this token (HTTP 404)") from None
            if _transient(e) is None or attempt == max_retries:
                raise HubError(f"pushing to {repo_id!r} failed (HTTP {status}): {_scrub(str(e), token)}") from None
            reason = f"HTTP {status}"
        except Exception as e:  # connection errors
            if _transient(e) is None or attempt == max_retries:
                raise HubError(f"pushing to {repo_id!r} failed: {type(e).__name__}: {_scrub(str(e), token)}") from None
            reason = type(e).__name__
        wait = min(backoff_s * 2 ** (attempt - 1), 60.0)
        print(f"[hub] {repo_id}: transient error ({reason}), retry {attempt}/{max_retries - 1} in {wait:.1f}s", flush=True)
        time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
