"""Tests of the CM3Leon decoder against transformers' PyTorch OPT reference.

The decoder is OPT-like (pre-LN, bias-free, LayerNorm without scale/offset,
learned absolute positions, untied output projection, ReLU FFN), which is
exactly `OPTForCausalLM` with `enable_bias=False`,
`layer_norm_elementwise_affine=False`, `tie_word_embeddings=False`. Our
position i is row i of `position_embedding`; OPT's learned positions carry an
offset of 2, so torch `embed_positions.weight[2 + i]` holds our row i.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.models.decoder import Decoder
from cm3leon_jax.models.decoder_config import DecoderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Tiny, fp32 everywhere.
V, D, L, H, F, T = 211, 48, 2, 4, 96, 64
ATOL = 1e-4


def _config(scan_layers: bool = True, **kw) -> DecoderConfig:
    base = dict(vocab_size=V, num_layers=L, d_model=D, num_heads=H, d_ff=F,
                max_length=T, dtype="float32", param_dtype="float32",
                scan_layers=scan_layers)
    base.update(kw)
    return DecoderConfig(**base)


@functools.lru_cache(maxsize=None)
def _apply_fn(cfg: DecoderConfig):
    return jax.jit(Decoder(cfg).apply)


@functools.lru_cache(maxsize=None)
def _init_cached(cfg: DecoderConfig, seed: int):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return nn.meta.unbox(jax.jit(Decoder(cfg).init)(jax.random.PRNGKey(seed), tokens)["params"])


def _init(cfg: DecoderConfig, seed: int = 0):
    """(model, unboxed params); initialising is slow on CPU, so cached."""
    return Decoder(cfg), _init_cached(cfg, seed)


def _apply(cfg: DecoderConfig, params, tokens, **kw):
    kw = {k: jnp.asarray(v, jnp.int32) for k, v in kw.items()}
    return np.asarray(_apply_fn(cfg)({"params": params}, jnp.asarray(tokens, jnp.int32), **kw))


def _param_shapes(cfg: DecoderConfig):
    """Param shapes without running the initialisers (cheap)."""
    boxed = jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    return nn.meta.unbox(boxed["params"])


def _unscanned(params):
    """Scanned params (leading layer axis under 'layers') -> layer_0, layer_1, ..."""
    out = {k: v for k, v in params.items() if k != "layers"}
    n = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    for i in range(n):
        out[f"layer_{i}"] = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
    return out


def _randomise(params, seed: int = 1, std: float = 0.1):
    """Replace every leaf by N(0, std^2) noise (the output projection is zero
    at init, so without this a logits comparison would be vacuous)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.normal(0.0, std, size=x.shape), jnp.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


def _random_params(scan_layers: bool, seed: int = 1):
    """Randomised params for _config(scan_layers), built from one scanned init."""
    params = _randomise(_init(_config(True))[1], seed=seed)
    return params if scan_layers else _unscanned(params)


def _layer(params, cfg: DecoderConfig, i: int):
    """Layer i's params as numpy arrays without a leading layer axis."""
    if cfg.scan_layers:
        return jax.tree_util.tree_map(lambda a: np.asarray(a[i]), params["layers"])
    return jax.tree_util.tree_map(np.asarray, params[f"layer_{i}"])


def _torch_model(cfg: DecoderConfig, params):
    """An OPTForCausalLM holding the same weights as our `params`."""
    from cm3leon_jax.models.hf_opt import to_hf_opt

    return to_hf_opt(cfg, params)


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(np.asarray(tokens, np.int64)))
    return out.logits.numpy()


# -- a. logits match OPT -------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers_opt(scan_layers):
    cfg = _config(scan_layers)
    params = _random_params(scan_layers)
    if scan_layers:
        assert params["layers"]["attention"]["query"].shape == (L, D, H, D // H)
        assert params["layers"]["attention"]["out"].shape == (L, H, D // H, D)
        assert params["layers"]["mlp"]["wi"].shape == (L, D, F)
        assert params["layers"]["mlp"]["wo"].shape == (L, F, D)
    else:
        assert params["layer_0"]["attention"]["query"].shape == (D, H, D // H)
        assert params["layer_1"]["mlp"]["wo"].shape == (F, D)
    assert params["output_projection"].shape == (D, V)
    tmodel = _torch_model(cfg, params)

    tokens = np.random.default_rng(2).integers(0, V, size=(3, 20))
    ours = _apply(cfg, params, tokens)
    ref = _torch_logits(tmodel, tokens)
    assert ours.shape == ref.shape == (3, 20, V)
    assert np.abs(ref).max() > 0.1  # not vacuous
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)

    # Full-length input too (all of the position table is exercised).
    tokens = np.random.default_rng(3).integers(0, V, size=(2, T))
    np.testing.assert_allclose(_apply(cfg, params, tokens), _torch_logits(tmodel, tokens),
                               atol=ATOL, rtol=0)


def test_unscanned_init_has_the_scanned_layout():
    """The scan_layers=False tests reuse scanned params split per layer; make
    sure that is exactly what the unscanned model declares."""
    scanned = _param_shapes(_config(True))
    unscanned = _param_shapes(_config(False))
    split = _unscanned(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), scanned))
    shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)
    assert shapes(split) == shapes(unscanned)


