"""An exclusive run lock: one run at a time on a workspace or an output folder.

The exclusion is the operating system's: an ``flock`` on the lock file, taken through filelock's
``FileLock`` without waiting. The kernel drops it when its holder exits or is killed, so a dead
run leaves nothing to judge stale, and the lock file is never deleted (deleting a lock file that
others have open would let two runs each lock a different file under the same name).

Who holds it (pid, host, start time) is written to ``<lock>.holder.json`` only once the lock is
held, and serves messages only: ``LockHeld`` names the holder, and a holder file still present
when the lock is taken was left by a run that died holding it (``stale_cleared``, which callers
log). A missing, corrupt or outdated holder file (a pid since reused) never decides who gets the
lock.

Limitation: ``flock`` excludes the processes of one host on a local filesystem. Across hosts
sharing a network folder it holds only where the mount forwards locks to the server (Linux NFS
does, unless mounted ``nolock`` or ``local_lock``); do not rely on it between machines. On a
filesystem without ``flock`` ``acquire`` fails with ``OSError`` (ENOSYS) rather than fall back
to a lock by file existence.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from artifacts.io import atomic_write_json

# Holds taken and not released yet. A dropped RunLock does not free its lock: the hold is the
# process's until release() or exit, as callers that keep no reference expect.
_HELD: set[FileLock] = set()


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


class RunLock:
    """An exclusive, non-blocking lock on ``path``: ``acquire`` raises ``LockHeld`` at once while
    another process (or another ``RunLock`` in this one) holds it.

    ``stale_cleared`` is None, or after ``acquire`` the holder info a dead previous holder left
    (``{}`` when unreadable). Acquiring an object that already holds the lock raises
    ``RuntimeError`` (a bug in the caller, not another run): release it first.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.holder_path = self.path.with_name(self.path.name + ".holder.json")
        self.stale_cleared: dict[str, Any] | None = None
        self._lock: FileLock | None = None
        self._owner_pid: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, then record this process as its holder; returns self."""
        if self._lock is not None and self._owner_pid == os.getpid():
            raise RuntimeError(f"{self.path} is already held by this RunLock; release it first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # thread_local=False: the hold is the process's, whichever thread releases it.
        lock = FileLock(self.path, timeout=0, thread_local=False, fallback_to_soft=False)
        try:
            lock.acquire()
        except Timeout:
            raise LockHeld(self._held_message()) from None
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            reason = "no flock on this filesystem: the run lock needs one (use a local disk)"
            raise OSError(exc.errno, reason, str(self.path)) from exc
        try:
            # Under the lock, a holder file can only be one its writer never removed.
            self.stale_cleared = self._read_holder()
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            atomic_write_json(self.holder_path, me)
        except BaseException:
            lock.release()
            raise
        self._lock, self._owner_pid = lock, os.getpid()
        _HELD.add(lock)
        return self

    def release(self) -> None:
        """Remove the holder file, then free the lock. A no-op unless this object holds it in
        this process (a forked child must not free its parent's lock)."""
        lock, self._lock = self._lock, None
        if lock is None or self._owner_pid != os.getpid():
            return
        try:
            self.holder_path.unlink(missing_ok=True)
        finally:
            _HELD.discard(lock)
            lock.release()

    def _read_holder(self) -> dict[str, Any] | None:
        """The holder file's content: None when absent, ``{}`` when unreadable."""
        try:
            holder = json.loads(self.holder_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _held_message(self) -> str:
        holder = self._read_holder() or {}
        try:
            who = f"pid {holder['pid']} on {holder['host']} since {time.ctime(holder['started'])}"
        except (KeyError, TypeError, ValueError, OverflowError, OSError):
            # Being taken or released right now, or its holder file was damaged.
            who = f"another process (`fuser -v {self.path}` names it)"
        return (
            f"{self.path} is held by {who}: another run is in progress; wait for it to end "
            "(its lock is freed when it exits, even if killed)"
        )

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
