"""Continuous batching: many sequences generating at once share one forward pass per step.

Decoding is memory-bound: each step streams every weight once, whether it computes one
token or eight. A :class:`Batcher` lets several generations run side by side, each in its
own thread with its own KV cache (a :class:`Slot`), and turns their ``eval`` calls into
``Model.eval_batch`` steps: a step takes every sequence waiting for logits, so sequences
join and leave the batch between steps. A newcomer's long prompt is computed in chunks of
``chunk`` tokens, one chunk per step, so the running streams keep moving meanwhile.

A slot is a stand-in for the model wherever generation takes one (``generate_ids``,
``Decoding.stream``): it is the model, but with its own cache and a batched ``eval``.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np

from tinyllm import validate
from tinyllm.errors import TinyLLMError
from tinyllm.kvcache import kv_cache_bytes

DEFAULT_CHUNK = 128   # prompt tokens a newcomer adds to one step
GATHER_SECONDS = 0.002  # how long a step waits for running sequences still sampling their last token


# Model methods that run whole forward passes in the model's own cache: from a slot they run
# in the step thread, between steps, so they never overlap a batched step.
UNBATCHED = frozenset({"logits", "score", "token_logprobs", "loglikelihood", "embed"})


def slot_bytes(model) -> int:
    """Host memory one slot's KV cache takes."""
    return kv_cache_bytes(model.config, model.n_ctx, model.cache_type)


