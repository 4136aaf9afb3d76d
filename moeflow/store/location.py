"""Where a checkpoint's expert stores live: store_dir, else beside the checkpoint, else the user cache (always for a hub snapshot)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import xxhash

from moeflow.errors import ConfigError
from moeflow.models.checkpoint import Checkpoint
from moeflow.models.hub import hub_snapshot, resolve_model
from moeflow.store.store import MANIFEST

log = logging.getLogger("moeflow.store")

DEFAULT_DIR = ".moeflow"
_VIRTUAL_FS = (Path("/proc"), Path("/sys"))  # kernel views: mkdir there fails with confusing errors


@dataclass(frozen=True)
class StoreLocation:
    """The store root and, when it is not where the user would look, why (a line for the plan or the log)."""

    root: Path
    note: str | None = None
    expected: bool = False  # the note describes the usual place (a hub snapshot's store), not a fallback


def user_cache_dir() -> Path:
    """$MOEFLOW_CACHE, else ~/.cache/moeflow."""
    env = os.environ.get("MOEFLOW_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moeflow"


def check_store_dir(value: str | os.PathLike[str]) -> Path:
    """The store_dir a user gave, checked: ConfigError naming store_dir when empty, in /proc or /sys, or a file."""
    text = os.fspath(value)
    if not str(text).strip():
        raise ConfigError(
            "store_dir='': an empty path would put the store in the current directory; "
            "give a folder, or leave store_dir unset to use <checkpoint>/.moeflow"
        )
    path = Path(text).expanduser()
    resolved = Path(os.path.realpath(path))
    for virtual in _VIRTUAL_FS:
        if resolved == virtual or virtual in resolved.parents:
            raise ConfigError(f"store_dir={str(text)!r}: inside {virtual}, a kernel file system; give a folder on disk")
    probe = resolved
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        what = "is a file" if probe == resolved else f"lies under {probe}, which is a file"
        raise ConfigError(f"store_dir={str(text)!r} {what}, not a folder; give a folder for the expert store")
    return path


def _writable(path: Path) -> bool:
    target = path if path.exists() else path.parent
    return os.access(target, os.W_OK | os.X_OK)


def resolve_store_root(
    checkpoint_dir: Path, override: str | os.PathLike[str] | None, *, cache_dir: Path | None = None,
    identity: Callable[[], str] | None = None,
) -> StoreLocation:
    """The store root of a checkpoint: `override` (checked); else, for a snapshot of the Hugging Face
    cache, a folder of the per-user cache keyed by repo id and commit (never inside the snapshot: the
    hub owns it, and a snapshot shares its blobs with others); else `<checkpoint>/.moeflow` when it can
    be written or holds stores already (a read-only prebuilt store is used in place); else a folder of
    the per-user cache keyed by the checkpoint's content fingerprint (`identity`, when the caller has
    it already). A note says when the root is read-only or in the cache. `checkpoint_dir` may be
    a repo id (models/hub.py resolves it).

    ConfigError naming store_dir: an empty path, a path in /proc or /sys, a file, or no writable place.
    """
    if override is not None:
        return StoreLocation(check_store_dir(override))
    if not checkpoint_dir.is_dir():
        checkpoint_dir = resolve_model(checkpoint_dir)
    cache_root = cache_dir or user_cache_dir()
    snapshot = hub_snapshot(checkpoint_dir)
    if snapshot is not None:
        cache = cache_root / "hub" / snapshot.repo_id.replace("/", "--") / snapshot.commit
        _make_cache(cache, f"{checkpoint_dir} is a Hugging Face cache snapshot")
        return StoreLocation(
            cache, f"{checkpoint_dir} is a Hugging Face cache snapshot ({snapshot.repo_id} at {snapshot.commit}): "
                   f"the expert store lives in {cache} (set store_dir to choose)", expected=True)
    beside = checkpoint_dir / DEFAULT_DIR
    if _writable(beside):
        return StoreLocation(beside)
    if any(beside.glob(f"*/{MANIFEST}")):
        return StoreLocation(
            beside,
            f"{beside} is read-only: its stores are used as they are, a rebuild needs store_dir (a writable folder)",
        )
    real = os.path.realpath(checkpoint_dir)
    # keyed by content, so every caller (engine, convert, verify) finds the same folder, and a copy
    # of the same weights shares it
    key = identity() if identity is not None else Checkpoint(checkpoint_dir).fingerprint()
    cache = cache_root / f"{Path(real).name}-{xxhash.xxh3_64_hexdigest(key.encode())}"
    _make_cache(cache, f"{checkpoint_dir} is read-only")
    return StoreLocation(cache, f"{checkpoint_dir} is read-only: the expert store lives in {cache} (set store_dir to choose)")


def _make_cache(cache: Path, why: str) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"store_dir: {why} and the cache folder {cache} cannot be made ({e.strerror}); "
            f"set store_dir (or MOEFLOW_CACHE) to a writable folder"
        ) from e


def store_root(checkpoint_dir: Path, override: str | os.PathLike[str] | None) -> Path:
    """resolve_store_root's folder; a fallback to the user cache is logged as a warning."""
    return located_store(checkpoint_dir, override).root


def located_store(checkpoint_dir: Path, override: str | os.PathLike[str] | None, *,
                  identity: Callable[[], str] | None = None) -> StoreLocation:
    """resolve_store_root, with its note logged: a warning for a fallback (a read-only checkpoint), else info."""
    location = resolve_store_root(checkpoint_dir, override, identity=identity)
    if location.note:
        log.log(logging.INFO if location.expected else logging.WARNING, "%s", location.note)
    return location
