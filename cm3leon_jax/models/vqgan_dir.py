"""A VQ-GAN model dir, as `cm3leon tokenizer train-image` and `cm3leon convert
vqgan` write it: `vqgan_config.json` beside an Orbax `checkpoints/` dir.
Reading one back is the models layer's job, so the image tokenizer and the
converters need no trainer (ARCHITECTURE.md)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp

from cm3leon_jax import checkpoints as ckpt_lib
from cm3leon_jax.models.vqgan import VQGAN, VQGANConfig

CONFIG_FILE = "vqgan_config.json"


def save_config(model_dir: str, cfg: VQGANConfig):
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)


def load_config(model_dir: str) -> VQGANConfig:
    path = os.path.join(model_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{path} not found: {model_dir} is not a VQ-GAN model dir "
                         "(train one with `cm3leon tokenizer train-image` or import one with "
                         "`cm3leon convert vqgan`)")
    with open(path) as f:
        return VQGANConfig(**json.load(f))


def load_vqgan(model_dir: str):
    """(VQGANConfig, params) from a model dir written by training or convert."""
    cfg = load_config(model_dir)
    ckptr = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(model_dir), 1, None, async_save=False)
    abstract = jax.eval_shape(lambda: VQGAN(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels)))["params"])
    step = ckptr.latest_step()
    if step is None:
        raise ValueError(f"{model_dir}: no checkpoint found under checkpoints/")
    import orbax.checkpoint as ocp
    restored = ocp.StandardCheckpointer().restore(
        os.path.join(ckpt_lib.checkpoint_dir(model_dir), str(step), ckpt_lib.STATE))
    ckptr.close()
    # a training checkpoint holds the train state: its EMA params when kept
    params = restored.get("ema_params") or restored["params"] if "params" in restored else restored
    jax.tree.map(lambda a, b: None, abstract, params)  # structure check: raises on mismatch
    return cfg, params
