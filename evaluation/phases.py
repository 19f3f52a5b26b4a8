"""Wall time of a long run's named phases (the ensemble's: members, folds, fits, scoring...),
each logged as it ends and kept, in order, for the run's results."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class PhaseClock:
    """``with clock("fits"): ...`` times one phase; ``seconds`` holds each phase's wall time in
    the order they ran (a phase run twice adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
            log.info("%s took %.1f s", name, elapsed)
