"""Metrics: clu writers (TensorBoard + logging) plus `metrics.jsonl`, MFU, and
a one-line progress report with ETA. Shared by every trainer in the project
(decoder, VQ tokenizer, CLIP)."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping, Optional

import numpy as np
from clu import metric_writers

from cm3leon_jax import paths as paths_lib


class JsonlWriter(metric_writers.MetricWriter):
    """clu MetricWriter appending one JSON object per written step.

    Scalars are written as plain floats; other summary kinds are ignored (they
    go to TensorBoard). Appending keeps the log of a resumed run continuous.
    """

    def __init__(self, path: str):
        self._path = path
        paths_lib.makedirs(os.path.dirname(path) or ".")  # local or gs:// (paths.py)
        self._f = paths_lib.open(path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        row = {"step": int(step)}
        row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def write_summaries(self, step, values, metadata=None):
        pass

    def write_images(self, step, images):
        pass

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step, texts):
        pass

    def write_histograms(self, step, arrays, num_buckets=None):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        self._f.flush()

    def close(self):
        if not getattr(self._f, "closed", False):  # a GFile (gs://) has no .closed; closing twice is fine
            self._f.close()


def create_writer(model_dir: str, is_chief: bool = True) -> metric_writers.MetricWriter:
    """TensorBoard events + metrics.jsonl in model_dir (chief process only)."""
    if not is_chief:
        return metric_writers.MultiWriter([])
    tb = metric_writers.create_default_writer(model_dir, asynchronous=False)
    return metric_writers.MultiWriter([tb, JsonlWriter(os.path.join(model_dir, "metrics.jsonl"))])


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """Peak FLOP/s of one device, from a jitted fp32 matmul (best of repeats).

    Used for MFU when gin gives no `peak_flops_per_device` (e.g. on CPU).
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: (x @ y) @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 4.0 * n ** 3 / best


class Throughput:
    """Tokens/s and MFU between two log points."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float,
                 num_devices: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_total = peak_flops * num_devices
        self._t = time.perf_counter()
        self._steps = 0

    def reset(self):
        self._t = time.perf_counter()
        self._steps = 0

    def tick(self, steps: int = 1):
        self._steps += steps

    def measure(self) -> dict:
        dt = max(time.perf_counter() - self._t, 1e-9)
        tps = self._steps * self.tokens_per_step / dt
        out = {"tokens_per_sec": tps,
               "mfu": tps * self.flops_per_token / self.peak_total if self.peak_total else 0.0,
               "step_time_sec": dt / max(self._steps, 1)}
        self.reset()
        return out


class Progress:
    """`step 120/300 | loss 3.214 | 12.3k tok/s | mfu 41.0% | eta 0:01:23`."""

    def __init__(self, total_steps: int, start_step: int, stream=None):
        self.total = total_steps
        self.start = start_step
        self.t0 = time.perf_counter()
        self.stream = stream or sys.stderr

    def line(self, step: int, metrics: Mapping[str, float]) -> str:
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [f"step {step}/{self.total}", f"loss {metrics.get('loss', float('nan')):.4f}"]
        if "tokens_per_sec" in metrics:
            parts.append(f"{metrics['tokens_per_sec'] / 1e3:.1f}k tok/s")
        if "mfu" in metrics:
            parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
        parts.append(f"eta {_fmt_seconds(eta)}")
        return " | ".join(parts)

    def report(self, step: int, metrics: Mapping[str, float], is_chief: bool = True):
        if is_chief:
            print(self.line(step, metrics), file=self.stream, flush=True)


def _fmt_seconds(s: Optional[float]) -> str:
    if s is None or not np.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
