"""The decoder's configuration: `DecoderConfig` (gin-configurable, bound as
`DecoderConfig.x` in gin/models/*.gin), its checks and its parameter and
FLOP counts, with the gin names of the remat policies and dtypes.

Options for importing Chameleon / Anole weights (models/chameleon_convert.py),
all in `DecoderConfig`, whose defaults are the CM3Leon architecture
(models/decoder.py):
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

Options for small models that must learn images fast (off by default, so
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
  smeared_keys=True     every attention key is mixed with the key of the
                        token before it in its segment, sigmoid(g) k_t +
                        (1 - sigmoid(g)) k_{t-1}, with a learned gate g per
                        key head (key_smear_init at init; 0: half and
                        half). Olsson et al.
                        (2022) found that it lets induction heads, which
                        look up "the token after the one like mine", form
                        at once; here it gives an image code's query, which
                        knows its shape's colour, a key on the word after
                        that colour in the caption (the shape's kind).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import gin
import jax
import jax.numpy as jnp

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
    smeared_keys: bool = False       # keys mixed with the previous token's (see the module docstring)
    key_smear_init: float = 0.0      # the smear gates' initial value g (sigmoid(g) of a key is its own)

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
        norm, the smeared-key gates; 0 for the gain-free LayerNorm)."""
        d, f, v, L = self.d_model, self.d_ff, self.vocab_size, self.num_layers
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + (3 if self.mlp_type == "gated" else 2) * d * f
        norm_per_layer = (2 * d if self.norm == "rmsnorm" else 0) + \
            (2 * (d + kv) if self.qk_norm else 0)
        norm = L * norm_per_layer + (d if self.norm == "rmsnorm" else 0)
        norm += L * self.kv_heads if self.smeared_keys else 0  # the key-smear gates, counted with the gains
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
