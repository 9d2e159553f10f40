"""The analytic FLOP count of the decoder's train step, for `cm3leon compile`
to compare with the compiler's: 6 x matmul params x tokens for forward +
backward, the attention products of the blocked causal attention
(models/causal_attention.py computes only the query blocks' visible keys)
x 3, plus what the remat policy recomputes in the backward pass. The matmul
parameters are read off the abstract params by layer kind."""
from __future__ import annotations

import jax
import numpy as np


def _param_groups(params) -> dict:
    """Matmul parameter counts per layer-kind, read off the abstract params:
    {"qkv", "attn_out", "mlp_in", "mlp_out", "other_layer", "output", "lookup"}
    (summed over layers). Lookup tables (token / position embedding) and
    vectors (norm gains) do no matmul FLOPs."""
    groups = dict.fromkeys(("qkv", "attn_out", "mlp_in", "mlp_out", "other_layer", "output", "lookup"), 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[-1] == "value":  # a flax LogicallyPartitioned box
            names = names[:-1]
        size = int(np.prod(leaf.shape))
        last = names[-1]
        in_layers = names[0] == "layers" or names[0].startswith("layer_")
        matrix_dims = len(leaf.shape) - (1 if names[0] == "layers" else 0)
        if last in ("token_embedding", "position_embedding"):
            groups["lookup"] += size
        elif last == "output_projection":
            groups["output"] += size
        elif not in_layers or matrix_dims < 2 or "norm" in "/".join(names).lower():
            groups["lookup"] += size  # gains and biases: no matmul
        elif "attention" in names:
            groups["attn_out" if last in ("out", "o_proj") else "qkv"] += size
        elif "mlp" in names:
            groups["mlp_out" if last in ("wo", "down", "down_proj") else "mlp_in"] += size
        else:
            groups["other_layer"] += size
    return groups


def attention_flops_per_sequence(cfg, seq_len: int) -> float:
    """Forward FLOPs of q.k^T and p.v over all layers for one sequence, for
    the blocked causal attention of models/causal_attention.py: query block i (of nb)
    looks at keys [0, (i + 1) x block)."""
    from cm3leon_jax.models.causal_attention import num_query_blocks

    nb = num_query_blocks(seq_len)
    bs = seq_len // nb
    visible = bs * bs * nb * (nb + 1) // 2      # (query, key) pairs computed
    width = cfg.num_heads * cfg.head_dim
    return cfg.num_layers * 2 * 2 * visible * width


def recomputed_matmul_params(groups: dict, remat_policy: str) -> tuple[int, bool]:
    """(layer matmul params whose forward the backward pass recomputes, whether
    the attention products are recomputed) for a remat policy of
    models/decoder_config.py REMAT_POLICIES.

    The MLP's output projection is never recomputed: the backward pass needs
    the inputs of a layer's matmuls, and that projection's output feeds only
    the residual stream (the next layer's input, already saved), so XLA drops
    its recomputation as dead code. Counting it would put the 7B's full-remat
    step at 0.928 of the analytic count; without it, 1.002."""
    layer = groups["qkv"] + groups["attn_out"] + groups["mlp_in"] + groups["mlp_out"] + groups["other_layer"]
    live = layer - groups["mlp_out"]
    table = {
        "none": (0, False),
        "dots": (0, False),
        "dots_with_no_batch_dims": (0, True),
        "save_qkv_proj": (live - groups["qkv"], True),
        "save_out_proj": (live - groups["attn_out"], True),
        "full": (live, True),
    }
    if remat_policy not in table:
        raise ValueError(f"no analytic recompute count for remat_policy={remat_policy!r}; "
                         f"known: {sorted(table)}")
    return table[remat_policy]


def analytic_flops(cfg, params, batch_size: int, seq_len: int) -> dict:
    """Whole-step FLOPs (all chips) of the train step, by term."""
    groups = _param_groups(params)
    matmul = sum(v for k, v in groups.items() if k != "lookup")
    tokens = batch_size * seq_len
    attn_fwd = attention_flops_per_sequence(cfg, seq_len) * batch_size
    re_params, re_attn = recomputed_matmul_params(groups, cfg.remat_policy)
    model = 6.0 * matmul * tokens + 3.0 * attn_fwd
    recompute = 2.0 * re_params * tokens + (attn_fwd if re_attn else 0.0)
    return {"matmul_params": matmul, "tokens": tokens, "matmul_6NT": 6.0 * matmul * tokens,
            "attention_fwd_bwd": 3.0 * attn_fwd, "remat_recompute": recompute,
            "model_flops": model, "total": model + recompute}
