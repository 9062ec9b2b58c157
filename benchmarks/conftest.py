"""Shared fixtures of the benchmark suite, and the summary it prints (and saves as JSON).

    pytest benchmarks/ --benchmark-only            # everything (~15 min on 2 cores)
    pytest benchmarks/test_end_to_end.py --benchmark-only

TINYLLM_BENCH_THREADS sets the thread count of both engines (default: all cores);
TINYLLM_BENCH_DIR where the benchmark model and the results JSON go (~/.cache/tinyllm/bench).
"""
from __future__ import annotations

import json
import os
import platform
import time

import pytest

from tinyllm.kernels import numba_cpu

from .bench_model import bench_dir

RESULTS: dict = {}   # name -> {metric: value}, filled by the benchmarks, printed at the end


def bench_threads() -> int:
    return int(os.environ.get("TINYLLM_BENCH_THREADS", numba_cpu.available_cores()))


@pytest.fixture(scope="session", autouse=True)
def threads():
    n = numba_cpu.set_threads(bench_threads())
    yield n
    numba_cpu.set_threads()


@pytest.fixture(autouse=True)
def quiet_thread_pools():
    """Let the previous test's thread pools go idle first: OpenBLAS's and OpenMP's workers
    spin for a while after each call, and a Numba kernel timed right after a BLAS call
    measured up to 2x slower (their spinning threads hold the cores)."""
    time.sleep(0.5)


def record(name: str, **metrics) -> None:
    RESULTS.setdefault(name, {}).update(metrics)


def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": numba_cpu.available_cores(), "python": platform.python_version(),
            "simd_width": numba_cpu.default_simd_width(), "load_average_at_end": load}


def add_ratios() -> None:
    """For every "<what> tinyllm" measured next to "<what> llama.cpp": the speed ratio."""
    for name in list(RESULTS):
        if name.endswith(" tinyllm") and f"{name[:-8]} llama.cpp" in RESULTS:
            ours, theirs = RESULTS[name], RESULTS[f"{name[:-8]} llama.cpp"]
            record(f"{name[:-8]}: tinyllm / llama.cpp", ratio=ours["median_tok_s"] / theirs["median_tok_s"])


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    add_ratios()
    tr = terminalreporter
    tr.section("tinyllm benchmark summary")
    info = machine()
    tr.write_line(f"machine: {info['cpu']}, {info['cores']} cores, SIMD width {info['simd_width']}, "
                  f"load average {info['load_average_at_end']}")
    for name in sorted(RESULTS):
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in RESULTS[name].items())
        tr.write_line(f"{name}: {metrics}")
    path = bench_dir() / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": info, "results": RESULTS}, indent=1))
    tr.write_line(f"saved {path}")