def test_scan_and_unrolled_layers_agree():
    tokens = np.random.default_rng(4).integers(0, V, size=(3, 20))
    np.testing.assert_allclose(
        _apply(_config(True), _random_params(True), tokens),
        _apply(_config(False), _random_params(False), tokens), atol=1e-5, rtol=0)


# -- b. packed segments ----------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_packed_segments_match_independent_runs(scan_layers):
    cfg = _config(scan_layers)
    params = _random_params(scan_layers, seed=5)
    lengths, n_pad = (5, 7, 4), 2
    total = sum(lengths) + n_pad
    assert total == 18
    rng = np.random.default_rng(6)
    segments = [rng.integers(3, V, size=n) for n in lengths]
    tokens = np.concatenate(segments + [np.zeros(n_pad, np.int64)])[None]
    seg_ids = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)]
                             + [np.zeros(n_pad, np.int64)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(n_pad)])[None]
    np.testing.assert_array_equal(seg_ids[0], [1] * 5 + [2] * 7 + [3] * 4 + [0, 0])
    np.testing.assert_array_equal(positions[0, 5:12], np.arange(7))

    ours = _apply(cfg, params, tokens, decoder_segment_ids=seg_ids, decoder_positions=positions)
    assert ours.shape == (1, total, V)
    assert np.all(np.isfinite(ours))

    tmodel = _torch_model(cfg, params)
    start = 0
    for seg in segments:
        n = len(seg)
        ref = _torch_logits(tmodel, seg[None])[0]
        np.testing.assert_allclose(ours[0, start:start + n], ref, atol=ATOL, rtol=0)
        start += n

    # Without segment ids the packed row leaks across segments: the second
    # segment's logits then differ from its independent run.
    leaky = _apply(cfg, params, tokens, decoder_positions=positions)
    np.testing.assert_allclose(leaky[0, :5], ours[0, :5], atol=1e-5, rtol=0)
    assert np.abs(leaky[0, 5:12] - ours[0, 5:12]).max() > 1e-3


def test_default_positions_and_segments():
    """No segment ids / positions == one segment with positions 0..t-1."""
    cfg = _config(True)
    params = _random_params(True)
    tokens = np.random.default_rng(11).integers(0, V, size=(3, 20))
    explicit = _apply(cfg, params, tokens,
                      decoder_segment_ids=np.ones_like(tokens),
                      decoder_positions=np.broadcast_to(np.arange(20), tokens.shape))
    np.testing.assert_allclose(_apply(cfg, params, tokens), explicit, atol=1e-6, rtol=0)


# -- c. init statistics ------------------------------------------------------------

def test_init_statistics():
    cfg = _config(True)
    _, params = _init(cfg)
    std, cut = 0.006, 3 * 0.006
    # N(0, 1) truncated to +-3 has std 0.98658; metaseq's trunc_normal_ with
    # std 0.006 and bounds +-3 sigma is the same distribution.
    trunc_std = std * 0.98658
    kernels = {
        "token_embedding": params["token_embedding"],
        "query": params["layers"]["attention"]["query"],
        "key": params["layers"]["attention"]["key"],
        "value": params["layers"]["attention"]["value"],
        "out": params["layers"]["attention"]["out"],
        "wi": params["layers"]["mlp"]["wi"],
        "wo": params["layers"]["mlp"]["wo"],
    }
    for name, w in kernels.items():
        assert w.dtype == jnp.float32, name
        w = np.asarray(w, np.float64)
        assert w.size >= 4000, name
        assert abs(w.mean()) < 0.1 * std, name
        assert w.std() == pytest.approx(trunc_std, rel=0.06), (name, w.std())
        assert np.abs(w).max() <= cut * (1 + 1e-5), (name, np.abs(w).max())
        # Truncation actually near 3 sigma (not, say, 2 sigma).
        assert np.abs(w).max() > 2.5 * std, name
    # Layers are initialised independently (scan split the rng).
    q = np.asarray(params["layers"]["attention"]["query"])
    assert not np.allclose(q[0], q[1])

    pos = np.asarray(params["position_embedding"], np.float64)
    assert pos.shape == (T, D)
    assert pos.std() == pytest.approx(0.0002, rel=0.06)
    assert abs(pos.mean()) < 0.0002 * 0.1

    out = np.asarray(params["output_projection"])
    assert out.shape == (D, V)
    assert np.all(out == 0)

    tokens = np.random.default_rng(8).integers(0, V, size=(3, 20))
    logits = _apply(cfg, params, tokens)
    assert np.all(logits == 0)
    targets = np.roll(tokens, -1, axis=1)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.asarray(targets)[..., None], axis=-1).mean()
    assert float(ce) == pytest.approx(math.log(V), rel=1e-6)


