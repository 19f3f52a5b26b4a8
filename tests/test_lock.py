"""The run lock under contention: processes racing for it, holders killed with SIGKILL at random
points, holder files that lie.

Exclusion is checked from a log every contender appends to (O_APPEND, one write a line) while it
holds the lock: ``in PID STALE`` once acquired (STALE: the pid in ``stale_cleared``, or ``-``) and
``out PID`` before releasing. The killer adds ``kill PID`` while its victim is frozen (SIGSTOP),
just before the SIGKILL. A correct lock gives a log in which no ``in`` comes while another pid
holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from artifacts import lock as lock_module
from artifacts.lock import LockHeld, RunLock

REPO = Path(__file__).resolve().parents[1]

# One contender: takes the lock as often as it can from START to END, holding it up to HOLD s.
# The lock module is loaded from a file so the same checks can run on another implementation.
_CONTENDER = r"""
import importlib.util, os, random, sys, time
module_file, path, log, start, end, hold = sys.argv[1:]
spec = importlib.util.spec_from_file_location("lock_under_test", module_file)
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
fd = os.open(log, os.O_WRONLY | os.O_APPEND)
pid, hold = os.getpid(), float(hold)
time.sleep(max(0.0, float(start) - time.time()))
while time.time() < float(end):
    try:
        held = lock.RunLock(path).acquire()
    except lock.LockHeld:
        time.sleep(random.uniform(0, 0.002))
        continue
    stale = held.stale_cleared
    os.write(fd, f"in {pid} {'-' if stale is None else stale.get('pid')}\n".encode())
    time.sleep(random.uniform(0, hold))
    os.write(fd, f"out {pid}\n".encode())
    held.release()
    time.sleep(random.uniform(0, hold))
"""


@dataclass
class Replay:
    """What a log shows: who held the lock, how often, and every violation."""

    acquisitions: int = 0
    holders: set[str] = field(default_factory=set)
    kills: int = 0
    kills_of_holders: int = 0
    stale_reports: int = 0
    holder: str | None = None
    errors: list[str] = field(default_factory=list)


def replay(text: str) -> Replay:
    """Check a log line by line (a last line still being written is left out)."""
    seen = Replay()
    killed: set[str] = set()
    killed_holder = None  # a holder killed since the last acquisition: the next one reports it
    for n, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), 1):
        event, pid, *rest = line.split()
        if event == "in":
            if seen.holder is not None:
                seen.errors.append(f"line {n}: {pid} took the lock {seen.holder} held")
            if pid in killed:
                seen.errors.append(f"line {n}: {pid} took the lock after it was killed")
            stale = rest[0]
            if killed_holder is not None and stale != killed_holder:
                seen.errors.append(f"line {n}: {pid} did not report {killed_holder} (killed)")
            if stale != "-" and stale not in killed:
                seen.errors.append(f"line {n}: {pid} reported {stale}, never killed, as stale")
            seen.holder, killed_holder = pid, None
            seen.acquisitions += 1
            seen.stale_reports += stale != "-"
            seen.holders.add(pid)
        elif event == "out":
            if seen.holder != pid:
                seen.errors.append(f"line {n}: {pid} released a lock {seen.holder} held")
            seen.holder = None
        else:  # kill: its victim is frozen, so whatever it held it holds until this line
            seen.kills += 1
            killed.add(pid)
            if seen.holder == pid:
                seen.kills_of_holders += 1
                seen.holder, killed_holder = None, pid
    return seen


def contend(
    tmp_path: Path,
    *,
    processes: int,
    seconds: float,
    hold: float,
    kill: bool,
    lock_file: str = lock_module.__file__,
) -> tuple[Replay, int]:
    """Run ``processes`` contenders for ``seconds`` (after a second to start them all); with
    ``kill``, SIGKILL one every few tens of milliseconds (half the time the holder), replace it,
    and wait for someone to take the lock after each kill. The replayed log, processes started."""
    path, log = tmp_path / "lock", tmp_path / "log"
    log.touch()
    start = time.time() + 1.0
    end = start + seconds
    args = [str(lock_file), str(path), str(log), repr(start), repr(end), repr(hold)]

    def spawn() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _CONTENDER, *args], cwd=REPO)

    workers = {p.pid: p for p in (spawn() for _ in range(processes))}
    started, killed, starved = processes, [], []
    rng = random.Random(0)
    try:
        time.sleep(max(0.0, start - time.time()))
        while kill and time.time() < end - 1.5:
            time.sleep(rng.uniform(0.01, 0.05))
            holder, aim = replay(log.read_text()).holder, rng.random() < 0.5
            waited = time.time()
            while aim and holder is None and time.time() - waited < 0.5:  # aim at a holder
                time.sleep(0.001)
                holder = replay(log.read_text()).holder
            victim = workers.pop(int(holder) if aim and holder else rng.choice(list(workers)))
            victim.send_signal(signal.SIGSTOP)
            os.waitpid(victim.pid, os.WUNTRACED)
            time.sleep(0.01)  # frozen: whatever it holds, nobody may take meanwhile
            with log.open("a") as fh:
                fh.write(f"kill {victim.pid}\n")
            mark = log.stat().st_size
            victim.kill()
            victim.wait()
            killed.append(victim)
            new = spawn()
            workers[new.pid], started = new, started + 1
            waited = time.time()
            while "\nin " not in "\n" + log.read_text()[mark:]:
                if time.time() - waited > 5:
                    starved.append(victim.pid)
                    break
                time.sleep(0.005)
        for p in workers.values():
            assert p.wait(timeout=end - time.time() + 30) == 0
    finally:
        for p in [*workers.values(), *killed]:
            p.kill()
            p.wait()
    seen = replay(log.read_text())
    seen.errors += [f"nobody took the lock after {pid} was killed" for pid in starved]
    return seen, started


def test_racing_processes_hold_the_lock_one_at_a_time(tmp_path):
    seen, started = contend(tmp_path, processes=12, seconds=3.0, hold=0.001, kill=False)
    print(f"{started} processes, {seen.acquisitions} acquisitions by {len(seen.holders)}")
    assert seen.errors == []
    assert (tmp_path / "lock").exists()  # never deleted
    assert seen.acquisitions >= 30 and len(seen.holders) >= 4


def test_holders_killed_at_random_points_free_the_lock_and_are_reported(tmp_path):
    seen, started = contend(tmp_path, processes=6, seconds=4.0, hold=0.02, kill=True)
    print(
        f"{started} processes, {seen.acquisitions} acquisitions by {len(seen.holders)}, "
        f"{seen.kills} kills ({seen.kills_of_holders} of holders), "
        f"{seen.stale_reports} dead holders reported"
    )
    assert seen.errors == []
    assert seen.kills >= 5 and seen.kills_of_holders >= 3 and seen.acquisitions >= 20


def _hold(path: Path) -> subprocess.Popen:
    """A process that takes the lock on ``path`` and keeps it until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from artifacts.lock import RunLock; "
            f"RunLock({str(path)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_holder_file_naming_a_live_pid_does_not_hold_the_lock(tmp_path):
    lock = RunLock(tmp_path / "lock")
    for pid in (os.getpid(), 1):  # a pid reused by a live process: this one, or init
        left = {"pid": pid, "host": socket.gethostname(), "started": time.time() - 60}
        lock.holder_path.write_text(json.dumps(left))
        lock.acquire()
        assert lock.stale_cleared == left
        assert json.loads(lock.holder_path.read_text())["pid"] == os.getpid()
        lock.release()
        assert not lock.holder_path.exists() and lock.path.exists()


