"""Hub ids (``owner/name``) resolved through the local Hugging Face cache only: zoo never downloads at run time.

    zoo.load("state-spaces/mamba-130m-hf")   # after `hf download state-spaces/mamba-130m-hf`
"""
from __future__ import annotations

import re
from pathlib import Path

from zoo.errors import CheckpointError

__all__ = ["is_hub_id", "resolve_hub_id"]

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the shape of a hub model id ``owner/name`` (one slash, no leading dot or slash)."""
    return _HUB_ID.fullmatch(text) is not None and ".." not in text


def resolve_hub_id(repo_id: str) -> Path:
    """The snapshot directory of model ``repo_id`` in the local cache (``HF_HUB_CACHE`` / ``HF_HOME``); offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{repo_id} is neither a local directory nor in the Hugging Face cache; zoo runs "
                              f"offline and never downloads: fetch it first with `hf download {repo_id}` (or "
                              f"`huggingface-cli download {repo_id}`), then zoo.load({repo_id!r})") from None
