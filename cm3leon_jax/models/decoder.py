"""The CM3Leon decoder: an OPT-like, pre-LN, bias-free transformer (Flax linen).

Architecture as the paper states it (PAPER.md, "Model"): pre-LayerNorm, no
bias terms, no dropout, LayerNorm without learnable scale/offset, learned
absolute positions (init std 0.0002), all other weights truncated normal
(std 0.006, cut at +-3 sigma), output projection zero-initialised. What the
paper leaves open (heads, FFN width, activation) comes from gin.

Every parameter carries logical axis names ("vocab", "embed", "heads", "kv",
"mlp", "layers", ...) that `partitioning.py` maps to mesh axes by gin rules;
the main activations carry "activation_*" names for the same purpose.

Options for importing Chameleon / Anole weights (models/chameleon_convert.py),
all in `DecoderConfig`, whose defaults are the CM3Leon architecture above:
  norm="rmsnorm"        RMSNorm with a learned gain ("scale" params) instead of
                        the gain-free LayerNorm;
  swin_norm=True        Chameleon-34B's norm placement, x + norm(f(x)), instead
                        of pre-norm x + f(norm(x));
  positions="rotary"    rotary embeddings (rope_theta) on q and k over the whole
                        head_dim, rotate-half convention (transformers'
                        Llama/Chameleon); no position_embedding table;
  qk_norm=True          LayerNorm of q and k over head_dim with a per-head gain
                        and bias, shapes (heads, head_dim), before the rotary;
  mlp_type="gated"      wo(act(x wi_gate) * (x wi)); with activation="silu" it
                        is SwiGLU;
  num_kv_heads=N        grouped-query attention: N key/value heads shared by
                        num_heads / N query heads each (None: num_heads).

An option for small models that must learn images fast (off by default, so
the paper's architecture is unchanged):
  image_positions="rows_cols"  learned row and column embeddings (DALL-E's
                        2-D positions) added to every image-code token: the
                        i-th code of a run of image codes sits at row
                        (i mod g^2) // g and column i mod g of a g x g grid
                        (g = image_grid). A run restarts at every non-image
                        token, so the embedding says which cell a code is in
                        wherever the image sits in the sequence (after a
                        caption of any length, after retrieved documents).
                        The 1-D positions stay as they are.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cm3leon_jax.models.image_positions import image_cell_embedding, image_cells

Dtype = Any

# jax.checkpoint policies by the names used in gin (MaxText's habit).
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_out_proj": jax.checkpoint_policies.save_only_these_names("attention_out", "mlp_out"),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(d) -> Dtype:
    if isinstance(d, str):
        if d not in _DTYPES:
            raise ValueError(f"unknown dtype {d!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[d]
    return d


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes and numerics of the decoder (bound in gin/models/*.gin)."""

    vocab_size: int = 64512
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512
    max_length: int = 4096
    activation: str = "relu"
    dtype: str = "bfloat16"  # compute dtype; params are always param_dtype
    param_dtype: str = "float32"
    init_std: float = 0.006
    position_init_std: float = 0.0002
    layer_norm_epsilon: float = 1e-5
    scan_layers: bool = True
    remat_policy: str = "none"
    # -- Chameleon-style options (defaults: CM3Leon's architecture) ------------
    norm: str = "layernorm"          # "layernorm" (no gains) | "rmsnorm" (learned gain)
    swin_norm: bool = False          # x + norm(f(x)) instead of x + f(norm(x))
    positions: str = "learned"       # "learned" absolute table | "rotary"
    rope_theta: float = 10000.0      # rotary base (positions="rotary")
    qk_norm: bool = False            # LayerNorm of q, k over head_dim, per-head gain + bias
    qk_norm_epsilon: float = 1e-5
    mlp_type: str = "dense"          # "dense": wo(act(x wi)) | "gated": wo(act(x wi_gate) * x wi)
    num_kv_heads: Optional[int] = None  # grouped-query attention; None = num_heads
    # -- 2-D positions of image codes (off: the paper's decoder) ---------------
    image_positions: str = "none"    # "none" | "rows_cols" (see the module docstring)
    image_grid: int = 0              # codes per image side (32 for 256x256 at f=8)
    image_id_range: tuple = (0, 0)   # [start, end) of the image-code ids (`image_id_range()` in gin)

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(
                f"DecoderConfig: d_model={self.d_model} is not divisible by "
                f"num_heads={self.num_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"DecoderConfig.remat_policy={self.remat_policy!r}; choose one of "
                f"{sorted(REMAT_POLICIES)}")
        if self.activation not in ("relu", "gelu", "silu"):
            raise ValueError(f"DecoderConfig.activation={self.activation!r}; use relu, gelu or silu")
        for name, allowed in (("norm", ("layernorm", "rmsnorm")), ("positions", ("learned", "rotary")),
                              ("mlp_type", ("dense", "gated")), ("image_positions", ("none", "rows_cols"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r}; use one of {allowed}")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"DecoderConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.image_positions != "none":
            lo, hi = tuple(self.image_id_range)
            if self.image_grid < 1 or not 0 <= lo < hi <= self.vocab_size:
                raise ValueError(
                    f"DecoderConfig.image_positions={self.image_positions!r} needs image_grid >= 1 (got "
                    f"{self.image_grid}) and image_id_range within the vocabulary (got {self.image_id_range}, "
                    f"vocab_size {self.vocab_size}): bind image_id_range = @image_id_range()")
        if self.positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"DecoderConfig: rotary positions need an even head_dim, got {self.head_dim}")
        as_dtype(self.dtype), as_dtype(self.param_dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads (num_kv_heads, or num_heads without GQA)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    # -- counts (cm3leon info, MFU) --------------------------------------------
    def param_counts(self) -> dict:
        """Parameter counts. "non_embedding" is every layer parameter: the
        matmul weights ("layer_matmul": q and out d x d each, k and v
        d x kv_heads x head_dim each, the MLP 2 or, gated, 3 d x d_ff) plus
        the norm gains and biases ("norm": RMSNorm gains, QK-norm, the final
        norm; 0 for the gain-free LayerNorm)."""
        d, f, v, L = self.d_model, self.d_ff, self.vocab_size, self.num_layers
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + (3 if self.mlp_type == "gated" else 2) * d * f
        norm_per_layer = (2 * d if self.norm == "rmsnorm" else 0) + \
            (2 * (d + kv) if self.qk_norm else 0)
        norm = L * norm_per_layer + (d if self.norm == "rmsnorm" else 0)
        position = self.max_length * d if self.positions == "learned" else 0
        position += 2 * self.image_grid * d if self.image_positions == "rows_cols" else 0
        return {
            "non_embedding": L * per_layer + norm,
            "layer_matmul": L * per_layer,
            "norm": norm,
            "token_embedding": v * d,
            "position_embedding": position,
            "output_projection": v * d,
            "total": L * per_layer + norm + 2 * v * d + position,
        }

    def train_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x (matmul params) for the forward and
        backward passes of every weight matmul (the token lookup is not one;
        norm gains are elementwise, not matmuls), plus attention scores and
        values, 2 matmuls of seq_len x d_model per layer (num_heads x
        head_dim, also with GQA, whose shared keys/values are still read by
        every query head), x 2 FLOPs x 3 passes, counted without the causal
        halving (PaLM's and MaxText's convention)."""
        c = self.param_counts()
        matmul_params = c["layer_matmul"] + c["output_projection"]
        attention = 12 * self.num_layers * seq_len * self.d_model
        return 6.0 * matmul_params + attention


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


def attention_mask(segment_ids: Optional[jax.Array], batch: int, length: int) -> jax.Array:
    """Boolean [batch, 1, q, k] mask: causal, and within one packed segment."""
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))[None, None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (batch, 1, length, length))
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return causal & same


def _param(module: nn.Module, name: str, init, shape, axes, cfg: DecoderConfig):
    """A parameter stored with `axes` (its "embed" dim sharded over fsdp by
    the default rules), returned in the compute dtype with its "embed" dim
    renamed "embed_compute" (replicated by the default rules): FSDP gathers
    a weight before the matmul that uses it, and the gradient is
    reduce-scattered back. Without the gather, XLA may split a matmul over
    its fsdp-sharded contracting dim instead, which makes every chip hold a
    partial sum of the whole batch's output: the logits of a 7B step on
    v5e-256 then needed 1 TB per chip (`cm3leon compile`)."""
    p = module.param(name, nn.with_logical_partitioning(init, axes), shape, as_dtype(cfg.param_dtype))
    p = jnp.asarray(p, as_dtype(cfg.dtype))
    return nn.with_logical_constraint(p, tuple("embed_compute" if a == "embed" else a for a in axes))


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


class Attention(nn.Module):
    """Causal multi-head self-attention (the mask must be causal, see
    `causal_attention`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, mask, rope=None):
        cfg = self.config
        h, k, d, g = cfg.num_heads, cfg.head_dim, cfg.d_model, cfg.kv_heads
        init = truncated_normal_init(cfg.init_std)
        wq = _param(self, "query", init, (d, h, k), ("embed", "heads", "kv"), cfg)
        wk = _param(self, "key", init, (d, g, k), ("embed", "heads", "kv"), cfg)
        wv = _param(self, "value", init, (d, g, k), ("embed", "heads", "kv"), cfg)
        wo = _param(self, "out", init, (h, k, d), ("heads", "kv", "embed"), cfg)
        qkv_axes = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        q, kk = dense(x, wq), dense(x, wk)
        if cfg.qk_norm:
            ones, zeros = nn.initializers.ones_init(), nn.initializers.zeros_init()
            q = head_norm(q, _param(self, "query_norm_scale", ones, (h, k), ("heads", "kv"), cfg),
                          _param(self, "query_norm_bias", zeros, (h, k), ("heads", "kv"), cfg),
                          cfg.qk_norm_epsilon)
            kk = head_norm(kk, _param(self, "key_norm_scale", ones, (g, k), ("heads", "kv"), cfg),
                           _param(self, "key_norm_bias", zeros, (g, k), ("heads", "kv"), cfg),
                           cfg.qk_norm_epsilon)
        if rope is not None:
            q, kk = apply_rotary(q, rope), apply_rotary(kk, rope)
        # Scale folded into q before the product, as OPT does.
        q = q * jnp.asarray(k ** -0.5, x.dtype)
        q = nn.with_logical_constraint(checkpoint_name(q, "query_proj"), qkv_axes)
        kk = nn.with_logical_constraint(checkpoint_name(kk, "key_proj"), qkv_axes)
        v = dense(x, wv)
        v = nn.with_logical_constraint(checkpoint_name(v, "value_proj"), qkv_axes)
        if g != h:  # GQA: query head i reads key/value head i // (h / g)
            kk, v = jnp.repeat(kk, h // g, axis=2), jnp.repeat(v, h // g, axis=2)
        ctx = causal_attention(q, kk, v, mask, num_query_blocks(x.shape[1]))
        ctx = nn.with_logical_constraint(ctx, qkv_axes)
        out = dense(ctx, wo, contract=2)
        return checkpoint_name(out, "attention_out")


class MLP(nn.Module):
    config: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init = truncated_normal_init(cfg.init_std)
        wi = _param(self, "wi", init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg)
        wo = _param(self, "wo", init, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg)
        act = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu}[cfg.activation]
        if cfg.mlp_type == "gated":  # wi is the "up" projection, wi_gate the activated one
            wg = _param(self, "wi_gate", init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg)
            hidden = act(dense(x, wg)) * dense(x, wi)
        else:
            hidden = act(dense(x, wi))
        hidden = nn.with_logical_constraint(
            hidden, ("activation_batch", "activation_length", "activation_mlp"))
        out = dense(hidden, wo)
        return checkpoint_name(out, "mlp_out")


def _norm_scale(module: nn.Module, name: str, cfg: DecoderConfig):
    """The RMSNorm gain [d_model] named `name` (None for the gain-free LayerNorm)."""
    if cfg.norm != "rmsnorm":
        return None
    return _param(module, name, nn.initializers.ones_init(), (cfg.d_model,), ("embed",), cfg)


class DecoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)); with swin_norm,
    x + LN(Attn(x)), then x + LN(MLP(x)). `rope`: rotary (cos, sin) or None."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, mask, rope=None):
        cfg = self.config
        act_axes = ("activation_batch", "activation_length", "activation_embed")
        x = nn.with_logical_constraint(x, act_axes)
        n1, n2 = _norm_scale(self, "attention_norm", cfg), _norm_scale(self, "mlp_norm", cfg)
        if cfg.swin_norm:
            x = x + apply_norm(Attention(cfg, name="attention")(x, mask, rope), n1, cfg)
            x = x + apply_norm(MLP(cfg, name="mlp")(x), n2, cfg)
        else:
            x = x + Attention(cfg, name="attention")(apply_norm(x, n1, cfg), mask, rope)
            x = x + MLP(cfg, name="mlp")(apply_norm(x, n2, cfg))
        x = nn.with_logical_constraint(x, act_axes)
        if cfg.scan_layers:
            return x, None
        return x


