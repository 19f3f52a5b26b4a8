"""Calling a function in a fresh Python interpreter, so that a crash, a kill or its peak memory
stays its own: the benchmark runs each job this way, the tiling benchmark each panel size."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

# Run by the new interpreter: import the function by name, call it, print its JSON result last.
CHILD = (
    "import importlib, json, sys; a = json.loads(sys.argv[1]); "
    "f = getattr(importlib.import_module(a['module']), a['name']); "
    "print(json.dumps(f(*a['args'], **a['kwargs'])))"
)


class FreshProcessError(RuntimeError):
    """A call in a fresh interpreter that raised, crashed, was killed or timed out; ``reason``
    says why in one line."""

    def __init__(self, call: str, reason: str) -> None:
        super().__init__(f"{call} failed: {reason}")
        self.reason = reason


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
            [sys.executable, "-c", CHILD, payload],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise FreshProcessError(call, f"timed out after {timeout_s} s") from None
    if done.returncode < 0:
        raise FreshProcessError(call, f"killed by signal {-done.returncode}")
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1].removeprefix("error: ") if lines else f"exit status {done.returncode}"
        raise FreshProcessError(call, reason)
    return json.loads(done.stdout.strip().splitlines()[-1])
