"""Temporary folders of store builds: marked with their owner (pid and process start time), removed once it is gone.

A folder is only ever removed when it holds moeflow's marker file: a store root may be a shared
folder, and a user's `.tmp-notes/` must survive. The owner's start time tells a dead owner from a
live process that reuses its pid.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

log = logging.getLogger("moeflow.store")

TMP_PREFIX = ".tmp-"
MARKER = ".moeflow-build"


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None when it is not running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return -1 if _pid_exists(pid) else None  # unreadable: alive, start time unknown
    # the command name (field 2) may hold spaces and parentheses: fields after the last ')' are fixed
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_alive(marker: dict[str, object]) -> bool:
    pid, start, host = marker.get("pid"), marker.get("start"), marker.get("host")
    if host != socket.gethostname():
        return True  # a build on another machine sharing this folder: not ours to judge
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    if not Path("/proc/self/stat").exists():
        return _pid_exists(pid)
    now = process_start_time(pid)
    return now is not None and (now == -1 or now == start)


def make_tmp(root: Path, label: str) -> Path:
    """A new marked temporary folder in `root` (which must exist)."""
    tmp = root / f"{TMP_PREFIX}{label}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    marker = {"pid": os.getpid(), "start": process_start_time(os.getpid()), "host": socket.gethostname()}
    try:
        (tmp / MARKER).write_text(json.dumps(marker))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours, just made, never marked: nothing else can be in it
        raise
    return tmp


def remove_tmp(tmp: Path) -> None:
    """Remove a marked folder, marker last, so a removal cut short (kill -9) leaves a folder still marked."""
    if not tmp.is_dir():
        return
    for child in tmp.iterdir():
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (tmp / MARKER).unlink(missing_ok=True)
    try:
        tmp.rmdir()
    except OSError:
        pass  # another cleaner got there first, or something new appeared: never force it


def clean_stale_tmp(root: Path) -> list[Path]:
    """Remove marked leftovers of builds whose owner process is gone; returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for tmp in entries:
        if not tmp.name.startswith(TMP_PREFIX) or tmp.is_symlink() or not tmp.is_dir():
            continue
        try:
            marker = json.loads((tmp / MARKER).read_text())
        except (OSError, ValueError):
            continue  # not ours (or not yet marked by a live build): never touched
        if not isinstance(marker, dict) or _owner_alive(marker):
            continue
        log.info("removing %s, left by build process %s which is gone", tmp, marker.get("pid"))
        try:
            remove_tmp(tmp)
        except OSError as e:  # a read-only store root: opening its store must still work
            log.warning("cannot remove %s, left by a build that is gone (%s)", tmp, e.strerror)
            continue
        removed.append(tmp)
    return removed
