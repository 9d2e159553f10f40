"""int8 weight-only quantisation for decoding (PAPER.md: CM3Leon's int8
inference, 9.1 s vs 11.8 s in bf16 for one 7B image).

Every matrix of the decoder (attention query/key/value/out, MLP wi/wo, the
output projection, and the token and position embedding tables) is stored as
int8 with one fp32 scale per output channel (symmetric, absmax / 127; per row
for the embedding tables, which are read by row). Activations stay in the
compute dtype: a matmul is `dot(x, q.astype(dtype)) * scale`, exact for the
dequantised weights `q * scale`. LayerNorm has no parameters here, so nothing
else is left in floating point.

`quantize_params(params, cfg)` returns the same tree with each such leaf
replaced by `{"int8": q, "scale": s}`; `models.decoding.cached_forward` (and
so the sampler) accepts either tree. `weight_bytes(tree)` counts the bytes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

INT8_KEY, SCALE_KEY = "int8", "scale"

# leaf name -> how many leading (input) dims are contracted; the output dims
# follow and get one scale each. Embedding tables: rows are the output.
_MATRICES = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wi_gate": 1, "wo": 1, "output_projection": 1}
_TABLES = ("token_embedding", "position_embedding")


def is_quantized(leaf) -> bool:
    return isinstance(leaf, dict) and INT8_KEY in leaf and SCALE_KEY in leaf


def _quantize(w, contract: int, stacked: bool):
    """Symmetric per-output-channel int8 of w; `stacked` keeps a leading
    [layers] axis out of the reduction."""
    w = jnp.asarray(w, jnp.float32)
    lead = 1 if stacked else 0
    axes = tuple(range(lead, lead + contract))
    absmax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return {INT8_KEY: q, SCALE_KEY: scale.astype(jnp.float32)}


def quantize_params(params: dict, cfg) -> dict:
    """int8 copy of a decoder's parameter tree (see the module docstring)."""
    def walk(tree, stacked):
        out = {}
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                out[name] = walk(leaf, stacked or name == "layers")
            elif name in _MATRICES:
                out[name] = _quantize(leaf, _MATRICES[name], stacked)
            elif name in _TABLES:
                # [rows, d]: one scale per row (reduce over d)
                w = jnp.asarray(leaf, jnp.float32)
                absmax = jnp.max(jnp.abs(w), axis=-1, keepdims=True)
                scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
                out[name] = {INT8_KEY: jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8),
                             SCALE_KEY: scale.astype(jnp.float32)}
            else:
                out[name] = leaf
        return out

    del cfg
    return walk(dict(params), False)


def dequantize(leaf, dtype):
    """A weight in `dtype` (int8 leaves: q * scale)."""
    if is_quantized(leaf):
        return (leaf[INT8_KEY].astype(jnp.float32) * leaf[SCALE_KEY]).astype(dtype)
    return jnp.asarray(leaf).astype(dtype)


def matmul(x, leaf, contract: int, dtype):
    """x . w contracting x's last `contract` dims, for a float or int8 leaf."""
    from cm3leon_jax.models.decoder_math import dense

    if not is_quantized(leaf):
        return dense(x, leaf.astype(dtype), contract)
    q, scale = leaf[INT8_KEY], leaf[SCALE_KEY]
    y = dense(x, q.astype(dtype), contract)
    return y * scale.reshape(scale.shape[contract:]).astype(dtype)


def take_rows(leaf, ids):
    """Rows of an embedding table (float32), float or int8."""
    if not is_quantized(leaf):
        return jnp.take(leaf, ids, axis=0)
    return jnp.take(leaf[INT8_KEY], ids, axis=0).astype(jnp.float32) * jnp.take(leaf[SCALE_KEY], ids, axis=0)


def weight_bytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
