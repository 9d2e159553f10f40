"""A tiny random-weight CLIP model dir for the retrieval tests: the layout
`cm3leon convert clip` writes (clip_config.json, Orbax checkpoint,
tokenizer/ with an OpenAI-format BPE), built offline in ~2 s."""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import string
import tempfile

import jax
import numpy as np

from cm3leon_jax.models import clip_convert
from cm3leon_jax.models.clip import TOKENIZER_SUBDIR, abstract_params, tiny_config

# Character-level BPE in OpenAI CLIP's vocab.json / merges.txt format: every
# lowercase letter, digit and common punctuation, alone and word-final
# ("</w>"), a few merged words, then BOS and EOS (the largest ids).
_CHARS = list(string.ascii_lowercase + string.digits + ".,'-!?")
_MERGES = ["r e", "re d</w>", "b l", "bl u", "blu e</w>"]
VOCAB = [*_CHARS, *[c + "</w>" for c in _CHARS], "re", "red</w>", "bl", "blu", "blue</w>",
         "<|startoftext|>", "<|endoftext|>"]


def config(**overrides):
    base = dict(vocab_size=len(VOCAB), bos_token_id=len(VOCAB) - 2, eos_token_id=len(VOCAB) - 1,
                pad_token_id=len(VOCAB) - 1, max_position_embeddings=96, projection_dim=32)
    base.update(overrides)
    return tiny_config(**base)


@functools.lru_cache(maxsize=None)
def shared_clip_dir() -> str:
    """One tiny CLIP dir per test process (read-only for the tests)."""
    base = tempfile.mkdtemp(prefix="tiny_clip_")
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    return make_clip_dir(os.path.join(base, "clip"))


def random_params(cfg, seed: int = 0):
    """Random weights drawn in NumPy over `abstract_params`' shapes (compiling
    the Flax init takes seconds): kernels N(0, 1/fan_in), LayerNorm scales
    around 1, everything else N(0, 0.05)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0, fan_in ** -0.5, leaf.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
        if name.endswith("['logit_scale']"):
            return np.float32(cfg.logit_scale_init)
        return (0.05 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params(cfg))


def make_clip_dir(path, seed: int = 0, **overrides) -> str:
    cfg = config(**overrides)
    params = random_params(cfg, seed)
    clip_convert.write_params_dir(str(path), clip_convert.CONFIG_FILE, cfg, params, source="random-init")
    tok = os.path.join(str(path), TOKENIZER_SUBDIR)
    os.makedirs(tok, exist_ok=True)
    with open(os.path.join(tok, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(VOCAB)}, f)
    with open(os.path.join(tok, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return str(path)
