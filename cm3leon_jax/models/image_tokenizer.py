"""The image tokenizer as the rest of the system uses it: uint8 images in,
VQ codes out, and back, jitted and batched.

`ImageTokenizer.from_model_dir(D)` loads what `cm3leon tokenizer train-image`
or `cm3leon convert vqgan` wrote. Batches are padded to a fixed size so that
one compiled program serves every call (a corpus of 10,001 images compiles
once, not twice); the padding rows are dropped from the result.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.models.pixels import from_model_range, to_model_range
from cm3leon_jax.models.vqgan import VQGAN, VQGANConfig


class ImageTokenizer:
    """`encode(uint8 [N, R, R, 3]) -> int32 codes [N, R/f * R/f]`,
    `decode(codes) -> uint8 images`. Codes are codebook indices in
    [0, num_embeddings); `vocab.UnifiedVocabulary.image_code_to_id` places
    them in the model's id space."""

    def __init__(self, config: VQGANConfig, params, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"ImageTokenizer: batch_size must be >= 1, got {batch_size}")
        self.config, self.batch_size = config, batch_size
        self.params = jax.tree.map(jnp.asarray, params)
        model = VQGAN(config)
        self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode))
        self._decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQGAN.decode))

    @classmethod
    def from_model_dir(cls, model_dir: str, batch_size: int = 16) -> "ImageTokenizer":
        from cm3leon_jax.models.vqgan_dir import load_vqgan

        cfg, params = load_vqgan(model_dir)
        return cls(cfg, params, batch_size)

    @property
    def resolution(self) -> int:
        return self.config.resolution

    @property
    def codes_per_image(self) -> int:
        return self.config.codes_per_image

    @property
    def codebook_size(self) -> int:
        return self.config.num_embeddings

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _padded(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        chunk = a[start:stop]
        short = self.batch_size - len(chunk)
        if short:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
        return chunk

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images [N, R, R, 3] (or one [R, R, 3]) -> int32 codes [N, C]."""
        images = np.asarray(images)
        single = images.ndim == 3
        if single:
            images = images[None]
        r = self.resolution
        if images.ndim != 4 or images.shape[1:] != (r, r, 3):
            raise ValueError(f"ImageTokenizer.encode expects uint8 images [N, {r}, {r}, 3]; got "
                             f"{images.shape} (load files with cm3leon_jax.data.images.load_image)")
        if images.dtype != np.uint8:
            raise ValueError(f"ImageTokenizer.encode expects uint8 pixels, got {images.dtype}")
        out = np.zeros((len(images), self.codes_per_image), np.int32)
        for start, stop in self._batches(len(images)):
            x = to_model_range(self._padded(images, start, stop))
            out[start:stop] = np.asarray(self._encode(self.params, jnp.asarray(x)))[:stop - start]
        return out[0] if single else out

    def decode(self, codes: np.ndarray, as_uint8: bool = True) -> np.ndarray:
        """codes [N, C] (or one [C]) -> images [N, R, R, 3], uint8 (or float
        in [-1, 1] with as_uint8=False)."""
        codes = np.asarray(codes)
        single = codes.ndim == 1
        if single:
            codes = codes[None]
        if codes.ndim != 2 or codes.shape[1] != self.codes_per_image:
            raise ValueError(f"ImageTokenizer.decode expects codes [N, {self.codes_per_image}]; "
                             f"got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"ImageTokenizer.decode: codes must lie in [0, {self.codebook_size}); "
                             f"got [{codes.min()}, {codes.max()}] (vocabulary ids? map them with "
                             "UnifiedVocabulary.id_to_image_code first)")
        r = self.resolution
        out = np.zeros((len(codes), r, r, 3), np.float32)
        for start, stop in self._batches(len(codes)):
            chunk = self._padded(codes.astype(np.int32), start, stop)
            out[start:stop] = np.asarray(self._decode(self.params, jnp.asarray(chunk)))[:stop - start]
        out = from_model_range(out) if as_uint8 else out
        return out[0] if single else out


def reconstruct(tokenizer: ImageTokenizer, images: np.ndarray, as_uint8: bool = True) -> np.ndarray:
    """decode(encode(images)): what the model sees of an image."""
    return tokenizer.decode(tokenizer.encode(images), as_uint8=as_uint8)


def load_image_tokenizer(model_dir: Optional[str], batch_size: int = 16) -> ImageTokenizer:
    if not model_dir:
        raise ValueError("no image tokenizer given: pass the model dir written by "
                         "`cm3leon tokenizer train-image` or `cm3leon convert vqgan`")
    return ImageTokenizer.from_model_dir(model_dir, batch_size)
