"""How many threads a forward pass gets: measured, not assumed.

Using every core is fastest on a quiet machine and a disaster on a busy one: a decode step of
a 1.1B model runs 200 parallel regions (155 matmuls, 45 norms), each ending at a barrier, and
a region is as slow as its slowest thread. When another process holds one of two cores, the thread sharing that core
gets half of it (or waits a scheduler tick to run at all), and every region waits for it:
on 2 cores beside one busy process, 2 threads decoded at half of one thread's speed (the 1.1B
model, BENCHMARKS.md; issue 13 saw 10x on a busier machine). No fixed count is right for both
cases, and the load changes while a chat runs, so the ``ThreadGovernor`` decides per forward
pass from the times it observes:

- it runs the best count it knows (the *incumbent*, at first every core the CPU quota
  allows), keeping a moving average of its step time per batch size (1..8 rows: decode and
  batched decode; larger forwards, prefill, use the count decode found best);
- once the first steps are timed it tries each other candidate once (all cores, all but one,
  half, one), then again every ``EXPLORE_EVERY`` steps, and at once when two steps in a row are
  much slower than the incumbent's average (load arrived; one slow step is often just jitter);
- a candidate whose step beats the incumbent's average by ``SWITCH_MARGIN`` becomes the incumbent.

On a quiet machine that costs one slower step in EXPLORE_EVERY (1-3 %); under load it
switches within three steps. ``NumbaBackend(threads=N)`` fixes the count instead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

EXPLORE_EVERY = 32     # steps between trials of another thread count
SLOW_STEP = 2.0        # two steps in a row this many times the incumbent's average trigger a trial
SWITCH_MARGIN = 0.95   # a trial must beat the incumbent's average by 5 %
AVERAGE_WEIGHT = 0.25  # weight of the newest step in the incumbent's moving average
WARMUP_STEPS = 2       # first steps of a batch size (compiling, paging in) are not timed
MAX_ADAPTED_ROWS = 8   # forwards of more rows (prefill) use the count decode found best


def candidates(most: int) -> list[int]:
    """The thread counts worth trying on ``most`` cores, best guess first."""
    return sorted({most, max(1, most - 1), max(1, most // 2), 1}, reverse=True)


@dataclass
class _RowStats:
    incumbent: int
    average: float | None = None       # seconds per step of the incumbent
    steps: int = 0
    tried: dict = field(default_factory=dict)   # candidate -> its last trial's seconds
    next_trial: int = 0                         # index into the other candidates, round robin
    slow_steps: int = 0                         # the incumbent's consecutive slow steps


class ThreadGovernor:
    """Chooses each forward's thread count among ``candidates(most)`` from measured step times."""

    def __init__(self, most: int):
        self.most = most
        self.options = candidates(most)
        self._stats: dict[int, _RowStats] = {}
        self._pending = None   # (rows key, count, start time) of the forward in flight
        self.switches = 0      # how often the incumbent changed (reported by --verbose)

    @property
    def current(self) -> int:
        """The count decode runs with now (the one-row incumbent)."""
        s = self._stats.get(1)
        return s.incumbent if s else self.most

    def start(self, rows: int) -> int:
        """The thread count for a forward of ``rows`` rows, starting now."""
        if len(self.options) == 1:
            return self.most
        if rows > MAX_ADAPTED_ROWS:
            self._pending = None
            return self.current
        s = self._stats.setdefault(rows, _RowStats(self.most))
        s.steps += 1
        n = s.incumbent
        untried = [c for c in self.options if c != s.incumbent and c not in s.tried]
        if s.steps > WARMUP_STEPS and s.average is not None and (
                untried or s.steps % EXPLORE_EVERY == 0 or s.slow_steps >= 2):
            others = [c for c in self.options if c != s.incumbent]
            n = untried[0] if untried else others[s.next_trial % len(others)]
            s.next_trial += not untried
            s.slow_steps = 0
        self._pending = (rows, n, time.perf_counter())
        return n

    def finish(self) -> None:
        """The forward started by the last ``start`` has ended."""
        if self._pending is None:
            return
        rows, n, t0 = self._pending
        self._pending = None
        seconds = time.perf_counter() - t0
        s = self._stats[rows]
        if s.steps <= WARMUP_STEPS:
            return
        if n == s.incumbent:
            slow = s.average is not None and seconds > SLOW_STEP * s.average
            s.slow_steps = s.slow_steps + 1 if slow else 0
            s.average = seconds if s.average is None else \
                (1 - AVERAGE_WEIGHT) * s.average + AVERAGE_WEIGHT * seconds
            return
        s.tried[n] = seconds
        if seconds < SWITCH_MARGIN * s.average:
            s.incumbent, s.average = n, seconds
            self.switches += 1
