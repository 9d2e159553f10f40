"""`cm3leon eval shapes` / `eval clip_score` (eval/samples.py) on a
hand-built generate output dir: ground-truth shapes images as the samples,
so the expected scores are known."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from cm3leon_jax.data import shapes
from cm3leon_jax.data import shapes_check
from cm3leon_jax.eval import samples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "retrieval"))
from conftest import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """Prompt 0: its own image (rank 0, top_p) and another scene's (rank 1,
    cd_k); prompt 1: not a shapes caption."""
    from PIL import Image

    d = tmp_path_factory.mktemp("samples")
    examples = list(shapes.generate(seed=5, num=40))
    # a scene the checker reads right, and one whose image fails that caption
    own = next(e for e in examples if shapes_check.score(e.image, e.caption)["all_correct"])
    other = next(e for e in examples if not shapes_check.score(e.image, own.caption)["all_correct"])
    Image.fromarray(own.image).save(d / "000_0.png")
    Image.fromarray(other.image).save(d / "000_1.png")
    Image.fromarray(other.image).save(d / "001_0.png")
    report = {"model_dir": "x", "step": 1, "prompts": [
        {"prompt": own.caption, "samples": [{"file": "000_0.png", "rank": 0, "decoding": "top_p"},
                                            {"file": "000_1.png", "rank": 1, "decoding": "cd_k"}]},
        {"prompt": "a photo of a cat", "samples": [{"file": "001_0.png", "rank": 0, "decoding": "top_p"}]}]}
    (d / "samples.json").write_text(json.dumps(report))
    return d, own, other


def test_shapes_accuracy_by_hand(out_dir):
    d, own, other = out_dir
    got = samples.shapes_accuracy(str(d))
    assert got["accuracy"] == 0.5 and got["top_ranked_accuracy"] == 1.0
    assert got["num_samples"] == 2 and got["num_prompts"] == 1 and got["skipped_non_shapes_prompts"] == 1
    assert got["accuracy_by_decoding"] == {"cd_k": 0.0, "top_p": 1.0}
    want_fraction = (1.0 + shapes_check.score(other.image, own.caption)["fraction_correct"]) / 2
    assert got["fraction_of_facts"] == pytest.approx(want_fraction)
    # the CLI prints and writes the same
    proc = run_cli(["eval", "shapes", f"--samples={d}", f"--out={d / 'shapes.json'}"])
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == json.loads((d / "shapes.json").read_text()) == got


def test_clip_score_is_the_mean_cosine(out_dir):
    from PIL import Image

    from cm3leon_jax.retrieval.clip_encoder import ClipEncoder
    from tiny_clip import shared_clip_dir

    d, own, other = out_dir
    clip = shared_clip_dir()
    got = samples.clip_score(str(d), clip)
    enc = ClipEncoder(clip, batch_size=4)
    pairs = [(own.caption, "000_0.png"), (own.caption, "000_1.png"), ("a photo of a cat", "001_0.png")]
    sims = [float(enc.encode_texts([p])[0] @ enc.encode_images([np.asarray(Image.open(d / f))])[0])
            for p, f in pairs]
    assert got["clip_score"] == pytest.approx(np.mean(sims), abs=1e-5)
    assert got["top_ranked_clip_score"] == pytest.approx((sims[0] + sims[2]) / 2, abs=1e-5)
    assert got["num_samples"] == 3 and got["num_prompts"] == 2


def test_bad_sample_dirs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no samples.json"):
        samples.read_samples(str(tmp_path))
    (tmp_path / "samples.json").write_text(json.dumps(
        {"prompts": [{"prompt": "a red circle", "samples": [{"file": "gone.png", "rank": 0}]}]}))
    with pytest.raises(ValueError, match="missing"):
        samples.read_samples(str(tmp_path))
    proc = run_cli(["eval", "shapes", f"--samples={tmp_path / 'nowhere'}"], check=False)
    assert proc.returncode == 2 and "samples.json" in proc.stderr and "Traceback" not in proc.stderr
