"""Reading transformers checkpoints for the `cm3leon convert` importers
(VQ-GAN, CLIP, Chameleon): safetensors only. A pickled checkpoint
(`pytorch_model.bin`, `.pt`, ...) can run code when loaded, so it is never
opened: the error names it and says how to re-save it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
RESAVE = "re-save the model with `save_pretrained(..., safe_serialization=True)`"


def source_files(path: str, flag: str = "--input", allow_file: bool = True) -> Tuple[List[str], str]:
    """(the *.safetensors files, the config.json path) of `path`: a
    `save_pretrained` directory, or (when `allow_file`) one .safetensors file
    with its config.json beside it. ValueError naming `flag` and the path for
    anything else; the config file's existence is the caller's check."""
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path!r} does not exist")
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        files = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
        if not files:
            pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
            found = f" (found {', '.join(pickles)})" if pickles else ""
            raise ValueError(f"{path}: no .safetensors files{found}. safetensors is required: pickled "
                             f"checkpoints are never loaded; {RESAVE}")
        return files, os.path.join(path, "config.json")
    if not allow_file:
        raise ValueError(f"{flag} {path!r} is not a directory (a `save_pretrained` dir with config.json "
                         "and *.safetensors)")
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: expected a directory with config.json + *.safetensors or a .safetensors "
                         "file (safetensors is required: pickles are never loaded)")
    return [path], os.path.join(os.path.dirname(path) or ".", "config.json")


def read_tensors(files: List[str]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(every tensor of the files as numpy, bf16/fp16 as ml_dtypes; the file
    each came from). A damaged file: ValueError naming it."""
    from safetensors import safe_open

    tensors, origin = {}, {}
    for file in files:
        try:
            with safe_open(file, framework="np") as f:
                for k in f.keys():
                    tensors[k] = f.get_tensor(k)
                    origin[k] = file
        except Exception as e:  # noqa: BLE001 - a damaged file: one line naming it
            raise ValueError(f"{file}: not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    return tensors, origin
