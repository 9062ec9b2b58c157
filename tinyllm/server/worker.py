"""The threads that run the model, and the FIFO queue of requests waiting for them.

With one slot (``parallel=1``) one thread owns the model and its single KV cache: requests
run one at a time, in arrival order. With N slots, N threads run a request each in a slot of a
``tinyllm.batching.Batcher`` (a KV cache of its own, kept between requests; a request gets
the free slot holding the longest prefix of its prompt, so a returning conversation reuses
it) and the running requests decode together, one forward pass per step for all of them
(continuous batching). The generation loop is blocking Python/NumPy/Numba code; running it
in these threads keeps the event loop free to accept, queue, stream and notice disconnects.
Results travel back to the event loop through an asyncio queue per job.
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
    """One request's generation. Create it on the event loop; ``run(cancelled, model)`` is
    called on a worker thread, with the model (or batch slot) to run on, and returns the
    iterator of text pieces."""

    def __init__(self, run: Callable[[threading.Event, object], Iterator[str]], prompt: list[int] | None = None):
        self._run, self.prompt = run, prompt  # prompt: token ids, for choosing the slot that holds most of them
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

    def _execute(self, model) -> str:
        pieces = None
        try:
            pieces = self._run(self.cancelled, model)
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
    """Runs up to ``parallel`` jobs at once on ``model``, first in first out; at most
    ``max_queue`` wait while every slot is busy."""

    def __init__(self, max_queue: int, model=None, parallel: int = 1):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.max_queue, self.model, self.parallel = max_queue, model, parallel
        self._batcher = None
        if parallel > 1:
            from tinyllm.batching import Batcher

            self._batcher = Batcher(model, parallel)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: set[Job] = set()
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}

    def start(self) -> None:
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, name=f"tinyllm-model-{i}", daemon=True)
                         for i in range(self.parallel)]
        for t in self._threads:
            t.start()

    def cancel_all(self) -> None:
        """Cancel the running job and every waiting one (the lock is reentrant: a signal
        handler interrupting this thread inside it cannot deadlock)."""
        with self._cond:
            for job in [*self._waiting, *self._running]:
                job.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self.cancel_all()
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        if self._batcher is not None:
            self._batcher.close()

    def submit(self, job: Job) -> int:
        """Queue ``job``; returns how many requests are ahead of it. Raises QueueFull."""
        with self._cond:
            self._drop_cancelled()
            busy = len(self._running) >= self.parallel
            idle = self.parallel - len(self._running)  # slots about to take a waiting job
            if len(self._waiting) >= self.max_queue + idle:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for the model")
            ahead = len(self._waiting) + (len(self._running) if busy else 0)
            self._waiting.append(job)
            self._cond.notify()
            return ahead

    def stats(self) -> dict:
        with self._cond:
            self._drop_cancelled()
            return {"busy": bool(self._running), "running": len(self._running), "slots": self.parallel,
                    "waiting": len(self._waiting), **self.counts}

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
                    job = self._waiting.popleft()
                    self._running.add(job)
                    return job
                self._cond.wait()

    def _run(self, job: Job) -> str:
        if self._batcher is None:
            return job._execute(self.model)
        # the free slot whose KV cache (kept between requests) holds most of this prompt
        with self._batcher.slot(job.prompt) as slot:
            return job._execute(slot)

    def _loop(self) -> None:
        while (job := self._next()) is not None:
            try:
                outcome = self._run(job)
            except BaseException:  # never let one request end the worker
                log.exception("worker error")
                outcome = "failed"
            with self._cond:
                self.counts[outcome] += 1
                self._running.discard(job)