def default_slots(model, most: int = 4) -> int:
    """How many parallel slots a server runs unless told: ``most``, or as many as fit in half
    of the free memory (at least 1); 1 on a GPU, whose memory this does not see."""
    if model.ops.name == "cuda":
        return 1
    free = validate.available_memory()
    return most if free is None else max(1, min(most, free // 2 // max(1, slot_bytes(model))))


class Slot:
    """The model as one batched sequence sees it: its own KV cache, ``eval`` through the batcher."""

    def __init__(self, batcher: "Batcher", cache):
        self._batcher, self.cache = batcher, cache

    def __getattr__(self, name):  # everything else (tokenizer, n_ctx, sampling_params, ...) is the model's
        attr = getattr(self._batcher.model, name)
        if name in UNBATCHED:
            return lambda *args, **kwargs: self._batcher.exclusive(lambda: attr(*args, **kwargs))
        return attr

    @property
    def tokens(self) -> list[int]:
        return self.cache.tokens

    def eval(self, tokens: list[int]) -> np.ndarray:
        """The next-token logits (vocab,) after ``tokens``, computed in a shared step."""
        return self._batcher.eval(self, list(tokens))

    def reset(self) -> None:
        self.cache.clear()


class Batcher:
    """Runs the forward passes of up to ``slots`` sequences in shared steps (see module doc).

    Use ``with batcher.slot() as s:`` around one generation; the step loop runs in a thread of
    its own, started on first use, and applies the model's thread count there."""

    def __init__(self, model, slots: int, chunk: int = DEFAULT_CHUNK):
        if not isinstance(slots, int) or slots < 1:
            raise TinyLLMError(f"parallel slots must be a positive integer, got {slots!r}")
        if not isinstance(chunk, int) or chunk < 1:
            raise TinyLLMError(f"prefill chunk must be a positive integer, got {chunk!r}")
        self.model, self.chunk = model, chunk
        if model.ops.name != "cuda":  # a device cache lives in GPU memory, which this check does not see
            validate.check_allocation(slot_bytes(model) * slots, f"{slots} KV cache slots of {model.n_ctx} positions",
                                      "use fewer parallel slots (--parallel) or a smaller context (--ctx)")
        self._free = [model.new_cache() for _ in range(slots)]
        self._lock = threading.Condition()
        self._waiting: dict[Slot, tuple[list[int], Future]] = {}
        self._calls: list[tuple[object, Future]] = []  # UNBATCHED work, run between steps
        self._active = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0               # forward passes run, and the token rows they computed
        self.rows = 0

    @property
    def slots(self) -> int:
        return len(self._free) + self._active

    def slot(self, prompt: list[int] | None = None) -> "_Lease":
        """A free slot for one generation (the context manager returns it when done): of the
        free ones, the one whose cache holds the longest prefix of ``prompt`` (llama-server's
        slot choice by similarity), so a returning conversation reuses what it computed."""
        return _Lease(self, prompt)

    def _acquire(self, prompt: list[int] | None) -> Slot:
        with self._lock:
            if self._closed:
                raise TinyLLMError("this batcher is closed")
            if not self._free:
                raise TinyLLMError(f"all {self.slots} parallel slots are busy")
            self._active += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tinyllm-batcher", daemon=True)
                self._thread.start()
            best = max(range(len(self._free)), key=lambda i: self._free[i].reusable(prompt)) if prompt else -1
            return Slot(self, self._free.pop(best))

    def _release(self, slot: Slot) -> None:
        with self._lock:
            self._active -= 1
            self._free.append(slot.cache)  # its tokens stay: the next user of the slot may share a prefix
            self._lock.notify_all()

    def close(self) -> None:
        """End the step thread (once no generation runs): its caches can then be freed."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(10)

    def eval(self, slot: Slot, tokens: list[int]) -> np.ndarray:
        done: Future = Future()
        with self._lock:
            self._waiting[slot] = (tokens, done)
            self._lock.notify_all()
        return done.result()

    def exclusive(self, fn):
        """fn() in the step thread between two steps (it may use the model's own cache)."""
        done: Future = Future()
        with self._lock:
            self._calls.append((fn, done))
            self._lock.notify_all()
        return done.result()

    # -- the step loop ----------------------------------------------------------------

    def _loop(self) -> None:
        while (work := self._gather()) is not None:
            calls, batch = work
            for fn, done in calls:
                try:
                    done.set_result(fn())
                except BaseException as e:  # noqa: BLE001 - the caller's error, raised in its thread
                    done.set_exception(e)
            if batch:
                self._step(batch)

    def _gather(self) -> tuple[list, list[tuple[Slot, list[int], Future]]] | None:
        """Unbatched calls waiting, and every sequence waiting for logits, once all running
        ones wait (or a moment has passed); None once closed with nothing left to do."""
        with self._lock:
            while not self._waiting and not self._calls:
                if self._closed:
                    return None
                self._lock.wait()
            calls, self._calls = self._calls, []
            if calls:
                return calls, []
            deadline = time.monotonic() + GATHER_SECONDS
            while len(self._waiting) < self._active and time.monotonic() < deadline:
                self._lock.wait(max(0.0, deadline - time.monotonic()))
            batch = [(slot, tokens, done) for slot, (tokens, done) in self._waiting.items()]
            self._waiting.clear()
        return [], batch

    def _step(self, batch) -> None:
        """One forward over the batch; a prompt longer than a chunk computes its next chunk and
        waits for the following step."""
        caches, sequences, finishing, new_rows = [], [], [], 0
        for slot, tokens, _ in batch:
            keep = slot.cache.reusable(tokens)
            part = tokens if len(tokens) - keep <= self.chunk else tokens[:keep + self.chunk]
            caches.append(slot.cache)
            sequences.append(part)
            finishing.append(part is tokens)
            new_rows += len(part) - keep
        try:
            logits = self.model.eval_batch(caches, sequences)
        except BaseException as e:  # noqa: BLE001 - each waiting sequence gets the error as its own
            for _, _, done in batch:
                done.set_exception(e)
            return
        self.steps += 1
        self.rows += new_rows
        with self._lock:
            for (slot, tokens, done), row, finished in zip(batch, logits, finishing):
                if finished:
                    done.set_result(row)
                else:
                    self._waiting[slot] = (tokens, done)  # the rest of its prompt, next step


class _Lease:
    def __init__(self, batcher: Batcher, prompt: list[int] | None):
        self._batcher, self._prompt = batcher, prompt

    def __enter__(self) -> Slot:
        self._slot = self._batcher._acquire(self._prompt)
        return self._slot

    def __exit__(self, *exc) -> None:
        self._batcher._release(self._slot)
