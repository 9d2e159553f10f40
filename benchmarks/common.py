"""Scaffolding shared by the benchmark scripts in this folder.

The scripts are run as `.venv/bin/python benchmarks/X.py`, so this folder is
on sys.path and they import this module as `common`. Nothing here imports jax
or torch at module level: `apply_xla_flags` has to run before jax is imported,
and train_throughput.py re-execs itself before importing anything heavy.

- `make_parser` / `add_round_args`: the argparse boilerplate and the flags
  the two-framework encoder benchmarks share (--calls, --rounds, --xla-flags,
  --skip-torch, --seed);
- `apply_xla_flags`: append flags to $XLA_FLAGS (before `import jax`);
- `say`: print and flush;
- `say_jax_banner`: the first line (jax version, platform, cores, XLA_FLAGS);
- `torch_all_cores`: `torch.set_num_threads(os.cpu_count())`;
- `save_hf_model`: a random-weight transformers model as safetensors +
  config.json, for the `cm3leon convert` importers;
- `timed_calls`: seconds for n back-to-back calls;
- `JaxCall` / `TorchCall`: one side of a two-framework benchmark, a jitted
  function or a PyTorch call (`output()` as NumPy for the comparison,
  `run(n)` timed);
- `alternating_rounds`: the timed rounds (a, b | b, a | ...) with one printed
  line per round, and the median rate of each side;
- `report_ratio`: the "ratio a/b" line.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Mapping, Union


def make_parser(doc: str) -> argparse.ArgumentParser:
    """Parser described by the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_round_args(p: argparse.ArgumentParser, calls: int = 2, rounds: int = 5) -> None:
    """--calls, --rounds, --xla-flags, --skip-torch, --seed (in that order)."""
    p.add_argument("--calls", type=int, default=calls, help="timed encode calls per round and framework")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS (appended)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)


def apply_xla_flags(flags: str = "", defaults: str = "") -> str:
    """Set $XLA_FLAGS to `defaults`, the flags already there, then `flags`
    (later flags win) and return it. Must run before jax is imported."""
    parts = [defaults, os.environ.get("XLA_FLAGS", ""), flags]
    joined = " ".join(p.strip() for p in parts if p and p.strip())
    if joined or "XLA_FLAGS" in os.environ:
        os.environ["XLA_FLAGS"] = joined
    return joined


def say(*a) -> None:
    print(*a, flush=True)


def say_jax_banner(*extra: str) -> None:
    """`jax <version> on <platform> (<n> cores); XLA_FLAGS='...'[; extra...]`."""
    import jax

    say("; ".join([f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores)",
                   f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", *extra]))


def torch_all_cores():
    """Import torch, give it every core (`os.cpu_count()` threads), return it."""
    import torch

    torch.set_num_threads(os.cpu_count())
    return torch


def save_hf_model(model, config, out_dir: str):
    """Write `model`'s weights as `model.safetensors` and `config` as
    config.json under `out_dir` (what the converters read); return `model`."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "model.safetensors"))
    config.save_pretrained(out_dir)
    return model


def timed_calls(call: Callable[[], object], n: int,
                block: Callable[[object], object] | None = None) -> float:
    """Seconds for `n` back-to-back `call()`s; `block(last result)` runs before
    the clock stops (JAX dispatches asynchronously)."""
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = call()
    if block is not None:
        block(out)
    return time.perf_counter() - t0


class JaxCall:
    """`fn(*args)`, a jitted function: `output()` as NumPy, `run(n)` timed
    (async dispatch, blocked once at the end)."""

    def __init__(self, fn: Callable, *args):
        self.fn, self.args = fn, args

    @classmethod
    def flax_method(cls, module, method, params, x) -> "JaxCall":
        """`module.apply({"params": params}, x, method=method)`, jitted."""
        import jax
        import jax.numpy as jnp

        fn = jax.jit(lambda p, inputs: module.apply({"params": p}, inputs, method=method))
        return cls(fn, jax.tree.map(jnp.asarray, params), jnp.asarray(x))

    def output(self):
        import numpy as np

        return np.asarray(self.fn(*self.args))

    def run(self, n: int) -> float:
        import jax

        return timed_calls(lambda: self.fn(*self.args), n, jax.block_until_ready)


class TorchCall:
    """`fn()`, a PyTorch call, under `torch.inference_mode()`: `output()` is
    `post(fn())` as NumPy, `run(n)` times `fn()` alone."""

    def __init__(self, fn: Callable[[], object], post: Callable[[object], object] = lambda out: out):
        self.fn, self.post = fn, post

    def output(self):
        import torch

        with torch.inference_mode():
            return self.post(self.fn()).numpy()

    def run(self, n: int) -> float:
        import torch

        with torch.inference_mode():
            return timed_calls(self.fn, n)


PerName = Union[int, float, Mapping[str, Union[int, float]]]

# Fields of a round line's `line_format` for one side:
#   name, unit, rate (units/s), calls, wall, user, sys, cpu (= user + sys;
#   process CPU seconds over the side's part of the round), and wall_per_call,
#   user_per_call, sys_per_call.
DEFAULT_LINE_FORMAT = "{name} {rate:6.2f} {unit} (cpu {cpu:.1f}s / wall {wall:.1f}s)"


def _per(value: PerName, name: str):
    return value[name] if isinstance(value, Mapping) else value


def alternating_rounds(runners: Mapping[str, Callable[[int], float]], rounds: int, calls: PerName,
                       units_per_call: PerName, unit_label: str,
                       line_format: str = DEFAULT_LINE_FORMAT,
                       after_round: Callable[[], object] | None = None):
    """Timed rounds in alternating order (a, b | b, a | ...) so that both
    sides see the same machine load.

    `runners[name](n)` does `n` calls and returns their wall seconds; a side's
    rate is `calls * units_per_call / seconds` (`calls` and `units_per_call`
    are one number or one per name). Each round prints
    `round i/N: <line_format of the first> | <of the second>`, after
    `after_round()` if given. Returns `(rates, medians)`: per name, the list
    of round rates and their median.
    """
    names = list(runners)
    rates = {name: [] for name in names}
    for rnd in range(rounds):
        parts = []
        for name in (names if rnd % 2 == 0 else names[::-1]):
            n = _per(calls, name)
            c0 = os.times()
            wall = runners[name](n)
            c1 = os.times()
            user, sys_ = c1.user - c0.user, c1.system - c0.system
            rate = n * _per(units_per_call, name) / wall
            rates[name].append(rate)
            parts.append(line_format.format(
                name=name, unit=unit_label, rate=rate, calls=n, wall=wall, user=user, sys=sys_,
                cpu=user + sys_, wall_per_call=wall / n, user_per_call=user / n, sys_per_call=sys_ / n))
        if after_round is not None:
            after_round()
        say(f"round {rnd + 1}/{rounds}: " + " | ".join(parts))
    return rates, {name: statistics.median(v) for name, v in rates.items()}


def report_ratio(medians: Mapping[str, float], num: str = "jax", den: str = "torch"):
    """`medians[num] / medians[den]`, printed as `ratio num/den: x.xxx`;
    None (nothing printed) where either side was not timed."""
    if not (medians.get(num) and medians.get(den)):
        return None
    ratio = medians[num] / medians[den]
    say(f"ratio {num}/{den}: {ratio:.3f}")
    return ratio
