"""The frozen CLIP bi-encoder of retrieval, and the identity of its keys.

CM3Leon's retriever (PAPER.md, "Retrieval augmentation"; paper Sec. 2.1,
after RA-CM3) is a frozen CLIP bi-encoder. `ClipEncoder` loads a CLIP model
dir (`cm3leon convert clip`, `cm3leon clip train`) into jitted text and image
encoders over fixed batch shapes that return L2-normalised rows: the
documents' keys (`bank.document_keys`) and the queries' are computed with it.

Keys are only comparable when they come from the same model. The
`embedding_model` string that banks and indexes record (`make_identity`)
holds where the CLIP lives and a fingerprint of what it is
(`model_fingerprint`: config, parameters and tokenizer files);
`same_model` compares two such strings by fingerprint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Optional, Sequence, Tuple

import numpy as np

IDENTITY_PREFIX = "clip:"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def model_fingerprint(cfg, params, tokenizer_files: Sequence[str]) -> str:
    """16 hex digits of SHA-256 over the config, every parameter (path and
    bytes, in path order) and the tokenizer files: two model dirs holding
    the same model give the same fingerprint wherever they live."""
    import jax

    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    for file in sorted(tokenizer_files):
        h.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def make_identity(clip_dir: str, fingerprint: str) -> str:
    """The `embedding_model` string of banks and indexes: where the CLIP
    lives (so `index search` can find it) and what it is (the fingerprint,
    which is what must match)."""
    return f"{IDENTITY_PREFIX}{os.path.abspath(clip_dir)}#{fingerprint}"


def parse_identity(identity: str) -> Tuple[Optional[str], Optional[str]]:
    """(clip dir, fingerprint) of `make_identity`'s string; (None, None) for
    another kind of name (an index built from keys of unknown origin)."""
    if not isinstance(identity, str) or not identity.startswith(IDENTITY_PREFIX) or "#" not in identity:
        return None, None
    path, _, fp = identity[len(IDENTITY_PREFIX):].rpartition("#")
    return path, fp


def same_model(a: str, b: str) -> bool:
    """True when two embedding-model names denote the same CLIP (equal
    fingerprints; the dirs may differ) or are equal strings."""
    fa, fb = parse_identity(a)[1], parse_identity(b)[1]
    return a == b or (fa is not None and fa == fb)


class ClipEncoder:
    """A CLIP model dir ready to embed: jitted text and image encoders over
    fixed [batch_size, ...] shapes, returning L2-normalised float32 rows."""

    def __init__(self, clip_dir: str, batch_size: int = 64, text_tokenizer: Optional[str] = None):
        import jax
        import jax.numpy as jnp

        from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
        from cm3leon_jax.models import clip as clip_lib
        from cm3leon_jax.models import clip_convert

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not os.path.isdir(clip_dir):
            raise ValueError(f"CLIP model dir {clip_dir!r} does not exist (import one with "
                             "`cm3leon convert clip --input=HF_DIR --out=DIR`)")
        self.clip_dir = os.path.abspath(clip_dir)
        self.batch_size = int(batch_size)
        self.cfg, params = clip_convert.load_clip(clip_dir)
        self.params = jax.tree.map(jnp.asarray, params)
        self.tokenizer = CLIPTextTokenizer.from_model_dir(clip_dir, text_tokenizer=text_tokenizer)
        model = clip_lib.CLIP(self.cfg)
        self._text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                              method=clip_lib.CLIP.encode_text))
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip_lib.CLIP.encode_image))
        if self.tokenizer.bpe is not None:
            tok_files = [self.tokenizer.bpe.path]
        else:
            tok_dir = os.path.join(clip_dir, clip_lib.TOKENIZER_SUBDIR)
            tok_files = [os.path.join(tok_dir, f) for f in clip_lib.HF_TOKENIZER_FILES
                         if os.path.isfile(os.path.join(tok_dir, f))]
        self.fingerprint = model_fingerprint(self.cfg, params, tok_files)
        self.identity = make_identity(clip_dir, self.fingerprint)

    @property
    def dim(self) -> int:
        return self.cfg.projection_dim

    # Inputs are prepared (tokenised / resized) apart from encoding so a
    # background thread can prepare the next chunk while XLA runs this one.
    def prepare_texts(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        return self.tokenizer(list(texts))

    def prepare_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from cm3leon_jax.models.clip import preprocess_images

        if not len(images):
            s = self.cfg.image_size
            return np.zeros((0, s, s, self.cfg.num_channels), np.float32)
        return preprocess_images(list(images), self.cfg)

    def _batched(self, fn, arrays: Tuple[np.ndarray, ...]) -> np.ndarray:
        n, b = arrays[0].shape[0], self.batch_size
        out = np.empty((n, self.dim), np.float32)
        for s in range(0, n, b):
            parts = [a[s:s + b] for a in arrays]
            m = parts[0].shape[0]
            if m < b:  # pad to the compiled shape; the padding rows are dropped
                parts = [np.concatenate([p, np.repeat(p[-1:], b - m, axis=0)]) for p in parts]
            out[s:s + m] = np.asarray(fn(self.params, *parts))[:m]
        return _normalise(out)

    def encode_prepared_texts(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._batched(self._text, (ids, mask))

    def encode_prepared_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._batched(self._image, (pixels,))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [len(texts), D] (a text query's key)."""
        return self.encode_prepared_texts(*self.prepare_texts(texts))

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised image embeddings of uint8 [H, W, 3] images."""
        return self.encode_prepared_images(self.prepare_images(images))
