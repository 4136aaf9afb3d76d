"""The build lock of a store root: an exclusive flock that serialises conversions across processes."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("moeflow.store")

LOCK_FILE = ".build.lock"


@dataclass
class BuildLock:
    """Held while a process builds stores in `root`; `waited` says another process held it first."""

    root: Path
    waited: bool


@contextmanager
def build_lock(root: Path) -> Iterator[BuildLock]:
    """Hold the exclusive build lock of `root` (made if needed), waiting for another holder.

    The lock file is unlinked before it is released so that nothing is left behind; a waiter that
    then gets the lock on the unlinked file notices (the path no longer names its file) and retries
    on a fresh one, so two processes never both hold the lock of one root.
    """
    path = root / LOCK_FILE
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                waited = True
                log.info("waiting for another process building the expert store in %s", root)
                fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C interrupts this wait (PEP 475 runs the handler)
            try:
                now, held = os.stat(path), os.fstat(fd)
                same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield BuildLock(root, waited)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
