"""Batching across requests: jobs that arrive together and share a key
(the sampler's static settings) run as one call, in arrival order, and each
job gets back only its own result.

A bounded queue: past `max_queue` waiting jobs, `submit` raises QueueFull
at once (the server answers HTTP 503) instead of letting latency grow
without limit. One worker thread runs the batches, so the jitted sampler is
never called from two threads at once.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Deque, Hashable, List, Sequence


class QueueFull(RuntimeError):
    """The server is busy: the request was not queued."""


@dataclasses.dataclass
class _Job:
    key: Hashable
    payload: Any
    rows: int
    future: concurrent.futures.Future


class Batcher:
    """`run_batch(key, payloads) -> results` (one result per payload, in
    order; an exception instance fails only its own request) on one worker
    thread.

    A batch is the oldest waiting job plus the later jobs with the same key,
    up to `max_rows` rows in all (`rows_of(payload)`: a job's share of the
    batch). After the first job arrives the worker waits `window_s` for
    companions, so requests sent together share a call; a job whose key
    differs waits for its own batch and keeps its place in the queue."""

    def __init__(self, run_batch: Callable[[Hashable, List[Any]], Sequence[Any]], *, max_rows: int,
                 max_queue: int, rows_of: Callable[[Any], int] = lambda payload: 1, window_s: float = 0.05):
        if max_rows < 1 or max_queue < 1:
            raise ValueError(f"max_rows and max_queue must be >= 1, got {max_rows}, {max_queue}")
        self._run_batch, self._rows_of = run_batch, rows_of
        self.max_rows, self.max_queue, self.window_s = max_rows, max_queue, window_s
        self._queue: Deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches: List[int] = []  # jobs per batch run, for tests and the benchmark
        self._thread = threading.Thread(target=self._work, name="cm3leon-batcher", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, payload: Any) -> concurrent.futures.Future:
        rows = int(self._rows_of(payload))
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"a request of {rows} rows does not fit a batch of {self.max_rows}")
        job = _Job(key, payload, rows, concurrent.futures.Future())
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._queue)} requests are waiting (the queue holds "
                                f"{self.max_queue}); try again shortly")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def _take(self) -> List[_Job]:
        """The next batch (waits for a job, then `window_s` for companions)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            deadline = time.monotonic() + self.window_s
            while True:
                first = self._queue[0]
                batch, rows = [], 0
                for job in self._queue:
                    if job.key == first.key and rows + job.rows <= self.max_rows:
                        batch.append(job)
                        rows += job.rows
                left = deadline - time.monotonic()
                if rows >= self.max_rows or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            for job in batch:
                self._queue.remove(job)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            self.batches.append(len(jobs))
            try:
                results = list(self._run_batch(jobs[0].key, [j.payload for j in jobs]))
                if len(results) != len(jobs):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} jobs")
            except BaseException as e:  # noqa: BLE001 - every waiting request learns the cause
                for j in jobs:
                    j.future.set_exception(e)
                continue
            for j, r in zip(jobs, results):
                if isinstance(r, BaseException):  # this request's own failure; the others stand
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)
