"""Push an exported model folder to the Hugging Face Hub (or any Hub-compatible endpoint).

The folder is checked before anything is sent, so a wrong path fails here with a clear message rather than
as a half-empty repo on the Hub. The token is handed to ``huggingface_hub`` and never printed or logged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import filter_repo_objects

from .. import __version__

# Hidden files are editor swap files, `.DS_Store`, interrupted-copy leftovers and the like: never part of a
# model. ".*" also covers everything inside a hidden top-level folder; "*/.*" catches hidden names deeper down.
IGNORE_PATTERNS = [".*", "*/.*"]


def check_export_folder(folder: str | Path) -> Path:
    """The folder as a ``Path`` if it looks like a ``reattend export`` output; a clear error otherwise."""
    folder = Path(folder).expanduser()
    fix = "run `reattend export RECIPE` first, or pass the folder it wrote (<output_dir>/export/model by default)"
    if not folder.is_dir():
        raise FileNotFoundError(f"no model folder at {folder}: {fix}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json, so it is not an exported model: {fix}")
    if not any(not p.name.startswith(".") for p in folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} has no *.safetensors weights, so it is not an exported model: {fix}")
    return folder


def push_folder(folder: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
                endpoint: str | None = None, revision: str | None = None, commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the commit URL.

    huggingface_hub may split a very large folder into several commits; the URL is then the last one's.

    ``token`` defaults to huggingface_hub's own lookup (``HF_TOKEN``, then the ``hf auth login`` token file);
    ``endpoint`` to ``HF_ENDPOINT``, then huggingface.co. ``private`` applies only when the repo is created.
    """
    folder = check_export_folder(folder)
    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token found: set HF_TOKEN to a token with write access, "
                         "or run `hf auth login`")
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is first imported.
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token, library_name="reattend", library_version=__version__)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    files = list(filter_repo_objects((p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                                     ignore_patterns=IGNORE_PATTERNS))
    size_mb = sum((folder / name).stat().st_size for name in files) / 1e6
    print(f"pushing {len(files)} files ({size_mb:.1f} MB) from {folder} to {repo_url}", file=sys.stderr, flush=True)
    # A copy: upload_folder appends its own defaults to the list it is given.
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                               commit_message=commit_message or f"Upload {folder.name} with reattend",
                               ignore_patterns=list(IGNORE_PATTERNS))
    return commit.commit_url
