"""An exclusive run lock: one run at a time on a workspace or an output folder.

A lock file left by a dead process on this host is stale: it is reported, cleared and taken.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class LockHeld(RuntimeError):
    """Another live run holds the workspace lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock file. A lock left by a dead process on this host is stale: it is
    reported, cleared and taken. A lock held by a live process raises ``LockHeld``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.stale_cleared: dict[str, Any] | None = None

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: written by a process killed mid-write

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue
                same_host = holder.get("host") in (None, me["host"])
                pid = holder.get("pid")
                if same_host and (not isinstance(pid, int) or not _pid_alive(pid)):
                    self.stale_cleared = holder
                    self.path.unlink(missing_ok=True)
                    continue
                raise LockHeld(
                    f"{self.path} is held by pid {pid} on {holder.get('host')} since "
                    f"{time.ctime(holder.get('started', 0))}; another run is in progress"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return self
        raise LockHeld(f"could not take {self.path}: it keeps being re-created")

    def release(self) -> None:
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
