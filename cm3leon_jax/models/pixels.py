"""The image tokenizer's pixel range: uint8 images in and out, [-1, 1] floats
inside the VQ-GAN."""
import numpy as np


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the VQ-GAN's input range)."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0


def from_model_range(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], clipped."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
