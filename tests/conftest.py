"""Shared helpers: run the real CLI in a subprocess on a small config."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test extra installs libtpu (for `cm3leon compile`); a JAX process that
# initialises its TPU backend on this TPU-less host takes libtpu's lockfile
# and slows start-up. Tests, and the CLI processes they start, run on CPU;
# compiling for a TPU topology needs no TPU backend (train/compile.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# JAX's persistent compilation cache, one per test session (shared by the
# xdist workers and the CLI processes they start): many tests compile the same
# small train step again (a resumed run, a rerun after a kill, the same
# micro-config in another test); with the cache they load it. It starts empty
# each session, so a suite's time is what a clean clone gets. Programs that
# compile in under a second (jax's default threshold) are not stored.
_CACHE_DIR = os.path.join(tempfile.gettempdir(), "cm3leon_test_jax_cache_"
                          + os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid())))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, not an xdist worker
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)

# A smaller-than-tiny decoder so CLI tests take seconds, on the data-free
# smoke-test task; everything else is gin/cm3leon_tiny.gin as users run it.
SMALL = [
    "--gin_file=gin/cm3leon_tiny.gin",
    "--gin.MIXTURE_OR_TASK_NAME='synthetic_lm'",
    "--gin.DecoderConfig.num_layers=2",
    "--gin.DecoderConfig.d_model=64",
    "--gin.DecoderConfig.num_heads=4",
    "--gin.DecoderConfig.d_ff=256",
    "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
    "--gin.BATCH_SIZE=8",
    "--gin.train.log_every=1",
    "--gin.train.peak_flops_per_device=1e11",
]

def pytest_terminal_summary(terminalreporter):
    """The fuzz tests' example counts (each test records `fuzz_examples`),
    in `make test`'s output too, where pytest -q captures their prints."""
    lines = [f"{rep.nodeid}: {value} examples"
             for outcome in ("passed", "failed") for rep in terminalreporter.stats.get(outcome, [])
             if rep.when == "call" for key, value in rep.user_properties if key == "fuzz_examples"]
    if lines:
        terminalreporter.write_sep("-", "fuzz examples tried")
        for line in sorted(lines):
            terminalreporter.write_line(line)



def run_cli(args, env=None, timeout=600, check=True, devices=None):
    full_env = dict(os.environ)
    full_env.pop("XLA_FLAGS", None)
    if devices:
        full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "cm3leon_jax.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"cm3leon {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def repo():
    return REPO


def _prefill_then_step(params, cfg, toks, prefill: int, cache_len: int):
    """Logits of `toks` [B, T] through the decoder's KV cache: `prefill`
    tokens in one call, then one token per call (positions 0..T-1)."""
    import jax.numpy as jnp

    from cm3leon_jax.models.decoding import cached_forward, init_cache

    b, t = toks.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    pad = jnp.zeros(b, jnp.int32)
    cache = init_cache(cfg, b, cache_len)
    first, cache = cached_forward(params, cfg, toks[:, :prefill], pos[:, :prefill], pad, cache, 0)
    steps = [first]
    for i in range(prefill, t):
        s, cache = cached_forward(params, cfg, toks[:, i:i + 1], pos[:, i:i + 1], pad, cache, i)
        steps.append(s)
    return jnp.concatenate(steps, axis=1)


@pytest.fixture
def prefill_then_step():
    return _prefill_then_step
