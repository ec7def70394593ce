"""Helpers shared by the benchmark scripts: medians over repeats, the machine, a result table."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

from ae_core.hardware import usable_cores


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of `fn` over `repeats` runs (shared machines are noisy)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cores = usable_cores()
    return f"{platform.processor() or platform.machine()}, {cores} cores, Python {platform.python_version()}"


def table(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v: object) -> str:
    return f"{v:,.3f}" if isinstance(v, float) else str(v)
