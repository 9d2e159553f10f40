"""`cm3leon compile`: AOT compilation of the real train step for TPU
topologies on this CPU host (libtpu from the test extra)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import run_cli  # noqa: E402

from cm3leon_jax.train import flop_count, tpu_topology  # noqa: E402

pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")


@pytest.mark.parametrize("name,grid,chips", [
    ("v5e-256", (16, 16), 256), ("v5litepod-4", (2, 2), 4), ("v4-128", (4, 4, 4), 64),
    ("v5p-128", (4, 4, 4), 64), ("v6e-64", (8, 8), 64), ("v4:2x2x2", (2, 2, 2), 8)])
def test_parse_topology(name, grid, chips):
    t = tpu_topology.parse_topology(name)
    assert t.grid == grid and t.num_chips == chips


@pytest.mark.parametrize("bad", ["v9-8", "v5e-3", "v4-7", "v4:4x4", "tpu"])
def test_parse_topology_refuses(bad):
    with pytest.raises(ValueError, match="--topology"):
        tpu_topology.parse_topology(bad)


def test_analytic_flops_by_hand():
    """A 2-layer d=8 model worked by hand: matmul params 2 x (4 x 64 + 2 x 8 x 32)
    + 8 x 16 (output) = 1664; T = 256 -> 2 query blocks of 128, visible pairs
    128^2 x 3 = 49152; attention forward 2 layers x 2 matmuls x 2 FLOPs x 49152
    x 8 = 3,145,728 per sequence."""
    import jax

    from cm3leon_jax.models.decoder import Decoder
    from cm3leon_jax.models.decoder_config import DecoderConfig

    cfg = DecoderConfig(vocab_size=16, num_layers=2, d_model=8, num_heads=2, d_ff=32, max_length=256,
                        remat_policy="full")
    params = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 4), "int32")))
    a = flop_count.analytic_flops(cfg, params["params"], batch_size=3, seq_len=256)
    tokens = 3 * 256
    assert a["matmul_params"] == 1664
    assert a["matmul_6NT"] == 6 * 1664 * tokens
    assert a["attention_fwd_bwd"] == 3 * 3 * 3_145_728
    # full remat recomputes the layers' forward but the MLP output projection
    # (2 x (1536 - 2 x 8 x 32) x tokens, dead code: its output is only the
    # residual) and attention's.
    assert a["remat_recompute"] == 2 * (1536 - 2 * 8 * 32) * tokens + 3 * 3_145_728
    none = flop_count.analytic_flops(DecoderConfig(**{**cfg.__dict__, "remat_policy": "none"}), params["params"],
                                     3, 256)
    assert none["remat_recompute"] == 0 and none["model_flops"] == a["model_flops"]


def test_activation_constraints_are_in_force():
    """The trainer's step is traced with the mesh and the logical rules set:
    the activations carry batch sharding constraints (flax drops them
    silently otherwise, and XLA replicated a 7B step's batch on v5e-256)."""
    import gin
    import jax
    import jax.numpy as jnp

    from cm3leon_jax import partitioning
    from cm3leon_jax.models.decoder_config import DecoderConfig
    from cm3leon_jax.train.step import FEATURES
    from cm3leon_jax.train.trainer import build_train_step

    gin.clear_config()
    gin.bind_parameter("learning_rate_schedule.peak_learning_rate", 1e-3)
    devices = tpu_topology.topology_devices(tpu_topology.parse_topology("v5e-4"))
    mesh = partitioning.create_mesh(data=1, fsdp=-1, model=1, devices=devices)
    cfg = DecoderConfig(vocab_size=256, num_layers=1, d_model=64, num_heads=2, d_ff=128, max_length=64)
    built = build_train_step(cfg, 10, 64, mesh, partitioning.logical_axis_rules())
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         built.abstract, built.shardings)
    batch = {k: jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=built.batch_sharding) for k in FEATURES}
    text = built.jit_step.lower(state, batch).as_text()
    gin.clear_config()
    constraints = [ln for ln in text.splitlines() if "sharding_constraint" in ln]
    assert any('[{"data", "fsdp"}, {}, {}]' in ln for ln in constraints), constraints[:5]


@pytest.mark.slow
def test_compile_tiny_on_v5e_4_reports_memory_and_flops(tmp_path):
    out = tmp_path / "report.json"
    r = run_cli(["compile", "--gin_file=gin/cm3leon_tiny.gin", "--topology=v5e-4",
                 "--gin.create_mesh.data=1", "--gin.create_mesh.fsdp=-1", f"--out={out}"])
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep == json.loads(out.read_text())
    assert rep["fits"] and rep["chips"] == 4 and rep["mesh"] == {"data": 1, "fsdp": 4, "model": 1}
    m = rep["memory_per_chip"]
    assert 0 < m["total_gib"] < m["hbm_gib"] == 16
    # Params and Adam state (fp32 params, two fp32 moments) split 4 ways.
    assert m["state_gib"]["optimizer_state"] == pytest.approx(2 * m["state_gib"]["params"], rel=1e-3)
    assert m["state_gib"]["params"] * 2 ** 30 == pytest.approx(rep["params"] * 4 / 4, rel=0.02)
    f = rep["flops"]
    assert 0.9 <= f["compiled_over_analytic"] <= 1.1, f
    assert rep["predicted"]["tokens_per_sec"] > 0


@pytest.mark.slow
def test_compile_7b_on_v5e_4_does_not_fit_and_names_buffers():
    r = run_cli(["compile", "--gin_file=gin/cm3leon_7b.gin", "--topology=v5e-4", "--no_flop_probes"],
                check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["fits"] is False
    # 7B params fp32 + 2 Adam moments / 4 chips > 16 GiB.
    assert sum(rep["memory_per_chip"]["state_gib"].values()) > 16
    assert "DOES NOT FIT" in r.stderr and "opt_state" in r.stderr and "mlp.wi" in r.stderr
    assert "create_mesh.fsdp" in r.stderr and "NUM_MICROBATCHES" in r.stderr


def test_compile_bad_topology_is_one_line():
    r = run_cli(["compile", "--gin_file=gin/cm3leon_tiny.gin", "--topology=v9-8"], check=False)
    assert r.returncode == 2 and "--topology='v9-8'" in r.stderr and "Traceback" not in r.stderr
