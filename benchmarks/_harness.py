"""Shared helpers for the benchmark scripts: interleaved repetitions and medians, so
ratios measured in one run hold on a noisy, shared machine."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def interleave(candidates: dict[str, Callable[[], float | None]], rounds: int) -> dict[str, list[float]]:
    """Run A B C A B C ... `rounds` times; each callable returns its own measurement
    in seconds (or None to use wall time)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            measured = fn()
            times[name].append(measured if measured is not None else time.perf_counter() - t0)
            print(f"  round {r + 1}/{rounds} {name}: {times[name][-1]:.3f}s", file=sys.stderr, flush=True)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def hxc(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "hxc.cli", *args], capture_output=True, text=True, env=full_env, check=True)


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    data = {"machine": {"cpu": _cpu(), "cores": __import__("os").cpu_count(), "python": platform.python_version()},
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}  # fmt: skip
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
