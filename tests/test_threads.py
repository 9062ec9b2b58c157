"""The thread governor (kernels/threads.py) on a simulated clock: it keeps every core on a quiet
machine, drops to fewer within a step or two when another process takes a core, and comes back."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from tinyllm.kernels import numba_cpu, threads
from tinyllm.kernels.threads import EXPLORE_EVERY, ThreadGovernor, candidates


class Machine:
    """A fake clock: a forward on n threads takes step(n, busy) seconds."""

    def __init__(self, monkeypatch):
        self.now, self.busy = 0.0, False
        monkeypatch.setattr(threads.time, "perf_counter", lambda: self.now)

    def step(self, governor: ThreadGovernor, rows: int = 1) -> int:
        n = governor.start(rows)
        # quiet: 2 threads 10 ms, 1 thread 16 ms (memory-bound decode); busy: the thread that
        # shares a core with the other process stalls every region: 2 threads 120 ms
        self.now += {(2, False): 0.010, (1, False): 0.016, (2, True): 0.120, (1, True): 0.017}[n, self.busy]
        governor.finish()
        return n


def test_candidates():
    assert candidates(1) == [1]
    assert candidates(2) == [2, 1]
    assert candidates(16) == [16, 15, 8, 1]


def test_quiet_machine_keeps_every_core(monkeypatch):
    m, g = Machine(monkeypatch), ThreadGovernor(2)
    used = [m.step(g) for _ in range(200)]
    assert used.count(1) <= 200 // EXPLORE_EVERY + 1   # one trial in EXPLORE_EVERY steps
    assert g.current == 2 and g.switches == 0


def test_load_arriving_and_leaving(monkeypatch):
    m, g = Machine(monkeypatch), ThreadGovernor(2)
    for _ in range(20):
        m.step(g)
    m.busy = True
    used = [m.step(g) for _ in range(40)]
    assert used[:4].count(2) <= 3                        # two slow steps, then a trial of 1 thread
    assert used[4:].count(2) <= 40 // EXPLORE_EVERY + 1
    assert g.current == 1
    m.busy = False
    used = [m.step(g) for _ in range(EXPLORE_EVERY + 2)]
    assert g.current == 2 and used[-1] == 2
    assert g.switches == 2


def test_batch_sizes_are_measured_apart_and_prefill_follows_decode(monkeypatch):
    m, g = Machine(monkeypatch), ThreadGovernor(2)
    m.busy = True
    for _ in range(10):
        m.step(g, rows=1)
    assert g.current == 1
    assert g.start(128) == 1      # prefill: decode's best count, not timed itself
    g.finish()
    assert g.start(3) == 2        # a batch of 3 rows starts from every core and is measured apart


def test_fixed_threads_have_no_governor_and_the_default_adapts():
    assert numba_cpu.NumbaBackend(threads=1).governor is None
    b = numba_cpu.NumbaBackend()
    assert b.governor is not None and b.threads_now == b.threads
    b.begin(1)
    assert numba.get_num_threads() == b.threads
    b.end()


def test_results_do_not_depend_on_the_count_the_governor_picks():
    rng = np.random.default_rng(0)
    from tinyllm.kernels import quant

    w = quant.quantize(rng.standard_normal((33, 200)).astype(np.float32), "q4_k")
    x = rng.standard_normal((1, 200)).astype(np.float32)
    b = numba_cpu.NumbaBackend()
    outs = []
    for n in (1, numba_cpu.NumbaBackend().threads):
        numba.set_num_threads(n)
        outs.append(b.matmul(x, w))
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(Exception, match="threads must be an integer"):
        numba_cpu.NumbaBackend(threads=bad)


SERIAL_SCRIPT = """
import sys, threading, warnings
import tinyllm
from tinyllm.kernels import numba_cpu
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    models = [tinyllm.load(sys.argv[1], backend="numba") for _ in range(2)]
assert numba_cpu.threading_layer() == "workqueue" and all(m.ops.serial for m in models)
assert any(issubclass(w.category, numba_cpu.ThreadingLayerWarning) for w in caught), caught
outs = {}
def run(i):
    outs[i] = models[i].generate("Once upon a time", max_new_tokens=48, temperature=0, stream=False)
runs = [threading.Thread(target=run, args=(i,)) for i in range(2)]
for t in runs: t.start()
for t in runs: t.join()
assert outs[0] == outs[1] and outs[0], outs
print("both answered")
"""


def test_numba_without_openmp_runs_forwards_one_at_a_time(stories_q8):
    # Numba's fallback layer (no libgomp, no TBB) aborts the process when two threads launch
    # parallel kernels at once, as a server with --parallel 2 does; forwards take turns there
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    done = subprocess.run([sys.executable, "-c", SERIAL_SCRIPT, str(stories_q8)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "both answered" in done.stdout, done.stderr[-2000:]
    # and the command line says so in one line
    cli = subprocess.run([sys.executable, "-m", "tinyllm", "generate", str(stories_q8), "-p", "Once", "-n", "4"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr[-2000:]
    warning = [line for line in cli.stderr.splitlines() if "threading layer" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: Numba found no OpenMP"), cli.stderr
    assert "warnings.warn" not in cli.stderr and "return " not in cli.stderr


def test_a_failed_forward_ends_and_frees_the_next(stories_q8, monkeypatch):
    import tinyllm

    model = tinyllm.load(stories_q8, backend="numba")
    monkeypatch.setattr(model.ops, "serial", True)          # as on the workqueue layer
    expected = model.logits([1, 2, 3])

    def broken(*args, **kwargs):
        raise RuntimeError("a kernel failed")

    with monkeypatch.context() as m:
        m.setattr(model.arch, "forward", broken)
        with pytest.raises(RuntimeError, match="a kernel failed"):
            model.logits([1, 2, 3])
    assert not numba_cpu._one_forward_at_a_time.locked()
    np.testing.assert_array_equal(model.logits([1, 2, 3]), expected)


def test_the_threading_layer_is_named():
    from tinyllm.benchmark import threads_in_words

    layer = numba_cpu.threading_layer()
    assert layer in ("tbb", "omp", "workqueue")
    assert f"Numba's {layer} threading layer" in threads_in_words(numba_cpu.NumbaBackend())
    assert f"Numba's {layer} threading layer" in threads_in_words(numba_cpu.NumbaBackend(threads=1))
