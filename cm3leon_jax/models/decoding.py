"""Decoding with a KV cache: a functional forward pass over the parameter
tree of `models.decoder.Decoder` (either layer layout, float or int8), for
the sampler (sampling/sampler.py).

The new tokens' keys and values are written into a cache at absolute slots,
and attention reads every cached slot that is (a) at or after the row's first
real slot (prompts are left-padded) and (b) not after the query's own slot.
It computes what `Decoder.__call__` computes (same ops, same order, fp32
scores and softmax), so greedy decoding with the cache gives the tokens of
re-running the full forward pass at each step (tests/models/test_decoding.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cm3leon_jax.models.decoder_config import DecoderConfig, as_dtype
from cm3leon_jax.models.decoder_math import apply_norm, apply_rotary, head_norm, rotary_tables, smear_keys
from cm3leon_jax.models.image_positions import image_cell_embedding, image_cells


DECODE_BUCKET = 128  # the sampler grows the KV cache in whole buckets of slots


def cache_length(length: int) -> int:
    """`length` rounded up to whole DECODE_BUCKETs."""
    return -(-length // DECODE_BUCKET) * DECODE_BUCKET


# The KV cache is one {"key", "value"} pair per layer, each [batch, heads,
# slots, head_dim]. Measured on XLA:CPU (benchmarks/RESULTS.md, sampler):
# with the slots axis next to head_dim, a step's q.K and p.V are plain
# batched matrix-vector products over contiguous rows; the [B, S, H, K]
# layout made XLA transpose the whole cache in every layer of every step
# (9x slower attention), and a stacked [L, ...] cache carried through a
# fori_loop over layers cost another 1.7x (per-layer slices of the carry).
CACHE_AXES = ("activation_batch", "activation_heads", "activation_length", "activation_kv")


def init_cache(cfg: DecoderConfig, batch: int, length: int, dtype=None) -> tuple:
    """Zero keys and values: a tuple of num_layers {"key", "value"} dicts,
    each [batch, heads, length, head_dim] (heads: the kv_heads, with GQA).

    With `cfg.smeared_keys` the cached keys are the smeared ones, and each
    dict also holds "prev_key" [batch, heads, 1, head_dim]: the raw key of
    the last slot written, which the next step's first key is mixed with
    (so a step smears its own keys only, not the whole cache)."""
    dtype = as_dtype(dtype or cfg.dtype)
    shape = (batch, cfg.kv_heads, length, cfg.head_dim)

    def entry():
        e = {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
        if cfg.smeared_keys:
            e["prev_key"] = jnp.zeros(shape[:2] + (1,) + shape[3:], dtype)
        return e
    return tuple(entry() for _ in range(cfg.num_layers))


def grow_cache(cache: tuple, length: int) -> tuple:
    """The cache with zero slots appended up to `length` (a copy; the
    sampler does it once per DECODE_BUCKET steps). "prev_key" (one slot,
    smeared keys) is kept as it is."""
    def grow(a):
        extra = length - a.shape[2]
        if extra < 0:
            raise ValueError(f"grow_cache: cannot shrink a cache of {a.shape[2]} slots to {length}")
        return jnp.pad(a, ((0, 0), (0, 0), (0, extra), (0, 0))) if extra else a
    return tuple({name: a if name == "prev_key" else grow(a) for name, a in entry.items()} for entry in cache)


def layer_params(params: dict, cfg: DecoderConfig) -> list:
    """One parameter tree per layer, from either layout (scanned: static
    slices of the stacked [layers, ...] leaves, int8 leaves included).

    Called inside a jitted sampler before its decoding loop, the slices are
    made once per call, not once per step."""
    if not cfg.scan_layers:
        return [params[f"layer_{i}"] for i in range(cfg.num_layers)]
    return [jax.tree.map(lambda w, i=i: w[i], params["layers"]) for i in range(cfg.num_layers)]


def cached_forward(params: dict, cfg: DecoderConfig, tokens, positions, start, cache: tuple, index, layers=None,
                   cells=None):
    """Logits [B, T, V] of `tokens` [B, T] placed at cache slots
    [index, index + T), and the updated cache.

    Args:
      positions: [B, T] position ids (the position table's rows, or the
        absolute positions the rotary embedding rotates q and k by; keys are
        cached already rotated).
      start: [B] first real slot of each row (slots before it are padding
        and never attended to).
      cache: `init_cache` output; its slot count S is what the tokens attend
        over (slots after index + T are masked). The sampler sizes it to the
        filled part rounded up to a DECODE_BUCKET (`grow_cache`), so a step
        reads about what has been written, not the whole final cache.
      index: scalar slot of tokens[:, 0]; index + T <= S.
      layers: `layer_params(params, cfg)` if the caller has it already.
      cells: with `cfg.image_positions`, (is_image, cell) [B, T] of the
        tokens (`decoder.image_cells` of the whole sequence); None computes
        them from `tokens` alone, right when `tokens` starts the sequence
        (the prefill) or with a non-image token.

    The layers are unrolled (a Python loop): each layer's cache entry is its
    own buffer, updated in place. `params` may be the float tree or its
    `quantize.quantize_params` int8 copy.
    """
    from cm3leon_jax.models import quantize as q_lib  # int8 weights (--quantize=int8) or float

    dtype = as_dtype(cfg.dtype)
    t = tokens.shape[1]
    s = cache[0]["key"].shape[2]
    rope = None
    if cfg.positions == "learned":
        x = (q_lib.take_rows(params["token_embedding"], tokens)
             + q_lib.take_rows(params["position_embedding"], positions)).astype(dtype)
    else:
        x = q_lib.take_rows(params["token_embedding"], tokens).astype(dtype)
        rope = rotary_tables(positions, cfg.head_dim, cfg.rope_theta, dtype)
    if cfg.image_positions == "rows_cols":
        is_image, cell = image_cells(tokens, cfg) if cells is None else cells
        x = x + image_cell_embedding(jnp.asarray(params["image_row_embedding"]),
                                     jnp.asarray(params["image_col_embedding"]), is_image, cell,
                                     cfg.image_grid).astype(dtype)
    slots = index + jnp.arange(t)
    keys = jnp.arange(s)
    mask = (keys[None, None, :] >= start[:, None, None]) & (keys[None, None, :] <= slots[None, :, None])
    mask = mask[:, None]  # [B, 1, T, S]
    # smeared keys: a new key at slot s is mixed with the raw key of slot
    # s - 1 when s - 1 is a real slot of the row (positions count from the
    # row's first real slot, as in training's segments); the cache holds the
    # smeared keys, and the raw key of its last written slot for the next call
    slot_has_prev = slots[None, :] > start[:, None]  # [B, T]
    act = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}[cfg.activation]
    scale = jnp.asarray(cfg.head_dim ** -0.5, dtype)
    layers = layer_params(params, cfg) if layers is None else layers
    groups = cfg.num_heads // cfg.kv_heads  # query heads per key/value head (GQA)

    def heads_first(y):  # [B, T, H, K] -> [B, H, T, K]
        return jnp.swapaxes(y, 1, 2)

    def norm(y, scale_leaf):
        return apply_norm(y, None if scale_leaf is None else jnp.asarray(scale_leaf).astype(dtype), cfg)

    def attention(a, h, c):
        q = q_lib.matmul(h, a["query"], 1, dtype)
        kk = q_lib.matmul(h, a["key"], 1, dtype)
        if cfg.qk_norm:
            q = head_norm(q, a["query_norm_scale"], a["query_norm_bias"], cfg.qk_norm_epsilon)
            kk = head_norm(kk, a["key_norm_scale"], a["key_norm_bias"], cfg.qk_norm_epsilon)
        if rope is not None:
            q, kk = apply_rotary(q, rope), apply_rotary(kk, rope)
        q = heads_first(q * scale)
        kk = heads_first(kk)
        entry = {}
        if cfg.smeared_keys:
            entry["prev_key"] = kk[:, :, -1:].astype(c["prev_key"].dtype)
            kk = smear_keys(kk, jnp.asarray(a["key_smear"]), slot_has_prev, time_axis=2, before=c["prev_key"])
        kk = kk.astype(c["key"].dtype)
        v = heads_first(q_lib.matmul(h, a["value"], 1, dtype)).astype(c["value"].dtype)
        ck = jax.lax.dynamic_update_slice(c["key"], kk, (0, 0, index, 0))
        cv = jax.lax.dynamic_update_slice(c["value"], v, (0, 0, index, 0))
        read_k = ck.astype(dtype)
        if groups == 1:
            scores = jnp.einsum("bhtk,bhsk->bhts", q, read_k).astype(jnp.float32)
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
            ctx = jnp.einsum("bhts,bhsk->bhtk", probs, cv.astype(dtype))
        else:  # each cached kv head serves `groups` query heads, read without repeating the cache
            b = q.shape[0]
            qg = q.reshape(b, cfg.kv_heads, groups, t, cfg.head_dim)
            scores = jnp.einsum("bgrtk,bgsk->bgrts", qg, read_k).astype(jnp.float32)
            scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
            ctx = jnp.einsum("bgrts,bgsk->bgrtk", probs, cv.astype(dtype)).reshape(q.shape)
        out = q_lib.matmul(jnp.swapaxes(ctx, 1, 2), a["out"], 2, dtype)
        return out, {"key": ck, "value": cv, **entry}

    def mlp(m, h):
        if cfg.mlp_type == "gated":
            hidden = act(q_lib.matmul(h, m["wi_gate"], 1, dtype)) * q_lib.matmul(h, m["wi"], 1, dtype)
        else:
            hidden = act(q_lib.matmul(h, m["wi"], 1, dtype))
        return q_lib.matmul(hidden, m["wo"], 1, dtype)

    new_cache = []
    for p, c in zip(layers, cache):
        n1, n2 = p.get("attention_norm"), p.get("mlp_norm")
        if cfg.swin_norm:
            out, entry = attention(p["attention"], x, c)
            x = x + norm(out, n1)
            x = x + norm(mlp(p["mlp"], x), n2)
        else:
            out, entry = attention(p["attention"], norm(x, n1), c)
            x = x + out
            x = x + mlp(p["mlp"], norm(x, n2))
        new_cache.append(entry)
    x = norm(x, params.get("final_norm"))
    logits = q_lib.matmul(x, params["output_projection"], 1, dtype)
    return logits, tuple(new_cache)
