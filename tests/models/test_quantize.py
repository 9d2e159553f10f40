"""int8 weight-only quantisation (models/quantize.py): bytes, the rounding
bound, and agreement with bf16 on a trained tiny model."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.models import quantize
from cm3leon_jax.models.decoder import Decoder
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax.models.decoding import cached_forward, init_cache

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import SMALL, run_cli  # noqa: E402


def _forward(params, cfg, toks):
    b, t = toks.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return cached_forward(params, cfg, toks, pos, jnp.zeros(b, jnp.int32), init_cache(cfg, b, t), 0)[0]


def test_int8_bytes_and_rounding_bound():
    cfg = DecoderConfig(vocab_size=2048, num_layers=2, d_model=64, num_heads=4, d_ff=256, max_length=128,
                        dtype="float32")
    params = jax.tree.map(lambda a: a, __import__("flax").linen.meta.unbox(
        Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    params["output_projection"] = jax.random.normal(jax.random.PRNGKey(1), params["output_projection"].shape)
    q = quantize.quantize_params(params, cfg)
    n = sum(x.size for x in jax.tree.leaves(params))
    assert quantize.weight_bytes(q) <= 0.55 * 2 * n   # <= 0.55x the bf16 bytes
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        node = q
        for k in path:
            node = node[k.key]
        assert quantize.is_quantized(node), jax.tree_util.keystr(path)  # every weight is int8
        err = np.abs(np.asarray(quantize.dequantize(node, jnp.float32)) - np.asarray(leaf))
        assert (err <= np.asarray(node["scale"]) / 2 + 1e-7).all()  # round to nearest
    toks = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 2048)
    ref = _forward(params, cfg, toks)
    # the int8 forward is the float forward of the dequantised weights
    deq_params = jax.tree_util.tree_map(lambda leaf: quantize.dequantize(leaf, jnp.float32), q,
                                        is_leaf=quantize.is_quantized)
    np.testing.assert_allclose(np.asarray(_forward(q, cfg, toks)), np.asarray(_forward(deq_params, cfg, toks)),
                               atol=1e-4, rtol=1e-4)
    assert float(jnp.max(jnp.abs(ref))) > 0


@pytest.mark.slow
def test_int8_argmax_agrees_with_bf16_on_a_trained_tiny_model(tmp_path):
    # the smoke-test task (arithmetic progressions), trained until it predicts
    run_cli(["train", *SMALL, "--gin.TRAIN_STEPS=400", "--gin.train.checkpoint_every=400",
             "--gin.PEAK_LEARNING_RATE=1e-2", "--gin.BATCH_SIZE=16", "--gin.train.log_every=100",
             f"--model_dir={tmp_path}"])  # log_every: SMALL's per-step metrics would be most of the time
    restored = ocp.StandardCheckpointer().restore(os.path.join(tmp_path, "checkpoints", "400", "state"))
    params = jax.tree.map(jnp.asarray, restored["params"])
    # the decoder and vocabulary the run wrote to its config.gin (as `load_model` reads them), in bf16
    import dataclasses

    import gin

    from cm3leon_jax import gin_utils
    from cm3leon_jax.data import synthetic
    from cm3leon_jax.data.pipeline import TRAIN_DATA_MODULES

    gin_utils.parse([os.path.join(tmp_path, "config.gin")], [], extra_modules=TRAIN_DATA_MODULES,
                    check_required=False)
    try:
        cfg = dataclasses.replace(DecoderConfig(), dtype="bfloat16")
        v = vocab_lib.UnifiedVocabulary()
    finally:
        gin.clear_config()
    assert cfg.d_model == 64 and cfg.smeared_keys  # SMALL's sizes, gin/models/cm3leon_tiny.gin's options
    docs = [np.asarray(synthetic.synthetic_document(np.int64(i), 1, v)) for i in range(48)]  # validation stream
    t = max(len(d) for d in docs)
    toks = jnp.asarray(np.stack([np.pad(d, (0, t - len(d))) for d in docs]))
    real = np.stack([np.arange(t) < len(d) for d in docs])
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    a = np.asarray(jnp.argmax(_forward(bf16, cfg, toks), -1))
    b = np.asarray(jnp.argmax(_forward(quantize.quantize_params(params, cfg), cfg, toks), -1))
    agree = float((a == b)[real].mean())
    # the model has learned the documents' structure (it predicts, not guesses)
    acc = float((a[:, :-1] == np.asarray(toks)[:, 1:])[real[:, 1:]].mean())
    assert acc > 0.5, acc
    assert agree >= 0.95, agree
