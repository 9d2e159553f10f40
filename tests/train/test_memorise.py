"""Memorisation (issue 25): a model that cannot fit a few dozen documents has
a defect, not a compute problem.

`cm3leon train` with gin/cm3leon_tiny.gin as the demo runs it (the
retrieval-augmented CM3 task `shapes_cm3_retrieval`, its document mix and
positions) trains on the task data of 24 shapes documents; then `generate`'s
own code (`Generator.images_for_prompts`, greedy, the prompt layout users
get) redraws the image of each training caption. The reference is
independent of the model: the image codes the prepared dataset stores for
that document. Images are 32x32 (4 x 4 codes of a random-weight VQ-GAN).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from conftest import run_cli  # noqa: E402
from task_data import shapes_task_data  # noqa: E402

from cm3leon_jax.data.tasks import SHAPES_DATA_ENV  # noqa: E402

NUM_DOCS = 24


@pytest.mark.slow
def test_tiny_config_redraws_its_training_captions(tmp_path):
    import gin

    from cm3leon_jax.data.prepared import PreparedDataset
    from cm3leon_jax.sampling.generate import Generator, load_model
    from cm3leon_jax.sampling.sampler import SamplingSettings

    data = shapes_task_data(NUM_DOCS)
    model = tmp_path / "model"
    run_cli(["train", "--gin_file=gin/cm3leon_tiny.gin", f"--model_dir={model}", "--gin.TRAIN_STEPS=450",
             "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'targets': 256}", "--gin.DecoderConfig.image_grid=4",
             "--gin.train.checkpoint_every=450", "--gin.train.log_every=50",
             "--gin.train.peak_flops_per_device=1e11"], env={SHAPES_DATA_ENV: data}, timeout=900)
    ds = PreparedDataset(os.path.join(data, "prepared"))
    records = [ds.by_id(i) for i in ds.ids[:NUM_DOCS - 1]]  # the last document is the validation split
    try:
        g = Generator(load_model(str(model), data_dir=data))
    finally:
        gin.clear_config()
    prompts = [r["caption"] for r in records]
    want = np.stack([g.b.vocab.id_to_image_code(np.asarray(r["image_ids"])) for r in records])
    for retrieved in (0, 2):
        out = g.images_for_prompts(prompts, 1, SamplingSettings("greedy"), seed=0, num_retrieved=retrieved,
                                   batch_rows=len(prompts))
        got = np.stack([codes[0] for _, codes, _ in out])
        exact = float(np.mean((got == want).all(axis=1)))
        print(f"{retrieved} retrieved: {exact:.3f} of training images redrawn exactly, "
              f"{float(np.mean(got == want)):.3f} of codes")
        assert exact >= 0.9, (retrieved, exact)
