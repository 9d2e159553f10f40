"""How well CLIP reranking picks among a prompt's samples: the checker's
whole-caption accuracy of each CLIP's top pick, against the mean sample and
the oracle (the best of the N by the checker itself).

Reads a samples dir that `cm3leon generate` or the demo's generate stage
wrote with N > 1 samples a prompt (samples.json + the PNGs), scores every
image once with the shapes checker, then reranks each prompt's N images with
every `--clip_dir` given (the dir the samples were reranked with, and any
other CLIP: e.g. one trained with another recipe). Split by the number of
shapes in the caption (1 / 2 / 3). The last line is JSON.

  python benchmarks/rerank_quality.py --samples_dir=demo_full_out/samples/top_p_cfg3_r1_n8 \
      --clip_dir=demo_full_out/clip --clip_dir=/tmp/clip_other
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import common


def load_samples(samples_dir: str):
    """[(prompt, [PNG paths])] from samples.json; ValueError naming the dir
    when it holds fewer than two samples a prompt (nothing to rerank)."""
    path = os.path.join(samples_dir, "samples.json")
    if not os.path.isfile(path):
        raise ValueError(f"--samples_dir={samples_dir!r} has no samples.json (write one with `cm3leon generate` "
                         "or the demo's generate stage)")
    with open(path) as f:
        rows = json.load(f)["prompts"]
    out = [(r["prompt"], [os.path.join(samples_dir, s["file"]) for s in r["samples"]]) for r in rows]
    if not out or min(len(files) for _, files in out) < 2:
        raise ValueError(f"--samples_dir={samples_dir!r}: fewer than 2 samples for some prompt; "
                         "rerank needs --num_samples > 1 and keep >= 2")
    return out


def by_count(per_prompt: np.ndarray, counts: np.ndarray) -> dict:
    """The mean of a per-prompt score, overall and by shape count."""
    out = {"all": round(float(per_prompt.mean()), 4)}
    for k in sorted(set(counts.tolist())):
        out[f"{k}_shapes"] = round(float(per_prompt[counts == k].mean()), 4)
    return out


def main(argv=None) -> dict:
    p = common.make_parser(__doc__)
    p.add_argument("--samples_dir", required=True)
    p.add_argument("--clip_dir", action="append", required=True, help="a CLIP model dir; repeat to compare")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args(argv)

    from cm3leon_jax.data import shapes_check
    from cm3leon_jax.data.images import read_rgb
    from cm3leon_jax.retrieval.clip_encoder import ClipEncoder
    from cm3leon_jax.sampling import rerank

    t0 = time.time()
    rows = load_samples(a.samples_dir)
    n = min(len(files) for _, files in rows)
    images = [[read_rgb(f) for f in files[:n]] for _, files in rows]
    correct = np.zeros((len(rows), n))
    counts = np.zeros(len(rows), int)
    for i, ((prompt, _), imgs) in enumerate(zip(rows, images)):
        for j, img in enumerate(imgs):
            r = shapes_check.score(img, prompt)
            correct[i, j] = r["all_correct"]
            counts[i] = r["num_expected"]
    result = {"samples_dir": os.path.abspath(a.samples_dir), "prompts": len(rows), "samples_per_prompt": n,
              "shape_counts": {str(k): int((counts == k).sum()) for k in sorted(set(counts.tolist()))},
              "mean_sample": by_count(correct.mean(1), counts), "oracle": by_count(correct.max(1), counts),
              "clip": {}}
    common.say(f"{len(rows)} prompts x {n} samples; mean sample {result['mean_sample']['all']:.3f}, "
               f"oracle (best by the checker) {result['oracle']['all']:.3f}")
    for clip_dir in a.clip_dir:
        enc = ClipEncoder(clip_dir)
        picks = np.array([int(np.argmax(rerank.clip_scores(enc, prompt, imgs)))
                          for (prompt, _), imgs in zip(rows, images)])
        result["clip"][os.path.abspath(clip_dir)] = by_count(correct[np.arange(len(rows)), picks], counts)
        common.say(f"CLIP {clip_dir}: {result['clip'][os.path.abspath(clip_dir)]}")
    result["seconds"] = round(time.time() - t0, 1)
    line = json.dumps(result)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