# -- d. no biases or norm scales ---------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_no_bias_or_scale_params(scan_layers):
    params = _param_shapes(_config(scan_layers))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert flat
    for path, leaf in flat:
        assert leaf.ndim >= 2, (jax.tree_util.keystr(path), leaf.shape)
    names = {jax.tree_util.keystr(p) for p, _ in flat}
    assert not any("bias" in n or "scale" in n for n in names), names
    # Exactly: token/pos embeddings, output projection, 4 attention + 2 MLP
    # kernels per layer.
    expected = 3 + 6 * (1 if scan_layers else L)
    assert len(flat) == expected, sorted(names)


def test_params_are_logically_partitioned():
    boxed = jax.eval_shape(Decoder(_config(True)).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 4), jnp.int32))["params"]
    q = boxed["layers"]["attention"]["query"]
    assert isinstance(q, nn.LogicallyPartitioned)
    assert q.names == ("layers", "embed", "heads", "kv")
    assert boxed["token_embedding"].names == ("vocab", "embed")
    assert boxed["position_embedding"].names == ("max_length", "embed")
    assert boxed["output_projection"].names == ("embed", "vocab")
    assert boxed["layers"]["mlp"]["wi"].names == ("layers", "embed", "mlp")


# -- e. param counts -------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_param_counts_match_initialised_model(scan_layers):
    cfg = _config(scan_layers, num_layers=3)
    params = _param_shapes(cfg)
    real = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    counts = cfg.param_counts()
    assert counts["total"] == real
    assert counts["token_embedding"] == np.prod(params["token_embedding"].shape)
    assert counts["position_embedding"] == np.prod(params["position_embedding"].shape)
    assert counts["output_projection"] == np.prod(params["output_projection"].shape)
    assert counts["non_embedding"] == real - (
        counts["token_embedding"] + counts["position_embedding"] + counts["output_projection"])


def test_param_counts_with_row_and_column_image_positions():
    cfg = _config(True, num_layers=2, image_positions="rows_cols", image_grid=4, image_id_range=(64, 128))
    params = _param_shapes(cfg)
    assert params["image_row_embedding"].shape == params["image_col_embedding"].shape == (4, cfg.d_model)
    real = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    counts = cfg.param_counts()
    assert counts["total"] == real
    assert counts["position_embedding"] == np.prod(params["position_embedding"].shape) + 8 * cfg.d_model


def test_image_positions_need_a_grid_and_the_image_ids():
    with pytest.raises(ValueError, match="image_id_range"):
        _config(True, image_positions="rows_cols", image_grid=4)
    with pytest.raises(ValueError, match="image_positions"):
        _config(True, image_positions="2d")


def test_param_count_of_a_really_initialised_model():
    _, params = _init(_config(True))
    real = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert _config(True).param_counts()["total"] == real


# -- f. causality -----------------------------------------------------------------------

@pytest.mark.parametrize("scan_layers", [True, False])
def test_causality(scan_layers):
    cfg = _config(scan_layers)
    params = _random_params(scan_layers, seed=9)
    tokens = np.random.default_rng(10).integers(0, V, size=(3, 20))
    changed = tokens.copy()
    k = 11
    changed[:, k] = (changed[:, k] + 17) % V
    a = _apply(cfg, params, tokens)
    b = _apply(cfg, params, changed)
    np.testing.assert_array_equal(a[:, :k], b[:, :k])
    assert np.abs(a[:, k:] - b[:, k:]).max(axis=-1).min() > 1e-4  # later ones do change


def test_too_long_input_raises():
    cfg = _config(True)
    with pytest.raises(ValueError, match="max_length"):
        jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, T + 1), jnp.int32))
