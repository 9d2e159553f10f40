"""`cm3leon finetune`: starts from the pretrained params (not its optimizer
state or step), takes the architecture from the init model's config.gin,
and refuses an init checkpoint of another shape with one line."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sft_tasks import _write_fake_sft  # noqa: E402

from cm3leon_jax import vocab as vocab_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "cm3leon_jax.cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})), timeout=600)


def _params(model_dir, step):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.join(model_dir, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_finetune_starts_from_the_pretrained_params(tmp_path):
    import jax

    pre = str(tmp_path / "pre")
    r = _cli(["train", "--gin_file=gin/cm3leon_tiny.gin", "--gin.MIXTURE_OR_TASK_NAME='synthetic_lm'",
              "--gin.TASK_FEATURE_LENGTHS={'targets': 64}", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=2",
              "--gin.train.checkpoint_every=2", "--gin.UnifiedVocabulary.text_vocab_size=448",
              f"--model_dir={pre}"])
    assert r.returncode == 0, r.stderr[-2000:]
    vocab = vocab_lib.UnifiedVocabulary(image_codebook_size=512, text_vocab_size=448)
    data = _write_fake_sft(tmp_path, vocab)
    sft = str(tmp_path / "sft")
    # LR 0: the one step changes nothing, so the saved params are the init's.
    r = _cli(["finetune", "--gin_file=gin/sft_shapes.gin", f"--init_checkpoint={pre}", f"--model_dir={sft}",
              "--gin.MIXTURE_OR_TASK_NAME='shapes_sft_vqa'", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}", "--gin.PEAK_LEARNING_RATE=0.0"],
             env={"CM3LEON_SHAPES_SFT_DATA": data})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "initialised params from" in r.stderr
    a, b = _params(pre, 2), _params(sft, 1)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(b["step"]) == 1  # a fresh optimizer state and step, not the pretraining's (2)
    # the architecture came from the pretrained config.gin
    with open(os.path.join(sft, "config.gin")) as f:
        written = f.read()
    assert "UnifiedVocabulary.text_vocab_size = 448" in written and "shapes_sft_rates.rates" in written
    assert "sft_feature_converter.length_power = 1.0" in written  # float loss weights went through the step
    # the sampler loads the fine-tuned dir (its config.gin binds SFT configurables)
    from cm3leon_jax.sampling import generate

    bundle = generate.load_model(sft)
    assert bundle.step == 1 and bundle.vocab.text_vocab_size == 448
    # another architecture: one line naming the mismatching array, exit 2
    r = _cli(["finetune", "--gin_file=gin/sft_shapes.gin", f"--init_checkpoint={pre}",
              f"--model_dir={tmp_path / 'sft2'}", "--gin.MIXTURE_OR_TASK_NAME='shapes_sft_vqa'",
              "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=2", "--gin.DecoderConfig.d_ff=256",
              "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 8}"], env={"CM3LEON_SHAPES_SFT_DATA": data})
    assert r.returncode == 2 and "does not fit this model" in r.stderr, r.stderr[-2000:]
