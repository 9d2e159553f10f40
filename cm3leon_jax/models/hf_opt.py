"""Export to transformers' PyTorch `OPTForCausalLM`.

The decoder is exactly `OPTForCausalLM` with `enable_bias=False`,
`layer_norm_elementwise_affine=False`, pre-LN and untied output (PAPER.md,
"Model"), so its weights map one to one: OPT's learned positions are offset
by 2 (rows 0 and 1 are never used), torch Linear weights are (out, in).
The tests and benchmarks use it as the independent reference.
"""
from __future__ import annotations

import jax
import numpy as np


def _layer(params, cfg, i: int):
    if cfg.scan_layers:
        return jax.tree_util.tree_map(lambda a: np.asarray(a[i]), params["layers"])
    return jax.tree_util.tree_map(np.asarray, params[f"layer_{i}"])


def to_hf_opt(cfg, params):
    """An eval-mode `OPTForCausalLM` (fp32, eager attention) with `params`."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    tcfg = OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
        num_hidden_layers=cfg.num_layers, ffn_dim=cfg.d_ff,
        num_attention_heads=cfg.num_heads, max_position_embeddings=cfg.max_length,
        do_layer_norm_before=True, word_embed_proj_dim=cfg.d_model,
        enable_bias=False, layer_norm_elementwise_affine=False,
        tie_word_embeddings=False, activation_function=cfg.activation,
        dropout=0.0, attention_dropout=0.0)
    tcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = OPTForCausalLM(tcfg).eval()
    d = cfg.d_model
    t = lambda a: torch.from_numpy(np.array(a, np.float32, copy=True))  # noqa: E731
    pos = np.asarray(params["position_embedding"])
    sd = {
        "model.decoder.embed_tokens.weight": t(params["token_embedding"]),
        "model.decoder.embed_positions.weight": t(np.concatenate([np.zeros((2, d), np.float32), pos], axis=0)),
        "lm_head.weight": t(np.asarray(params["output_projection"]).T),
    }
    for i in range(cfg.num_layers):
        lp = _layer(params, cfg, i)
        a, m = lp["attention"], lp["mlp"]
        pre = f"model.decoder.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = t(a["query"].reshape(d, d).T)
        sd[pre + "self_attn.k_proj.weight"] = t(a["key"].reshape(d, d).T)
        sd[pre + "self_attn.v_proj.weight"] = t(a["value"].reshape(d, d).T)
        sd[pre + "self_attn.out_proj.weight"] = t(a["out"].reshape(d, d).T)
        sd[pre + "fc1.weight"] = t(m["wi"].T)
        sd[pre + "fc2.weight"] = t(m["wo"].T)
    missing = set(sd) ^ set(model.state_dict())
    if missing:
        raise ValueError(f"OPT state dict mismatch: {sorted(missing)}")
    model.load_state_dict(sd, strict=True)
    return model
