"""Paths that are either local or URLs (`gs://bucket/...` on a TPU pod).

A local path goes to `os` and the built-in `open` exactly as before; a URL
(anything with `://`) goes to `tf.io.gfile`, which reads and writes Google
Cloud Storage (and `ram://`, TensorFlow's in-memory file system, which the
tests use to prove that no local file call is left on a path). Orbax
checkpoints take the URL as it is (checkpoints.py).
"""
from __future__ import annotations

import builtins
import io
import os
from typing import List, Optional


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def abspath(path) -> str:
    """os.path.abspath for a local path; a URL unchanged (abspath would make
    `gs://b/x` into `<cwd>/gs:/b/x`)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def exists(path) -> bool:
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    g = _gfile()
    return g.exists(path) and not g.isdir(path)


def listdir(path) -> List[str]:
    """Entry names (GCS lists sub-directories with a trailing `/`: stripped)."""
    if not is_url(path):
        return os.listdir(path)
    return [name.rstrip("/") for name in _gfile().listdir(path)]


def makedirs(path) -> None:
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove(path) -> None:
    if is_url(path):
        _gfile().remove(path)
    else:
        os.remove(path)


def open(path, mode: str = "r", encoding: Optional[str] = None):  # noqa: A001 - mirrors builtins.open
    """builtins.open for a local path; tf.io.gfile.GFile (UTF-8 text) for a
    URL. Modes r, w, a (+ b)."""
    if not is_url(path):
        return builtins.open(path, mode, encoding=encoding)
    return _gfile().GFile(path, mode)


def load_npy(path, mmap_mode: Optional[str] = None):
    """np.load of a .npy file: memory-mapped when asked for a local path; a
    URL is read whole into memory (no mmap over GCS)."""
    import numpy as np

    if not is_url(path):
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    import tensorflow as tf

    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
    except tf.errors.OpError as e:  # NotFoundError etc. are no OSError: callers catch OSError
        raise OSError(f"cannot read {path}: {e.message}") from None
    return np.load(io.BytesIO(data), allow_pickle=False)
