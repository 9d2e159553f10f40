"""serve/batcher.py: requests that arrive together share one call, each gets
its own result, a full queue refuses at once, and a failure stays with its
request."""
from __future__ import annotations

import threading

import pytest

from cm3leon_jax.serve.batcher import Batcher, QueueFull


def _recorder(gate: threading.Event = None):
    calls = []

    def run(key, payloads):
        if gate is not None:
            gate.wait(10)
        calls.append((key, list(payloads)))
        return [(key, p, "done") for p in payloads]

    return run, calls


def test_jobs_sent_together_share_a_batch_and_get_their_own_results():
    run, calls = _recorder()
    b = Batcher(run, max_rows=32, max_queue=16, rows_of=lambda p: 4, window_s=0.3)
    futures = [b.submit("s", i) for i in range(8)]
    assert [f.result(10) for f in futures] == [("s", i, "done") for i in range(8)]
    assert calls == [("s", list(range(8)))]  # 8 x 4 rows = one full batch of 32
    b.close()


def test_a_batch_never_exceeds_max_rows_and_keys_never_mix():
    gate = threading.Event()
    run, calls = _recorder(gate)
    b = Batcher(run, max_rows=8, max_queue=16, rows_of=lambda p: p[1], window_s=0.05)
    blocker = b.submit("x", ("block", 1))  # holds the worker while the rest queue up
    jobs = [("a", ("a1", 4)), ("b", ("b1", 2)), ("a", ("a2", 4)), ("a", ("a3", 4)), ("b", ("b2", 8))]
    futures = [b.submit(k, p) for k, p in jobs]
    gate.set()
    blocker.result(10)
    for f in futures:
        f.result(10)
    assert calls[1:] == [("a", [("a1", 4), ("a2", 4)]),   # oldest first; a3 would pass 8 rows
                         ("b", [("b1", 2)]),                 # b2 (8 rows) does not fit beside b1
                         ("a", [("a3", 4)]),
                         ("b", [("b2", 8)])]
    b.close()


def test_a_full_queue_refuses_at_once_and_recovers():
    gate = threading.Event()
    run, _ = _recorder(gate)
    b = Batcher(run, max_rows=1, max_queue=2, window_s=0.0)
    first = b.submit("k", 0)
    # the worker takes `first`; two more fill the queue, a third is refused
    for _ in range(100):
        if b.pending() == 0:
            break
        threading.Event().wait(0.01)
    waiting = [b.submit("k", 1), b.submit("k", 2)]
    with pytest.raises(QueueFull, match="busy"):
        b.submit("k", 3)
    gate.set()
    assert [f.result(10)[1] for f in [first] + waiting] == [0, 1, 2]
    assert b.submit("k", 4).result(10)[1] == 4
    b.close()


def test_failures_stay_with_their_requests():
    def run(key, payloads):
        if key == "boom":
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {p}") if p < 0 else p for p in payloads]

    b = Batcher(run, max_rows=8, max_queue=8, window_s=0.2)
    good, bad = b.submit("k", 1), b.submit("k", -1)
    assert good.result(10) == 1
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(10)
    with pytest.raises(RuntimeError, match="whole batch"):
        b.submit("boom", 1).result(10)
    assert b.submit("k", 2).result(10) == 2  # the worker lives on
    with pytest.raises(ValueError, match="does not fit"):
        Batcher(run, max_rows=2, max_queue=2, rows_of=lambda p: 3).submit("k", 0)
    b.close()
