"""Model dirs and a built retrieval-task data dir for the data tests, made
offline in seconds: a random-weight VQ-GAN (32x32 -> 4x4 codes of 512, the
tiny model's codebook size), a BPE of the tiny model's text size trained on
shapes captions, and the tiny random CLIP of tests/retrieval/tiny_clip.py.
`shapes_task_data()` runs `task_data_builder.build_task_data` (prepare, bank,
index, neighbours) once per test process on `shapes:N` with them: the layout
the built-in shapes tasks read (point $CM3LEON_SHAPES_DATA at it)."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.data import shapes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "retrieval"))
from tiny_clip import shared_clip_dir  # noqa: E402

# 32x32 -> 4x4 codes (tests/train/test_vqgan_trainer.py's MICRO)
MICRO = dict(resolution=32, base_channels=8, channel_multiplier=(1, 2, 2, 2), num_res_blocks=1,
             latent_channels=16, embed_dim=8, num_embeddings=32, num_groups=4)
TINY_CODEBOOK, TINY_TEXT_VOCAB = 512, 1472  # gin/models/cm3leon_tiny.gin
NUM_DOCS = 240


def random_vq_params(cfg, seed=0):
    """Random VQ-GAN weights drawn in NumPy over the init's shapes (Flax's
    eager init takes ~15 s here): kernels N(0, 1/fan_in), norms identity,
    codebook N(0, 1)."""
    from cm3leon_jax.models.vqgan import VQGAN

    abstract = jax.eval_shape(lambda: VQGAN(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, cfg.resolution, cfg.resolution, 3)))["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            return rng.normal(0, np.prod(leaf.shape[:-1]) ** -0.5, leaf.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return np.ones(leaf.shape, np.float32)
        if name.endswith("['bias']"):
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0, 1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def make_vq_dir(path: str, **overrides) -> str:
    from cm3leon_jax.models.vqgan import small_config
    from cm3leon_jax import checkpoints as ckpt_lib
    from cm3leon_jax.train import vqgan_trainer

    cfg = small_config(**dict(MICRO, **overrides))
    vqgan_trainer.save_config(path, cfg)
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(path), 1, None, async_save=False)
    ckpt.save(0, {"params": random_vq_params(cfg)}, {"source": "random-init"}, force=True)
    ckpt.close()
    return path


def make_bpe(path: str, vocab_size: int, extra_lines=()) -> str:
    from cm3leon_jax.data.bpe_training import train_text_tokenizer

    os.makedirs(path, exist_ok=True)
    corpus = os.path.join(path, "captions.txt")
    with open(corpus, "w") as f:
        f.write("\n".join([shapes.generate_example(3, i).caption for i in range(200)] + list(extra_lines)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus supports fewer merges than asked
        return train_text_tokenizer([corpus], vocab_size, os.path.join(path, "bpe"))


@functools.lru_cache(maxsize=None)
def tiny_models() -> dict:
    """Model dirs sized for gin/models/cm3leon_tiny.gin's vocabulary."""
    base = tempfile.mkdtemp(prefix="tiny_models_")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return {"vqgan_dir": make_vq_dir(os.path.join(base, "vqgan"), num_embeddings=TINY_CODEBOOK),
            "text_tokenizer": make_bpe(os.path.join(base, "text"), TINY_TEXT_VOCAB),
            "clip_dir": shared_clip_dir()}


@functools.lru_cache(maxsize=None)
def shapes_task_data(num_docs: int = NUM_DOCS) -> str:
    from cm3leon_jax.data.task_data_builder import build_task_data

    base = tempfile.mkdtemp(prefix="shapes_task_data_")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    build_task_data(f"shapes:{num_docs}", base, **tiny_models(), k=8, records_per_shard=100, progress=False)
    return base
