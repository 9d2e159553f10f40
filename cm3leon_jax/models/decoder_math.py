"""The decoder's layer math, shared by the Flax modules (models/decoder.py)
and the KV-cache forward (models/decoding.py): the truncated-normal init,
LayerNorm / RMSNorm / QK-norm, rotary positions, smeared keys, and `dense`,
every projection as one 2-D matmul."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from cm3leon_jax.models.decoder_config import DecoderConfig


def truncated_normal_init(stddev: float, cutoff: float = 3.0):
    """N(0, stddev^2) truncated to +-cutoff*stddev (metaseq's trunc_normal_)."""

    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.truncated_normal(key, -cutoff, cutoff, shape, dtype)

    return init


def layer_norm(x, eps: float):
    """LayerNorm without learnable scale or offset, computed in fp32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x, scale, eps: float):
    """RMSNorm with a learned gain: x / rms(x) in fp32, cast back to x's
    dtype, times `scale` [d] (transformers' LlamaRMSNorm / ChameleonRMSNorm)."""
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * y


def apply_norm(x, scale, cfg: "DecoderConfig"):
    """The config's norm: gain-free LayerNorm (scale is None) or RMSNorm."""
    if cfg.norm == "rmsnorm":
        return rms_norm(x, scale, cfg.layer_norm_epsilon)
    return layer_norm(x, cfg.layer_norm_epsilon)


def head_norm(x, scale, bias, eps: float):
    """QK-norm: LayerNorm of x [..., heads, head_dim] over head_dim only (the
    statistics of each head apart), then a per-head gain and bias [heads,
    head_dim] (transformers' ChameleonLayerNorm)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return y * scale.astype(x.dtype) + bias.astype(x.dtype)


def rotary_tables(positions, head_dim: int, theta: float, dtype):
    """(cos, sin) [B, T, 1, head_dim] for integer positions [B, T]: frequency
    theta^(-2i/head_dim) for i < head_dim/2, the table repeated for both
    halves (the rotate-half layout: dims j and j + head_dim/2 form a pair)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rotary(x, rope):
    """x [B, T, H, K] rotated by `rotary_tables` output: x cos + rotate_half(x) sin,
    rotate_half(x) = concat(-x[K/2:], x[:K/2])."""
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def smear_keys(k, gate, has_prev, time_axis: int, before=None):
    """Smeared keys (Olsson et al. 2022, "In-context learning and induction
    heads"): each key mixed with the key of the token before it,
    sigmoid(gate) k_t + (1 - sigmoid(gate)) k_{t-1}, one gate per key head.

    k: [B, T, H, K] (time_axis 1, the training layout) or [B, H, T, K]
    (time_axis 2, the KV cache's); gate: [H]; has_prev: bool [B, T], False
    where t is the first token of its segment (position 0), which then has
    no previous key to mix in. before: the raw key of the token before
    k's first, k's shape with 1 along time_axis (the KV cache's last
    written key, when a decoding step smears only its new keys); None for
    none."""
    head_axis = 2 if time_axis == 1 else 1
    shape = [1] * k.ndim
    shape[head_axis] = k.shape[head_axis]
    w = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(k.dtype).reshape(shape)
    first = jax.lax.slice_in_dim(k, 0, 1, axis=time_axis)
    before = jnp.zeros_like(first) if before is None else before.astype(k.dtype)
    prev = jnp.concatenate([before, jax.lax.slice_in_dim(k, 0, k.shape[time_axis] - 1, axis=time_axis)],
                           axis=time_axis)
    hp = jnp.expand_dims(has_prev, (2, 3) if time_axis == 1 else (1, 3))
    return w * k + (1 - w) * jnp.where(hp, prev, jnp.zeros((), k.dtype))


def dense(x, w, contract: int = 1):
    """x[..., K1..Kc] . w[K1..Kc, M...] -> [..., M...] as ONE 2-D matmul.

    Same numbers as the equivalent einsum, but XLA:CPU is given a plain
    [rows, K] x [K, M] product, whose backward (dx = g w^T, dw = x^T g) it
    runs as fast 2-D matmuls; an einsum with two batch-like dims (b, t) made
    it transpose the cotangent and run the weight gradient at a fraction of
    the matmul peak (benchmarks/RESULTS.md).
    """
    lead, kdims, mdims = x.shape[:-contract], x.shape[-contract:], w.shape[contract:]
    k = math.prod(kdims)
    if w.shape[:contract] != kdims:
        raise ValueError(f"dense: contracting dims {kdims} of x do not match {w.shape[:contract]} of w")
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, math.prod(mdims)))
    return y.reshape(lead + mdims)
