"""The shapes corpus written as an image folder (`write_corpus`), optionally
thinned by the number of shapes per scene (`kept_indices`)."""
from __future__ import annotations

import json
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

from cm3leon_jax.data import shapes


def _check_count_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64).reshape(-1)
    n = shapes.MAX_SHAPES
    if w.size != n or not np.all(np.isfinite(w)) or (w < 0).any() or w.max() <= 0:
        raise ValueError(f"shape_count_weights must be {n} non-negative weights (for 1..{n} shapes), "
                         f"not all 0; got {list(weights)}")
    return w / w.max()


def kept_indices(seed: int, num: int, shape_count_weights: Sequence[float]) -> Iterator[int]:
    """The indices of the first `num` examples of the stream `seed` that
    thinning keeps: an example of n shapes is kept with probability
    w[n-1] / max(w), by a draw of its own (generator [seed, index, 1]), so a
    corpus can hold more of the scenes a model finds hard while each example
    stays the stream's own (`shapes.generate_example(seed, index)`). Equal weights
    keep every index."""
    return (index for index, _ in _kept_scenes(seed, num, shape_count_weights))


def _kept_scenes(seed: int, num: int, shape_count_weights: Sequence[float]):
    """(index, scene) of the examples `kept_indices` keeps, each scene
    sampled once (`shapes.sample_scene`, as `generate_example` does)."""
    w = _check_count_weights(shape_count_weights)
    kept, index = 0, 0
    while kept < num:
        scene = shapes.sample_scene(np.random.default_rng([int(seed), index]))
        n = len(scene[0])
        if w[n - 1] >= 1.0 or np.random.default_rng([int(seed), index, 1]).random() < w[n - 1]:
            yield index, scene
            kept += 1
        index += 1


def write_corpus(out_dir: str, seed: int, num: int, resolution: int = 64, progress: bool = False,
                 desc: str = "corpus", shape_count_weights: Optional[Sequence[float]] = None) -> str:
    """Write `num` examples as `out_dir/00000.png`, ... plus `out_dir/captions.jsonl`
    (one `{"file": "00000.png", "caption": "..."}` per line): the image-folder
    layout the data pipeline reads. Returns the path of captions.jsonl, which
    is written last (under a temporary name until complete). With
    `shape_count_weights`, the examples are the stream's thinned by their
    number of shapes (`kept_indices`); without, the first `num`."""
    from PIL import Image
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    width = max(5, len(str(num - 1)))
    path = os.path.join(out_dir, "captions.jsonl")
    with open(path + ".tmp", "w") as f:
        if shape_count_weights is None:
            examples = shapes.generate(seed, num, resolution)
        else:
            examples = (shapes.example_of_scene(*scene, resolution)
                        for _, scene in _kept_scenes(seed, num, shape_count_weights))
        for i, ex in enumerate(tqdm(examples, total=num, desc=desc, unit="img",
                                    file=sys.stderr, disable=not progress, dynamic_ncols=True, mininterval=2)):
            name = f"{i:0{width}d}.png"
            Image.fromarray(ex.image).save(os.path.join(out_dir, name), compress_level=1)  # lossless; fast
            f.write(json.dumps({"file": name, "caption": ex.caption}) + "\n")
    os.replace(path + ".tmp", path)
    return path
