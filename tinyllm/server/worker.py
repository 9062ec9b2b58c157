"""The one thread that owns the model, and the FIFO queue of requests waiting for it.

The model holds a single KV cache, so requests run one at a time, in arrival order. The
generation loop is blocking Python/NumPy/Numba code; running it here keeps the event loop
free to accept, queue, stream and notice disconnects. Results travel back to the event loop
through an asyncio queue per job.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import AsyncIterator, Callable, Iterator

from tinyllm.errors import TinyLLMError

log = logging.getLogger("tinyllm.server")


class QueueFull(Exception):
    pass


class GenerationFailed(Exception):
    """The model raised while running a request (the worker survives it)."""


class Job:
    """One request's generation. Create it on the event loop; ``run(cancelled)`` is called on
    the worker thread and returns the iterator of text pieces."""

    def __init__(self, run: Callable[[threading.Event], Iterator[str]]):
        self._run = run
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop this job: dropped if still waiting, stopped after its current token if running."""
        self.cancelled.set()

    def _post(self, kind: str, value=None) -> None:  # worker thread -> event loop
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()

    def _execute(self) -> str:
        pieces = None
        try:
            pieces = self._run(self.cancelled)
            for piece in pieces:
                self._post("piece", piece)
                if self.cancelled.is_set():
                    break
        except Exception as e:
            log.exception("generation failed")
            # a TinyLLMError says what is wrong with the model (NaN logits, ...); anything else
            # is a bug whose details belong in the server log, not in a client's answer
            hidden = f"internal error ({type(e).__name__}; the server log has the details)"
            self._post("error", GenerationFailed(str(e) if isinstance(e, TinyLLMError) else hidden))
            return "failed"
        finally:
            if pieces is not None:
                pieces.close()
        outcome = "cancelled" if self.cancelled.is_set() else "completed"  # before "end" lets the client go
        self._post("end")
        return outcome

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces, on the event loop; raises GenerationFailed if the model failed."""
        while True:
            kind, value = await self._events.get()
            if kind == "piece":
                yield value
            elif kind == "end":
                return
            else:
                raise value


class ModelWorker:
    """Runs jobs one at a time, first in first out; at most ``max_queue`` wait behind the running one."""

    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._current: Job | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="tinyllm-model", daemon=True)
        self._thread.start()

    def cancel_all(self) -> None:
        """Cancel the running job and every waiting one (the lock is reentrant: a signal
        handler interrupting this thread inside it cannot deadlock)."""
        with self._cond:
            for job in [*self._waiting, *([self._current] if self._current else [])]:
                job.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self.cancel_all()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many requests are ahead of it. Raises QueueFull."""
        with self._cond:
            self._drop_cancelled()
            if len(self._waiting) >= self.max_queue and (self._current is not None or self._waiting):
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model")
            ahead = len(self._waiting) + (self._current is not None)
            self._waiting.append(job)
            self._cond.notify()
            return ahead

    def stats(self) -> dict:
        with self._cond:
            self._drop_cancelled()
            return {"busy": self._current is not None, "waiting": len(self._waiting), **self.counts}

    def _drop_cancelled(self) -> None:
        if any(j.cancelled.is_set() for j in self._waiting):
            kept = [j for j in self._waiting if not j.cancelled.is_set()]
            self.counts["cancelled"] += len(self._waiting) - len(kept)
            self._waiting = deque(kept)

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._stopping:
                    return None
                if self._waiting:
                    self._current = self._waiting.popleft()
                    return self._current
                self._cond.wait()

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            try:
                outcome = job._execute()
            except BaseException:  # never let one request end the worker
                log.exception("worker error")
                outcome = "failed"
            with self._cond:
                self.counts[outcome] += 1
                self._current = None
