"""The memory of this process: resident now and at its peak."""

from __future__ import annotations

import resource
import sys


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far. Linux's ``VmHWM`` belongs to the process
    image; ``ru_maxrss`` survives ``exec``, so in a freshly started job it would report its
    parent's peak whenever that is higher (it is the fallback elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return peak_rss_bytes() / 2**20