def test_a_live_holder_blocks_whatever_its_holder_file_says(tmp_path):
    path = tmp_path / "lock"
    probe = RunLock(path)
    holder = _hold(path)
    try:
        with pytest.raises(LockHeld, match=rf"held by pid {holder.pid} on .+ since ") as exc:
            probe.acquire()
        assert str(path) in str(exc.value) and "wait for it to end" in str(exc.value)
        probe.holder_path.unlink()
        with pytest.raises(LockHeld, match=re.escape(f"{path} is held by another process")):
            probe.acquire()
        probe.holder_path.write_bytes(b"\x00{garbage")
        with pytest.raises(LockHeld, match="held by another process"):
            probe.acquire()
        probe.release()  # it holds nothing: the holder's file stays
        assert probe.holder_path.read_bytes() == b"\x00{garbage"
    finally:
        holder.kill()
        holder.wait()
    with RunLock(path) as lock:
        assert lock.stale_cleared == {}  # the holder died holding it, its file unreadable


def test_acquiring_twice_raises_and_keeps_the_lock(tmp_path):
    lock = RunLock(tmp_path / "lock").acquire()
    with pytest.raises(RuntimeError, match="already held by this RunLock"):
        lock.acquire()
    with pytest.raises(LockHeld):
        RunLock(tmp_path / "lock").acquire()
    lock.release()
    lock.release()
    with RunLock(tmp_path / "lock") as again:
        assert again.stale_cleared is None


def test_without_flock_acquire_fails_rather_than_lock_by_file_existence(tmp_path, monkeypatch):
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = RunLock(tmp_path / "lock")
    with pytest.raises(OSError, match="no flock on this filesystem") as exc:
        lock.acquire()
    assert exc.value.errno == errno.ENOSYS and str(lock.path) in str(exc.value)
    assert not lock.holder_path.exists()
