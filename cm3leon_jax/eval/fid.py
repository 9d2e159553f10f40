"""Fréchet distance between two image sets on a pluggable feature extractor
(`cm3leon eval fid`; PAPER.md reports zero-shot MS-COCO FID).

FID fits a Gaussian to each set's features and measures

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

`frechet_distance` computes the trace of the matrix square root without a
general (non-symmetric) `sqrtm`: with A = S_1^(1/2) (symmetric, from an
eigendecomposition), S_1 S_2 = A (A S_2 A) A^(-1) is similar to the
symmetric positive semi-definite A S_2 A, so Tr (S_1 S_2)^(1/2) is the sum of
the square roots of A S_2 A's eigenvalues. This is exact in exact
arithmetic, stays real, and handles singular covariances (fewer images than
feature dimensions) without the offset pytorch-fid adds.

Feature extractors (`make_extractor`):
- "inception": the standard FID network's pool3 features (2,048; the
  InceptionV3 of pytorch-fid / clean-fid, eval/inception.py), from the
  weights file the user supplies;
- "clip": the configured CLIP's L2-normalised image embeddings (CLIP-FID;
  assumption: normalised as for retrieval, so sets are compared on the unit
  sphere the rest of the system uses).

FID is biased upwards on small sets; below `SMALL_SET_WARNING` images per
side a warning is logged (the standard protocols use 10k-50k).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SMALL_SET_WARNING = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FEATURES = ("inception", "clip")


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]) in float64 of features [N, D], N >= 2."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs [N >= 2, D] features, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("feature_statistics: the features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _clip_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise (|w| below d * eps *
    max w) set to 0: a square root would turn 1e-16 noise into 1e-8."""
    tol = max(float(np.max(np.abs(w))), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clip_eigenvalues(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sum(np.sqrt(_clip_eigenvalues(eig))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)


def list_images(directory: str) -> List[str]:
    """Image files directly in `directory` (sorted); ValueError if it has none.
    A `cm3leon generate --out` dir (one with samples.json) gives the samples
    it lists, so its grid.png is not counted as a generated image."""
    if not os.path.isdir(directory):
        raise ValueError(f"image dir {directory!r} does not exist")
    from cm3leon_jax.eval import samples

    if os.path.isfile(os.path.join(directory, samples.SAMPLES_FILE)):
        return sorted(samples.sample_files(directory))
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))
    if not files:
        raise ValueError(f"image dir {directory!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


class ClipFeatures:
    """CLIP image embeddings (L2-normalised) as FID features."""

    name = "clip"

    def __init__(self, clip_dir: str, batch_size: int = 64):
        from cm3leon_jax.retrieval.clip_encoder import ClipEncoder

        self.encoder = ClipEncoder(clip_dir, batch_size=batch_size)
        self.resolution = self.encoder.cfg.image_size
        self.dim = self.encoder.dim

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.encoder.encode_images(images)


def make_extractor(features: str, clip_dir: Optional[str] = None, batch_size: int = 64,
                   inception_weights: Optional[str] = None):
    if features == "inception":
        if not inception_weights:
            raise ValueError("--features=inception needs --inception_weights (pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth; nothing is downloaded)")
        from cm3leon_jax.eval.inception import InceptionFeatures

        return InceptionFeatures(inception_weights, batch_size=batch_size)
    if features == "clip":
        if not clip_dir:
            raise ValueError("--features=clip needs --clip_dir (a CLIP model dir)")
        return ClipFeatures(clip_dir, batch_size=batch_size)
    raise ValueError(f"unknown feature extractor {features!r}; choose from {FEATURES}")


def directory_features(directory: str, extractor, chunk: int = 256, progress: bool = True,
                       files: Optional[Sequence[str]] = None) -> Tuple[np.ndarray, Dict[str, int]]:
    """Features [N, D] of the readable images in `directory` (or of `files`)
    and the skipped files counted by reason (corrupt, too small, ...)."""
    from cm3leon_jax.data.images import BadImageError, load_image

    files = list_images(directory) if files is None else list(files)
    feats, skipped = [], {}
    for start in range(0, len(files), chunk):
        batch = []
        for path in files[start:start + chunk]:
            try:
                batch.append(load_image(path, extractor.resolution))
            except BadImageError as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                logging.warning("skipping %s", e)
        if batch:
            feats.append(np.asarray(extractor(batch), np.float64))
        if progress:
            logging.info("%s: %d / %d images", directory, min(start + chunk, len(files)), len(files))
    if not feats or sum(len(f) for f in feats) < 2:
        raise ValueError(f"image dir {directory!r}: fewer than 2 readable images (skipped: {skipped})")
    return np.concatenate(feats), skipped


def fid_between(real_dir: str, fake_dir: str, extractor, progress: bool = True) -> dict:
    """FID of two image dirs with one extractor, as a JSON-ready dict."""
    real, real_skipped = directory_features(real_dir, extractor, progress=progress)
    fake, fake_skipped = directory_features(fake_dir, extractor, progress=progress)
    fid = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    n = min(len(real), len(fake))
    if n < SMALL_SET_WARNING:
        logging.warning("FID on %d real / %d generated images: below %d per side FID is biased upwards; "
                        "compare only numbers computed on sets of the same size", len(real), len(fake),
                        SMALL_SET_WARNING)
    return {"fid": fid, "features": extractor.name, "num_real": int(len(real)), "num_fake": int(len(fake)),
            "skipped_real": real_skipped, "skipped_fake": fake_skipped, "small_set": n < SMALL_SET_WARNING}


def write_json(result: dict, path: Optional[str]) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
