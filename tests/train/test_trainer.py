"""Trainer: microbatches, exact resume after SIGKILL, SIGTERM, corrupt
checkpoints, non-finite loss, the tiny config's learning."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, SMALL, read_metrics, run_cli
from cm3leon_jax import partitioning
from cm3leon_jax.models.decoder import Decoder
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax.train import optimizer, state as state_lib
from cm3leon_jax.train.step import cross_entropy_sums, make_train_step
from cm3leon_jax.train.trainer import FAULT_SIGKILL_ENV


def _params_at(model_dir, step):
    ckptr = ocp.StandardCheckpointer()
    restored = ckptr.restore(os.path.join(model_dir, "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, restored["params"])


def _assert_trees_bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and len(la) > 0
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert np.array_equal(x, y), f"max diff {np.max(np.abs(x - y))}"


def test_cross_entropy_sums_by_hand():
    # two tokens, vocab 2: logits (0, ln 3) -> p = (1/4, 3/4)
    logits = jnp.array([[[0.0, np.log(3.0)], [0.0, 0.0]]])
    targets = jnp.array([[0, 1]])
    weights = jnp.array([[1, 0]])
    total, ce, w = cross_entropy_sums(logits, targets, weights, z_loss=0.5)
    assert np.isclose(float(ce), np.log(4.0))
    assert float(w) == 1.0
    assert np.isclose(float(total), np.log(4.0) + 0.5 * np.log(4.0) ** 2)


def _small_model_and_state(dtype, total_steps):
    cfg = DecoderConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, d_ff=64,
                        max_length=32, dtype=dtype)
    model = Decoder(cfg)
    sched = optimizer.learning_rate_schedule(peak_learning_rate=1e-2, warmup_steps=0,
                                             total_steps=total_steps)
    tx = optimizer.adamw(sched)
    mesh = partitioning.create_mesh(devices=jax.devices()[:1])
    _, _, init = state_lib.abstract_state(model, tx, 16, 0, mesh)
    return model, tx, sched, init()


def _small_state_and_batch(num_microbatches):
    model, tx, sched, st = _small_model_and_state("float32", 10)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 97, size=(8, 17))
    weights = (rng.random((8, 16)) > 0.3).astype(np.int32)  # uneven weights per microbatch
    seg = np.ones((8, 16), np.int32)
    seg[:, 10:] = 2
    pos = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, 0)
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": weights, "decoder_segment_ids": seg, "decoder_positions": pos}
    step = jax.jit(make_train_step(model.apply, tx, sched, num_microbatches))
    return st, batch, step


def test_microbatches_give_the_same_update():
    st, batch, step1 = _small_state_and_batch(1)
    _, _, step4 = _small_state_and_batch(4)
    # two steps, so the zero-initialised output layer has moved and every
    # gradient is non-trivial
    s1, m1 = step1(st, batch)
    s1, m1 = step1(s1, batch)
    s4, m4 = step4(st, batch)
    s4, m4 = step4(s4, batch)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(st.params)))
    assert moved > 1e-3


def test_learning_rate_schedule_warmup_and_floor():
    s = optimizer.learning_rate_schedule(peak_learning_rate=1.0, warmup_steps=10, total_steps=110,
                                         decay="cosine", end_learning_rate_ratio=0.1)
    assert float(s(0)) == 0.0
    assert np.isclose(float(s(5)), 0.5)
    assert np.isclose(float(s(10)), 1.0)
    assert np.isclose(float(s(60)), 0.1 + 0.9 * 0.5, atol=1e-6)  # half way down the cosine
    assert np.isclose(float(s(110)), 0.1)
    lin = optimizer.learning_rate_schedule(peak_learning_rate=2.0, warmup_steps=0, total_steps=10,
                                           decay="linear", end_learning_rate_ratio=0.5)
    assert np.isclose(float(lin(5)), 1.5)


@pytest.mark.slow
def test_exact_resume_after_sigkill(tmp_path):
    args = ["train", *SMALL, "--gin.TRAIN_STEPS=60", "--gin.train.checkpoint_every=20",
            "--gin.train.keep_checkpoints=5"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(args + [f"--model_dir={straight}"])
    proc = run_cli(args + [f"--model_dir={killed}"], env={FAULT_SIGKILL_ENV: "45"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert max(r["step"] for r in read_metrics(killed)) == 45
    assert not (killed / "checkpoints" / "60").exists()
    proc = run_cli(args + [f"--model_dir={killed}"])
    assert "resumed from step" in proc.stderr
    _assert_trees_bitwise_equal(_params_at(straight, 60), _params_at(killed, 60))
    # the resumed run logged the same losses for the replayed steps
    s = {r["step"]: r["loss"] for r in read_metrics(straight)}
    k = {}
    for r in read_metrics(killed):
        k[r["step"]] = r["loss"]
    assert all(s[i] == k[i] for i in range(46, 61))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    args = ["train", *SMALL, "--gin.TRAIN_STEPS=100000", "--gin.train.checkpoint_every=100000",
            f"--model_dir={tmp_path}"]
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "cm3leon_jax.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(read_metrics(tmp_path)) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    last = max(r["step"] for r in read_metrics(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [last] and 5 <= last < 100000
    assert f"saved checkpoint at step {last}" in err


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_with_warning(tmp_path):
    args = ["train", *SMALL, "--gin.TRAIN_STEPS=40", "--gin.train.checkpoint_every=20",
            f"--model_dir={tmp_path}"]
    run_cli(args)
    files = [p for p in (tmp_path / "checkpoints" / "40" / "state").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    before = _params_at(tmp_path, 20)
    proc = run_cli(args)
    assert "checkpoint at step 40" in proc.stdout + proc.stderr and "could not be restored" in proc.stdout + proc.stderr
    assert "resumed from step 20" in proc.stderr
    moved = [p.name for p in (tmp_path / "checkpoints").iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and moved[0].startswith("40.corrupt-")  # kept, not deleted
    # training continued from 20 and wrote a fresh, readable 40
    assert (tmp_path / "checkpoints" / "40").exists()
    after = _params_at(tmp_path, 40)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_non_finite_loss_stops_naming_step_and_checkpoint(tmp_path):
    # An absurd learning rate makes the loss overflow within a few steps.
    proc = run_cli(["train", *SMALL, "--gin.TRAIN_STEPS=30", "--gin.train.checkpoint_every=1",
                    "--gin.PEAK_LEARNING_RATE=1e30", "--gin.WARMUP_STEPS=0",
                    "--gin.adamw.grad_clip_norm=0", f"--model_dir={tmp_path}"], check=False)
    assert proc.returncode != 0
    line = [l for l in proc.stderr.splitlines() if "non-finite loss at step" in l]
    assert line, proc.stderr[-3000:]
    import re
    m = re.search(r"non-finite loss at step (\d+).*Last good checkpoint: step (\d+)", line[-1])
    assert m, line[-1]
    bad, good = int(m.group(1)), int(m.group(2))
    assert good == bad - 1
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == good  # nothing past the last good step was saved


def _shapes_env():
    sys.path.insert(0, os.path.join(REPO, "tests", "data"))
    from task_data import shapes_task_data
    from cm3leon_jax.data.tasks import SHAPES_DATA_ENV

    return {SHAPES_DATA_ENV: shapes_task_data()}


def _hashes(model_dir):
    """step -> the last batch hash recorded for it."""
    with open(os.path.join(model_dir, "batch_hashes.jsonl")) as f:
        return {r["step"]: r["sha256"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_tiny_config_resume_reads_exactly_the_same_batches(tmp_path):
    """Issue 6's acceptance: gin/cm3leon_tiny.gin (shapes_cm3_retrieval),
    SIGKILLed after step 15 and resumed, consumes the batches of an
    uninterrupted run, step by step (24 steps of 4 x 256 tokens, to keep the
    three runs short)."""
    env = _shapes_env()
    args = ["train", "--gin_file=gin/cm3leon_tiny.gin", "--gin.TRAIN_STEPS=24", "--gin.train.checkpoint_every=6",
            "--gin.train.keep_checkpoints=5", "--gin.train.record_batch_hashes=True", "--gin.BATCH_SIZE=4",
            "--gin.TASK_FEATURE_LENGTHS={'targets': 256}", "--gin.train.peak_flops_per_device=1e11"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_cli(args + [f"--model_dir={straight}"], env=env)
    proc = run_cli(args + [f"--model_dir={killed}"], env=dict(env, **{FAULT_SIGKILL_ENV: "15"}), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    first = _hashes(killed)
    assert max(first) == 15
    proc = run_cli(args + [f"--model_dir={killed}"], env=env)
    import re
    m = re.search(r"resumed from step (\d+)", proc.stderr)
    assert m, proc.stderr[-2000:]
    resumed = int(m.group(1))  # the last complete checkpoint (12, or 6 if 12's async save was cut)
    assert resumed in (6, 12)
    want, got = _hashes(straight), _hashes(killed)
    assert sorted(want) == sorted(got) == list(range(1, 25))
    assert all(first[s] == want[s] for s in range(1, 16))           # before the kill
    assert all(got[s] == want[s] for s in range(resumed + 1, 25))   # replayed up to 15, then new
    assert len(set(want.values())) == 24                   # the batches do change every step
    _assert_trees_bitwise_equal(_params_at(straight, 24), _params_at(killed, 24))


@pytest.mark.slow
def test_tiny_config_learns(tmp_path):
    """The acceptance run, shortened (80 steps of 4 x 256 tokens, not 300 of
    8 x 512): the tiny gin's loss drops below 60%."""
    run_cli(["train", "--gin_file=gin/cm3leon_tiny.gin", "--gin.TRAIN_STEPS=80", "--gin.BATCH_SIZE=4",
             "--gin.TASK_FEATURE_LENGTHS={'targets': 256}", "--gin.train.peak_flops_per_device=1e11",
             f"--model_dir={tmp_path}"], env=_shapes_env())
    rows = read_metrics(tmp_path)
    assert rows[-1]["step"] == 80
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    for key in ("step", "loss", "tokens_per_sec", "mfu", "learning_rate", "grad_norm"):
        assert key in rows[-1]
    assert (tmp_path / "config.gin").exists()


def test_bf16_compute_keeps_fp32_params_and_trains():
    model, tx, sched, st = _small_model_and_state("bfloat16", 30)
    tokens = np.tile(np.arange(1, 18), (4, 1))  # a fixed, learnable sequence
    batch = {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
             "decoder_loss_weights": np.ones((4, 16), np.int32)}
    step = jax.jit(make_train_step(model.apply, tx, sched))
    losses = []
    for _ in range(30):
        st, m = step(st, batch)
        losses.append(float(m["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.params))
    logits = model.apply({"params": st.params}, jnp.asarray(tokens[:, :-1]))
    assert logits.dtype == jnp.bfloat16
    assert losses[-1] < 0.5 * losses[0]
