"""Publish model folders to the Hugging Face hub with a generated model card.

The token comes from the caller (a Flyte Secret in the task, HF_TOKEN locally); it is
never written to logs, cards or outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from llm_finetune.errors import HubError

HUB_TOKEN_ENV = "HF_TOKEN"


def model_card(repo_id: str, base_model: str, dataset: str, config: dict, metrics: dict, variant: str) -> str:
    tags = ["fine-tuned", "flyte", variant]
    front = "\n".join(["---", f"base_model: {base_model}" if "://" not in base_model else "", "library_name: transformers", "tags:"])
    front += "".join(f"\n- {t}" for t in tags) + "\n---\n"
    table = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    return (
        f"{front}\n# {repo_id}\n\n{variant} of `{base_model}` fine-tuned on `{dataset}` with the Flyte fine-tuning pipeline.\n\n"
        f"## Metrics (held-out split)\n\n| metric | value |\n|---|---|\n{table}\n\n"
        f"## Training config\n\n```json\n{json.dumps(config, indent=2, sort_keys=True)}\n```\n"
    )


def push_folder(folder: str | Path, repo_id: str, token: str, private: bool, card: str, endpoint: str | None = None) -> str:
    """Create the repo if needed and upload ``folder`` with its card; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if not token:
        raise HubError(
            f"hub.repo_id is {repo_id!r} but no hub token was found: create the Flyte secret (see README) "
            f"or set {HUB_TOKEN_ENV} for local runs; or leave hub.repo_id empty to skip publishing"
        )
    folder = Path(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload fine-tuned model")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise HubError(f"the hub refused {repo_id!r} (HTTP {status}): the token lacks write permission for this namespace") from None
        raise HubError(f"pushing to {repo_id!r} failed: HTTP {status}: {e}") from None
    return str(url)