class Decoder(nn.Module):
    """Tokens -> logits. Inputs follow SeqIO's DecoderFeatureConverter:
    `decoder_input_tokens`, optional `decoder_segment_ids` (packing; 0 = pad)
    and `decoder_positions` (restart at 0 in each packed segment)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, decoder_input_tokens, decoder_segment_ids=None, decoder_positions=None):
        cfg = self.config
        b, t = decoder_input_tokens.shape
        if t > cfg.max_length:
            raise ValueError(f"sequence length {t} exceeds DecoderConfig.max_length={cfg.max_length}")
        if decoder_positions is None:
            decoder_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        tok_table = self.param(
            "token_embedding",
            nn.with_logical_partitioning(truncated_normal_init(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), as_dtype(cfg.param_dtype))
        dtype = as_dtype(cfg.dtype)
        rope = None
        if cfg.positions == "learned":
            pos_table = self.param(
                "position_embedding",
                nn.with_logical_partitioning(nn.initializers.normal(cfg.position_init_std), ("max_length", "embed")),
                (cfg.max_length, cfg.d_model), as_dtype(cfg.param_dtype))
            x = (jnp.take(tok_table, decoder_input_tokens, axis=0)
                 + jnp.take(pos_table, decoder_positions, axis=0)).astype(dtype)
        else:  # rotary: no table; q and k are rotated in every layer
            x = jnp.take(tok_table, decoder_input_tokens, axis=0).astype(dtype)
            rope = rotary_tables(decoder_positions, cfg.head_dim, cfg.rope_theta, dtype)
        if cfg.image_positions == "rows_cols":
            init = nn.initializers.normal(cfg.position_init_std)
            rows, cols = (self.param(name, nn.with_logical_partitioning(init, ("image_grid", "embed")),
                                     (cfg.image_grid, cfg.d_model), as_dtype(cfg.param_dtype))
                          for name in ("image_row_embedding", "image_col_embedding"))
            is_image, cell = image_cells(decoder_input_tokens, cfg)
            x = x + image_cell_embedding(rows, cols, is_image, cell, cfg.image_grid).astype(dtype)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        mask = attention_mask(decoder_segment_ids, b, t)

        layer_cls = DecoderLayer
        policy = REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            x, _ = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, name="layers")(x, mask, rope)
        else:
            for i in range(cfg.num_layers):
                x = layer_cls(cfg, name=f"layer_{i}")(x, mask, rope)

        x = apply_norm(x, _norm_scale(self, "final_norm", cfg), cfg)
        # Zero-initialised output projection, untied from the token embedding.
        w_out = _param(self, "output_projection", nn.initializers.zeros_init(),
                       (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)
        logits = dense(x, w_out)
        return nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab"))
