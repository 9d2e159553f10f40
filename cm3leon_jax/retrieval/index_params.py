"""Choosing a MIPS index: brute force or ScaNN, and ScaNN's parameters.

`choose_params` picks the index kind from the bank size (exact NumPy search
below `BRUTE_FORCE_MAX_N` keys, ScaNN tree + AH + reorder above) and ScaNN's
build/search parameters, each measured on a clustered bank and each open to
override; `_validate_scann_params` refuses up front what ScaNN would reject
natively or silently misuse.  `MipsIndex.build` goes through it.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np

from cm3leon_jax.retrieval.exact import check_k

# The index kinds (`MipsIndex.kind`).
KINDS = ("brute_force", "scann")

# Below this many keys the automatic choice is exact NumPy search.  Why 20,000
# (measured on this 2-core machine, clustered unit-norm keys, 2,000 queries):
# at n = 20,000 x 512 brute force already serves ~3,000 queries/s (0.3 ms
# each) while ScaNN is only ~4x faster and its build (8.5 s, plus ~5 s to
# import TensorFlow) pays back after ~30,000 queries; at 5,000 x 512 it is
# 2.6x for 1.7 s of build.  CM3Leon issues one query per training example, so
# small banks (tests, tiny configs, shards) lose nothing by staying exact, and
# exact results make them deterministic.  At 200,000 x 512 the same machine
# does ~200-350 exact queries/s and the index is ~40x faster, which is where
# ScaNN is worth its build.  ScaNN also wants data: ~sqrt(n/2) leaves give
# only ~200 keys per leaf at 20,000, below which k-means leaves and AH
# codebooks are poorly fit.
BRUTE_FORCE_MAX_N = 20_000
# Forcing kind="scann" below this is refused: AH's 16 codewords per block and
# the tree's k-means have nothing to learn from, and ScaNN errors out natively
# on very small banks.
SCANN_MIN_N = 1_000

SCANN_KEYS = ("num_leaves", "num_leaves_to_search", "training_sample_size",
              "ah_training_sample_size", "dims_per_block", "anisotropic_quantization_threshold",
              "reorder", "k")
_PARAM_KEYS = ("kind",) + SCANN_KEYS


def choose_params(n: int, dim: int, k: int = 10, **overrides) -> Dict[str, Any]:
    """ScaNN build/search parameters for a bank of `n` keys of width `dim`,
    tuned for recall@k >= 0.95 on clustered unit-norm keys.

    - n < BRUTE_FORCE_MAX_N: {"kind": "brute_force"} (see the constant's note).
    - otherwise tree + AH + reorder (Guo et al. 2020), measured on
      `clustered_bank(200_000, 512, 2_000)` (benchmarks/retrieval.py):

      num_leaves = sqrt(n / 2) (316 at 200k).  sqrt(n) balances scoring the
      centroids against scanning leaves; fewer, larger leaves cut clusters
      less often, and at equal fraction of the bank scanned recall was higher
      (316 leaves, 8 probed (2.5%): 0.97-0.98; 447 leaves, 14 probed (3.1%):
      0.967; 600 leaves, 20 probed (3.3%): 0.934).
      num_leaves_to_search = max(8, num_leaves / 40): 8 of 316 gives recall
      ~0.98 at ~40x the speed of brute force; 6 gave 0.976, 4% of 447 0.96.
      training_sample_size = min(n, 250,000) for the k-means tree.
      ah_training_sample_size = min(n, 50,000): AH fits 16 codewords per 2-d
      block, which 50k points pin down; 200k gave the same recall and took
      the build from ~50 s to ~90 s.
      dims_per_block = 2 (16 codewords each: 4 bits per 2 dims) and
      anisotropic_quantization_threshold = 0.2, the ScaNN paper's setting for
      unit-norm MIPS.
      reorder = 10 x k candidates re-scored exactly in float32: with 8 of
      316 leaves recall was 0.968 / 0.981 / 0.982 for 4 / 6 / 10 x k (2 x k:
      0.85 on 447 leaves) and 20 x k added < 0.002.  6 x k is ~10% faster
      here; 10 x k keeps a margin for keys whose AH error is larger.

      On less clustered keys more leaves must be probed: on
      clustered_bank(30_000, 64, 2_000) (15 keys per cluster, overlapping
      neighbourhoods) the automatic 8 of 122 leaves give recall 0.64 and
      64 leaves are needed for 0.97.  Check recall on real keys with
      `recall_at_k` against `exact_search` and raise num_leaves_to_search
      if it falls short (`MipsIndex.search(..., leaves_to_search=...)`
      tries a value without rebuilding).

    Any key can be overridden (`choose_params(n, d, num_leaves=1000)`,
    `kind="scann"` to force ScaNN on a bank of >= SCANN_MIN_N keys);
    unknown keys are a ValueError.
    """
    unknown = sorted(set(overrides) - set(_PARAM_KEYS))
    if unknown:
        raise ValueError(f"unknown index parameter(s) {unknown}; known: {list(_PARAM_KEYS)}")
    n, dim, k = int(n), int(dim), check_k(k)
    if n < 1 or dim < 1:
        raise ValueError(f"choose_params needs n >= 1 and dim >= 1, got n={n}, dim={dim}")
    kind = overrides.get("kind") or ("brute_force" if n < BRUTE_FORCE_MAX_N else "scann")
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; use one of {list(KINDS)}")
    if kind == "brute_force":
        extra = sorted(set(overrides) - {"kind"})
        if extra:
            raise ValueError(f"parameters {extra} only apply to kind 'scann', but this bank of "
                             f"{n} keys gets 'brute_force': pass kind='scann' to force ScaNN")
        return {"kind": "brute_force"}
    num_leaves = max(16, int(round(math.sqrt(n / 2))))
    params = {
        "kind": "scann",
        "num_leaves": num_leaves,
        "num_leaves_to_search": max(8, int(math.ceil(num_leaves / 40))),
        "training_sample_size": min(n, 250_000),
        "ah_training_sample_size": min(n, 50_000),
        "dims_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder": 10 * k,
        "k": k,
    }
    params.update(overrides)
    _validate_scann_params(params, n)
    return params


def _validate_scann_params(p: Dict[str, Any], n: int) -> None:
    """Catch what ScaNN would reject natively (or silently misuse) up front."""
    if n < SCANN_MIN_N:
        raise ValueError(f"kind 'scann' needs at least {SCANN_MIN_N} keys to train its tree and "
                         f"AH codebooks, the bank has {n}: use kind='brute_force'")
    for key in ("num_leaves", "num_leaves_to_search", "training_sample_size",
                "ah_training_sample_size", "dims_per_block", "reorder", "k"):
        v = p.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"ScaNN parameter {key} must be a positive integer, got {v!r}")
    if p["num_leaves"] > n // 2:
        raise ValueError(f"num_leaves={p['num_leaves']} is too many for {n} keys "
                         "(k-means needs several keys per leaf): use about sqrt(n)")
    if p["num_leaves_to_search"] > p["num_leaves"]:
        raise ValueError(f"num_leaves_to_search={p['num_leaves_to_search']} exceeds "
                         f"num_leaves={p['num_leaves']}")
    thr = p.get("anisotropic_quantization_threshold")
    if not isinstance(thr, (int, float)) or isinstance(thr, bool) or not math.isfinite(thr):
        raise ValueError(f"anisotropic_quantization_threshold must be a finite number, got {thr!r}")
