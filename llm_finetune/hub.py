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
) -> str:
    """README.md with hub metadata (base model, dataset, licence, tags) and the run's evidence.

    ``metrics`` maps a model name (base, tuned, int8, ...) to its metric values; the card
    shows them side by side so the improvement and the quantization cost are visible.
    """
    base_model = EMBEDDED_ORIGIN.get(base_model, base_model)
    hub_id = lambda s: "://" not in s and not s.startswith(("/", ".")) and s.count("/") == 1  # noqa: E731
    front = ["---", f"license: {license}", "library_name: transformers" if relation != "gguf" else "library_name: gguf"]
    if hub_id(base_model):
        front += ["base_model:", f"- {base_model}", f"base_model_relation: {'quantized' if relation in ('quantized', 'gguf') else relation if relation == 'adapter' else 'finetune'}"]
    if hub_id(dataset):
        front += ["datasets:", f"- {dataset}"]
    front += ["pipeline_tag: text-generation", "tags:", "- fine-tuned", "- flyte", f"- {variant.replace(' ', '-')}"]
    if relation == "gguf":
        front.append("- gguf")
    front.append("---")
    names = list(metrics)
    keys = list(dict.fromkeys(k for m in metrics.values() for k in m))
    table = "| metric | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    table += "\n".join(f"| {k} | " + " | ".join(_fmt(metrics[n].get(k, "")) for n in names) + " |" for k in keys)
    load = (
        f"```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained(\"{repo_id}\")\n```"
        if relation != "gguf"
        else f"```bash\nllama-cli -hf {repo_id}\nollama run hf.co/{repo_id}\n```"
    )
    if relation == "adapter":
        load = f"```python\nfrom peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id}\")\n```"
    return (
        "\n".join(front)
        + f"\n\n# {repo_id.split('/')[-1]}\n\n{variant} of `{base_model}` fine-tuned on `{dataset}` with the "
        "flyte-llm-finetune pipeline.\n\n"
        f"## Evaluation (held-out split)\n\n{table}\n\n"
        + (f"## Quantization\n\n{quantization}\n\n" if quantization else "")
        + f"## Use\n\n{load}\n\n"
        f"## Licence\n\n{license}; the base model's licence and the dataset's terms also apply.\n\n"
        f"## Training config\n\n```json\n{json.dumps(config, indent=2, sort_keys=True)}\n```\n"
    )


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
