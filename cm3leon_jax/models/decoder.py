"""The CM3Leon decoder: an OPT-like, pre-LN, bias-free transformer (Flax linen).

Architecture as the paper states it (PAPER.md, "Model"): pre-LayerNorm, no
bias terms, no dropout, LayerNorm without learnable scale/offset, learned
absolute positions (init std 0.0002), all other weights truncated normal
(std 0.006, cut at +-3 sigma), output projection zero-initialised. What the
paper leaves open (heads, FFN width, activation) comes from gin.

Every parameter carries logical axis names ("vocab", "embed", "heads", "kv",
"mlp", "layers", ...) that `partitioning.py` maps to mesh axes by gin rules;
the main activations carry "activation_*" names for the same purpose.

Its sizes and options (Chameleon's norms, rotary positions, QK-norm, gated
MLP and GQA; 2-D positions of image codes) are `DecoderConfig`'s, which
models/decoder_config.py documents one by one; the layer math is in
models/decoder_math.py and the blocked causal attention in
models/causal_attention.py.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from cm3leon_jax.models.causal_attention import attention_mask, causal_attention, num_query_blocks
from cm3leon_jax.models.decoder_config import REMAT_POLICIES, DecoderConfig, as_dtype
from cm3leon_jax.models.decoder_math import (apply_norm, apply_rotary, dense, head_norm, rotary_tables,
                                             smear_keys, truncated_normal_init)
from cm3leon_jax.models.image_positions import image_cell_embedding, image_cells


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


class Attention(nn.Module):
    """Causal multi-head self-attention (the mask must be causal, see
    `causal_attention`). `has_prev` [B, T]: which tokens have a previous
    token in their segment (for `smeared_keys`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, mask, rope=None, has_prev=None):
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
        if cfg.smeared_keys:
            gate = _param(self, "key_smear", nn.initializers.constant(cfg.key_smear_init), (g,), ("heads",), cfg)
            kk = smear_keys(kk, gate, has_prev, time_axis=1)
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
    def __call__(self, x, mask, rope=None, has_prev=None):
        cfg = self.config
        act_axes = ("activation_batch", "activation_length", "activation_embed")
        x = nn.with_logical_constraint(x, act_axes)
        n1, n2 = _norm_scale(self, "attention_norm", cfg), _norm_scale(self, "mlp_norm", cfg)
        if cfg.swin_norm:
            x = x + apply_norm(Attention(cfg, name="attention")(x, mask, rope, has_prev), n1, cfg)
            x = x + apply_norm(MLP(cfg, name="mlp")(x), n2, cfg)
        else:
            x = x + Attention(cfg, name="attention")(apply_norm(x, n1, cfg), mask, rope, has_prev)
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
        has_prev = decoder_positions > 0  # positions restart at 0 in each packed segment

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
            )(cfg, name="layers")(x, mask, rope, has_prev)
        else:
            for i in range(cfg.num_layers):
                x = layer_cls(cfg, name=f"layer_{i}")(x, mask, rope, has_prev)

        x = apply_norm(x, _norm_scale(self, "final_norm", cfg), cfg)
        # Zero-initialised output projection, untied from the token embedding.
        w_out = _param(self, "output_projection", nn.initializers.zeros_init(),
                       (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)
        logits = dense(x, w_out)
        return nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab"))
