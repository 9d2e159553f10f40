"""Fréchet distance (eval/fid.py) against a hand-worked case and scipy's
`sqrtm` reference, and `cm3leon eval fid` with CLIP features on shapes
images against noise."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import scipy.linalg

from cm3leon_jax.eval import fid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "retrieval"))
from conftest import run_cli  # noqa: E402


def _scipy_reference(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_hand_worked_one_and_two_dimensions():
    # 1-D: N(0, 1) vs N(3, 4): 9 + 1 + 4 - 2 * sqrt(4) = 10
    assert fid.frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0, abs=1e-12)
    # diagonal 2-D: |(1, 2)|^2 + (1 + 9 - 2*3) + (4 + 1 - 2*2) = 5 + 4 + 1 = 10
    got = fid.frechet_distance([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([9.0, 1.0]))
    assert got == pytest.approx(10.0, abs=1e-12)
    # identical Gaussians: 0
    s = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert fid.frechet_distance([1, 1], s, [1, 1], s) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n,d", [(500, 32), (2000, 64)])
def test_matches_the_scipy_reference(n, d):
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = 0.5 + rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.8
    ma, sa = fid.feature_statistics(a)
    mb, sb = fid.feature_statistics(b)
    np.testing.assert_allclose(sa, np.cov(a, rowvar=False))
    want = _scipy_reference(ma, sa, mb, sb)
    assert fid.frechet_distance(ma, sa, mb, sb) == pytest.approx(want, rel=1e-6)


def test_singular_covariances_stay_finite_and_nonnegative():
    # fewer samples than dimensions: rank-deficient covariances
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64)) + 0.1
    got = fid.frechet_distance(*fid.feature_statistics(a), *fid.feature_statistics(b))
    assert np.isfinite(got) and got >= 0
    # the same set against itself: 0 up to rounding
    assert abs(fid.frechet_distance(*fid.feature_statistics(a), *fid.feature_statistics(a))) < 1e-8


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="N >= 2"):
        fid.feature_statistics(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fid.feature_statistics(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="does not exist"):
        fid.list_images("/nonexistent/dir")


def _write_pngs(directory, images):
    from PIL import Image

    os.makedirs(directory, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(directory, f"{i:05d}.png"))


@pytest.mark.slow
def test_clip_fid_same_distribution_is_far_below_shapes_vs_noise(tmp_path):
    from cm3leon_jax.data import shapes
    from tiny_clip import shared_clip_dir

    n = 2048
    _write_pngs(tmp_path / "a", [e.image for e in shapes.generate(seed=1, num=n)])
    _write_pngs(tmp_path / "b", [e.image for e in shapes.generate(seed=2, num=n)])
    rng = np.random.default_rng(0)
    _write_pngs(tmp_path / "noise", rng.integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8))
    (tmp_path / "noise" / "broken.png").write_bytes(b"not a png")  # counted, not fatal
    clip = shared_clip_dir()

    def run(real, fake):
        proc = run_cli(["eval", "fid", f"--real={tmp_path / real}", f"--fake={tmp_path / fake}",
                        "--features=clip", f"--clip_dir={clip}", f"--out={tmp_path / (real + fake)}.json"])
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out == json.loads((tmp_path / f"{real + fake}.json").read_text())
        return out

    same, noise = run("a", "b"), run("a", "noise")
    assert same["num_real"] == same["num_fake"] == n and not same["small_set"]
    assert noise["num_fake"] == n and noise["skipped_fake"] == {"corrupt or truncated image": 1}
    assert same["fid"] < 0.1 * noise["fid"], (same["fid"], noise["fid"])


def test_cli_names_bad_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli(["eval", "fid", f"--real={tmp_path / 'empty'}", f"--fake={tmp_path}", "--features=clip",
                    "--clip_dir=/nope"], check=False)
    assert proc.returncode == 2 and "holds no images" in proc.stderr and "Traceback" not in proc.stderr


def test_inception_needs_its_weights_file(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / f"{i}.png")
    proc = run_cli(["eval", "fid", f"--real={tmp_path / 'a'}", f"--fake={tmp_path / 'a'}"], check=False)
    assert proc.returncode == 2 and "--inception_weights" in proc.stderr
    proc = run_cli(["eval", "fid", f"--real={tmp_path / 'a'}", f"--fake={tmp_path / 'a'}",
                    f"--inception_weights={tmp_path / 'none.pth'}"], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
