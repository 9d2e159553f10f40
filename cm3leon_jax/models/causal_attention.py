"""Causal self-attention computed in query blocks, with its custom VJP, and
the causal (and packed-segment) mask it requires."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp


def attention_mask(segment_ids: Optional[jax.Array], batch: int, length: int) -> jax.Array:
    """Boolean [batch, 1, q, k] mask: causal, and within one packed segment."""
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (batch, 1, length, length))
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same


# Causal attention is computed in query blocks: block i (rows [i*bs, (i+1)*bs))
# only needs keys [0, (i+1)*bs), so the all-masked upper-right blocks of the
# score matrix are never computed (5/8 of the work for 4 blocks). Masked scores
# contribute exactly exp(-inf)=0 to the softmax, so the result is the unblocked
# one up to summation order.
QUERY_BLOCK_MIN = 128
MAX_QUERY_BLOCKS = 8


def num_query_blocks(length: int) -> int:
    """How many query blocks causal attention over `length` positions uses."""
    block = max(QUERY_BLOCK_MIN, length // MAX_QUERY_BLOCKS)
    if length <= block or length % block:
        return 1
    return length // block


def causal_attention(q, k, v, mask, num_blocks: int = 1):
    """softmax(q k^T masked) v for q, k, v [batch, length, heads, head_dim].

    `mask` is a boolean [batch, 1, q, k] mask that must be causal (it is built
    by `attention_mask`): with num_blocks > 1, keys after a query block are
    not looked at. Scores and softmax in fp32; q is expected pre-scaled.
    The gradient is the one autodiff gives (same formulas), written out so
    that the key/value gradients are plain [k, q] x [q, s] matmuls.
    """
    t = q.shape[1]
    if t % num_blocks:
        raise ValueError(f"causal_attention: length {t} is not divisible by num_blocks={num_blocks}")
    return _blocked_attention(num_blocks, q, k, v, mask)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(num_blocks, q, k, v, mask):
    return _blocked_attention_fwd(num_blocks, q, k, v, mask)[0]


def _blocked_attention_fwd(num_blocks, q, k, v, mask):
    t = q.shape[1]
    bs = t // num_blocks
    # Head-major [b, h, t, k] so that each head is a contiguous matrix.
    qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
    outs, probs = [], []
    for i in range(num_blocks):
        lo, hi = i * bs, (i + 1) * bs
        scores = jnp.einsum("bhqk,bhsk->bhqs", qh[:, :, lo:hi], kh[:, :, :hi]).astype(jnp.float32)
        scores = jnp.where(mask[:, :, lo:hi, :hi], scores, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        probs.append(p)
        outs.append(jnp.einsum("bhqs,bhsk->bhqk", p, vh[:, :, :hi]))
    ctx = outs[0] if num_blocks == 1 else jnp.concatenate(outs, axis=2)
    return jnp.swapaxes(ctx, 1, 2), (qh, kh, vh, tuple(probs))


def _blocked_attention_bwd(num_blocks, res, d_ctx):
    qh, kh, vh, probs = res
    t = qh.shape[2]
    bs = t // num_blocks
    doh = jnp.swapaxes(d_ctx, 1, 2)
    d_q = []
    # dk and dv are accumulated transposed, [b, h, head_dim, t]: their products
    # (q^T ds, do^T p) then contract over the rows of ds/p like a plain NN
    # matmul, where XLA:CPU runs ds^T q / p^T do at half the speed. The
    # barrier keeps XLA from folding the small transposes back into the dots.
    dkT = jnp.zeros(kh.shape[:2] + (kh.shape[3], t), jnp.float32)
    dvT = jnp.zeros(vh.shape[:2] + (vh.shape[3], t), jnp.float32)
    for i, p in enumerate(probs):
        lo, hi = i * bs, (i + 1) * bs
        do_i, q_i = doh[:, :, lo:hi], qh[:, :, lo:hi]
        dp = jnp.einsum("bhqk,bhsk->bhqs", do_i, vh[:, :, :hi]).astype(jnp.float32)
        pf = p.astype(jnp.float32)
        ds = (pf * (dp - jnp.sum(pf * dp, axis=-1, keepdims=True))).astype(qh.dtype)
        d_q.append(jnp.einsum("bhqs,bhsk->bhqk", ds, kh[:, :, :hi]))
        q_iT, do_iT = jax.lax.optimization_barrier((jnp.swapaxes(q_i, 2, 3), jnp.swapaxes(do_i, 2, 3)))
        pad = [(0, 0), (0, 0), (0, 0), (0, t - hi)]
        dkT = dkT + jnp.pad(jnp.einsum("bhkq,bhqs->bhks", q_iT, ds).astype(jnp.float32), pad)
        dvT = dvT + jnp.pad(jnp.einsum("bhkq,bhqs->bhks", do_iT, p).astype(jnp.float32), pad)
    dqh = d_q[0] if num_blocks == 1 else jnp.concatenate(d_q, axis=2)
    # [b, h, t, k] -> [b, t, h, k]; dk/dv from [b, h, k, t] -> [b, t, h, k].
    d_q = jnp.swapaxes(dqh, 1, 2).astype(qh.dtype)
    d_k = jnp.transpose(dkT, (0, 3, 1, 2)).astype(kh.dtype)
    d_v = jnp.transpose(dvT, (0, 3, 1, 2)).astype(vh.dtype)
    return d_q, d_k, d_v, None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
