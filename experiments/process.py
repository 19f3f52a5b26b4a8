"""Calling a function in a fresh Python interpreter, so that a crash, a kill or its peak memory
stays its own: the benchmark runs each job this way, the tiling benchmark each panel size.

The interpreter runs ``python -m experiments.process CALL``: a command Fabric can start again
for the other ranks of a DDP job (``python -c`` cannot be), and one that dies with the process
that started it (on Linux), so a lost runner or Ray worker leaves no job behind writing into a
folder that a retry works in.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The pid of the process that started a fresh interpreter, for it alone (it takes it out of its
# environment, so the ranks Fabric starts from it do not see it).
PARENT_VARIABLE = "EXPERIMENTS_PROCESS_PARENT"


class FreshProcessError(RuntimeError):
    """A call in a fresh interpreter that raised, crashed, was killed or timed out; ``reason``
    says why in one line; ``signal``: the signal that killed it from outside (not a timeout's)."""

    def __init__(self, call: str, reason: str, signal: int | None = None) -> None:
        super().__init__(f"{call} failed: {reason}")
        self.reason = reason
        self.signal = signal


def _code_path() -> str:
    """PYTHONPATH for the fresh interpreter: the folder this project's packages are imported
    from first, so that it runs the code this process runs from any working folder (a checkout
    used without installing it, or installed for another path)."""
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])


def call_in_fresh_process(
    function: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any
) -> Any:
    """``function(*args, **kwargs)`` in a new interpreter (same Python, environment and working
    folder) and its result. Arguments and result travel as JSON (paths as text); the function is
    imported there by its module and name, so it must be a module-level function of an
    importable module. Raises ``FreshProcessError`` when the call does not return: its reason is
    the last line the process wrote to stderr (a leading ``error:`` dropped), or that it was
    killed by a signal or timed out after ``timeout_s`` seconds (it is then killed)."""
    if function.__module__ == "__main__" or "." in function.__qualname__:
        raise ValueError(f"{function.__qualname__} cannot be imported by a fresh process")
    call = f"{function.__name__}{tuple(map(str, args))}"
    payload = json.dumps(
        {"module": function.__module__, "name": function.__name__, "args": args, "kwargs": kwargs},
        default=str,
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "experiments.process", payload],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, PARENT_VARIABLE: str(os.getpid()), "PYTHONPATH": _code_path()},
        )
    except subprocess.TimeoutExpired:
        raise FreshProcessError(call, f"timed out after {timeout_s} s") from None
    if done.returncode < 0:
        raise FreshProcessError(call, f"killed by signal {-done.returncode}", -done.returncode)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1].removeprefix("error: ") if lines else f"exit status {done.returncode}"
        raise FreshProcessError(call, reason)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the one that started it ends; and die now if that
    one ended before the request was made (the interpreter takes a moment to start)."""
    parent = os.environ.pop(PARENT_VARIABLE, None)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if parent is not None and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    # Import the function by name, call it, print its JSON result last.
    _die_with_parent()
    call = json.loads(sys.argv[1])
    function = getattr(importlib.import_module(call["module"]), call["name"])
    print(json.dumps(function(*call["args"], **call["kwargs"])))
