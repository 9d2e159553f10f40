"""Import a Chameleon / Janus VQ-VAE (transformers layout, safetensors) into
our VQGAN params. Safetensors only: never pickle.

Key mapping, e.g. for a Janus checkpoint (a Chameleon/Anole one holds the
same keys under `model.vqmodel.`):
    encoder.down.0.block.1.conv1.weight  -> encoder/down_0_block_1/conv1/kernel  (OIHW -> HWIO)
    encoder.mid.attn_1.norm.weight       -> encoder/mid/attn_1/norm/scale
    quantize.embedding.weight            -> codebook
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import numpy as np

from cm3leon_jax.models import safetensors_io
from cm3leon_jax.models.vqgan import VQGANConfig

# Prefixes under which full multimodal checkpoints keep the VQ-VAE.
_PREFIXES = ("model.vqmodel.", "vqmodel.", "model.vqvae.", "vqvae.", "vq_model.", "model.vq_model.", "")


def _module_path(torch_key: str):
    parts = torch_key.split(".")
    leaf = parts[-1]
    out = []
    i = 0
    mods = parts[:-1]
    while i < len(mods):
        p = mods[i]
        if p in ("down", "up", "block", "attn") and i + 1 < len(mods) and mods[i + 1].isdigit():
            name = f"{p}_{mods[i + 1]}"
            # down.0.block.1 -> down_0_block_1 (flat names inside a level)
            if out and re.fullmatch(r"(down|up)_\d+", out[-1]) and p in ("block", "attn"):
                out[-1] = f"{out[-1]}_{name}"
            else:
                out.append(name)
            i += 2
            continue
        if p in ("downsample", "upsample") and out and re.fullmatch(r"(down|up)_\d+", out[-1]):
            out[-1] = f"{out[-1]}_{p}"
            i += 1
            continue
        out.append(p)
        i += 1
    return out, leaf


def convert_state_dict(tensors: Dict[str, np.ndarray]) -> Tuple[dict, dict]:
    """transformers VQ-VAE tensors -> (our params tree, report)."""
    prefix = next((p for p in _PREFIXES if any(k.startswith(p + "encoder.") for k in tensors)), None)
    if prefix is None:
        raise ValueError("no VQ-VAE found: expected keys like 'encoder.conv_in.weight' "
                         "(optionally under 'model.vqmodel.')")
    params: dict = {}
    used, skipped = 0, []
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k == "quantize.embedding.weight":
            params["codebook"] = np.asarray(value, np.float32)
            used += 1
            continue
        if not k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")):
            skipped.append(key)
            continue
        path, leaf = _module_path(k)
        value = np.asarray(value, np.float32)
        if leaf == "weight" and value.ndim == 4:
            name, value = "kernel", value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif leaf == "weight" and value.ndim == 1:
            name = "scale"  # GroupNorm
        elif leaf == "bias":
            name = "bias"
        else:
            skipped.append(key)
            continue
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[name] = value
        used += 1
    if "codebook" not in params:
        raise ValueError("checkpoint has no quantize.embedding.weight (the codebook)")
    return params, {"prefix": prefix, "tensors_used": used, "skipped": skipped}


def config_from_hf(config: dict, resolution: Optional[int] = None) -> VQGANConfig:
    """Our VQGANConfig from a transformers VQ config dict (Chameleon or Janus;
    a full model config is accepted and its `vq_config` used)."""
    vq = config.get("vq_config", config)
    mult = tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4)))
    factor = 2 ** (len(mult) - 1)
    if resolution is None:
        resolution = vq.get("resolution") or vq.get("num_patches", 32) * factor
    is_janus = vq.get("model_type", "").startswith("janus") or "num_patches" in vq
    return VQGANConfig(
        resolution=int(resolution), in_channels=vq.get("in_channels", 3),
        out_channels=vq.get("out_channels", 3), base_channels=vq.get("base_channels", 128),
        channel_multiplier=mult, num_res_blocks=vq.get("num_res_blocks", 2),
        latent_channels=vq.get("latent_channels", 256), embed_dim=vq.get("embed_dim", 256),
        num_embeddings=vq.get("num_embeddings", 8192), num_groups=32,
        l2_normalize_codes_on_decode=is_janus)


def load_hf_vqgan(path: str, resolution: Optional[int] = None) -> Tuple[VQGANConfig, dict, dict]:
    """Read `path` (a directory with config.json + *.safetensors, or one
    .safetensors file with a config.json beside it)."""
    files, cfg_path = safetensors_io.source_files(path)
    tensors, _ = safetensors_io.read_tensors(files)
    if not os.path.exists(cfg_path):
        raise ValueError(f"{cfg_path} not found: the VQ-VAE's config.json is needed for its sizes")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    params, report = convert_state_dict(tensors)
    cfg = config_from_hf(hf_config, resolution)
    return cfg, params, report


def convert_to_model_dir(src: str, out_dir: str, resolution: Optional[int] = None) -> dict:
    """Converts and writes `out_dir` in the layout `vqgan_dir.load_vqgan` reads."""
    import jax
    import jax.numpy as jnp

    from cm3leon_jax.models.vqgan import VQGAN
    from cm3leon_jax import checkpoints as ckpt_lib
    from cm3leon_jax.models.vqgan_dir import save_config

    cfg, params, report = load_hf_vqgan(src, resolution)
    abstract = jax.eval_shape(lambda: VQGAN(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels)))["params"])
    expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    if missing or unexpected or wrong:
        raise ValueError(f"{src}: does not match the VQ-GAN its config describes: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    save_config(out_dir, cfg)
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(out_dir), 1, None, async_save=False)
    ckpt.save(0, {"params": jax.tree.map(jnp.asarray, params)}, {"source": os.path.abspath(src)}, force=True)
    ckpt.close()
    return dict(report, out=out_dir, resolution=cfg.resolution, codes_per_image=cfg.codes_per_image,
                num_embeddings=cfg.num_embeddings, skipped=len(report["skipped"]))
