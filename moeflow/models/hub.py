"""Models by name: a Hugging Face repo id resolved offline to its snapshot folder in the local hub cache."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from moeflow.errors import CheckpointError

# org/name, optionally @revision (a branch, tag or commit); the characters the Hub allows in ids
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_CACHE_ENV = ("HF_HUB_CACHE", "HF_HOME")


@dataclass(frozen=True)
class HubSnapshot:
    """A snapshot folder of the hub cache: which repo and commit it holds."""

    repo_id: str
    commit: str
    path: Path


def hub_cache_dir() -> tuple[Path, str]:
    """The hub cache folder, read at call time as huggingface_hub reads it at import: $HF_HUB_CACHE,
    else $HF_HOME/hub, else ~/.cache/huggingface/hub (under $XDG_CACHE_HOME when set); and which
    rule chose it (for error messages)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser(), "HF_HUB_CACHE"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub", "HF_HOME/hub"
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else None
    return (base or Path.home() / ".cache") / "huggingface" / "hub", "the default (neither HF_HUB_CACHE nor HF_HOME set)"


def parse_repo_id(name: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `name` is shaped like a Hub id (org/name[@revision]), else None."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return None
    m = _REPO_ID.match(name)
    return (m.group("repo"), m.group("revision")) if m else None


def resolve_model(name: str | os.PathLike[str]) -> Path:
    """The checkpoint folder for `name`: an existing folder is itself; a Hub id (`org/name`, optionally
    `@revision`) is the snapshot its `refs/main` (or the revision) points to in the local hub cache.
    Nothing is downloaded. CheckpointError saying where moeflow looked when neither is found."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(name)
    parsed = parse_repo_id(text)
    if parsed is None:
        if path.exists():
            raise CheckpointError(f"{path}: not a checkpoint directory (a file)", path=str(path))
        raise CheckpointError(
            f"{text}: no such checkpoint folder; give a folder holding config.json and *.safetensors, "
            "or a Hugging Face repo id such as Qwen/Qwen3-30B-A3B that is in the local cache",
            path=text,
        )
    repo_id, revision = parsed
    cache, rule = hub_cache_dir()
    snapshot = _cached_snapshot(repo_id, revision, cache)
    if snapshot is None:
        folder = cache / ("models--" + repo_id.replace("/", "--"))
        wanted = f"revision {revision!r}" if revision else "refs/main"
        raise CheckpointError(
            f"{text}: not a folder here, and not in the local Hugging Face cache: looked for {folder} "
            f"({wanted}) in the cache {cache} (chosen by {rule}; set HF_HUB_CACHE or HF_HOME to look elsewhere). "
            f"moeflow downloads nothing: fetch it first (hf download {repo_id}) or give its folder",
            path=str(folder),
        )
    return snapshot


def _cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The snapshot folder through huggingface_hub's cache API (offline), or None when absent."""
    # imported here: huggingface_hub takes a noticeable time to import, and `moeflow --help` must not wait
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError as e:
        # newer huggingface_hub tells a partly downloaded snapshot apart: say so, not "missing"
        if type(e).__name__ == "IncompleteSnapshotError":
            raise CheckpointError(f"{repo_id}: {e}", path=str(cache)) from e
        return None
    except HFValidationError:  # an id the Hub would refuse cannot be in its cache
        return None
    path = Path(found)
    return path if path.is_dir() else None


def hub_snapshot(path: Path) -> HubSnapshot | None:
    """The repo and commit of `path` when it is a snapshot folder of a hub cache
    (`models--org--name/snapshots/<commit>`, or a folder inside one), else None."""
    for folder in (path, *path.parents):
        parent = folder.parent
        if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
            repo_id = parent.parent.name[len("models--"):].replace("--", "/")
            return HubSnapshot(repo_id, folder.name, folder)
    return None
