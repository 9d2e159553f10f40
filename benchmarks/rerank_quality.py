"""How well CLIP reranking picks among a prompt's samples: the checker's
whole-caption accuracy of each CLIP's top pick, against the mean sample and
the oracle (the best of the N by the checker itself).

Reads a samples dir that `cm3leon generate` or the demo's generate stage
wrote with N > 1 samples a prompt (samples.json + the PNGs), scores every
image once with the shapes checker, then reranks each prompt's N images with
every `--clip_dir` given (the dir the samples were reranked with, and any
other CLIP: e.g. one trained with another recipe). Split by the number of
shapes in the caption (1 / 2 / 3) and by kind of fact, as
`cm3leon eval shapes` reports them (eval/shapes_breakdown.py). The last line
is JSON.

  python benchmarks/rerank_quality.py --samples_dir=demo_full_out/samples/top_p_cfg3_r1_n8 \
      --clip_dir=demo_full_out/clip --clip_dir=/tmp/clip_other
"""
from __future__ import annotations

import json
import os
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


def picked(results, picks) -> dict:
    """`shapes_breakdown.summarize` of one checker result per prompt: sample
    picks[i] of prompt i."""
    from cm3leon_jax.eval import shapes_breakdown

    return shapes_breakdown.summarize(r[int(j)] for r, j in zip(results, picks))


def main(argv=None) -> dict:
    p = common.make_parser(__doc__)
    p.add_argument("--samples_dir", required=True)
    p.add_argument("--clip_dir", action="append", required=True, help="a CLIP model dir; repeat to compare")
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args(argv)

    from cm3leon_jax.data import shapes_check
    from cm3leon_jax.data.images import read_rgb
    from cm3leon_jax.eval import shapes_breakdown
    from cm3leon_jax.retrieval.clip_encoder import ClipEncoder
    from cm3leon_jax.sampling import rerank

    t0 = time.time()
    try:
        rows = load_samples(a.samples_dir)
    except ValueError as e:
        p.error(str(e))
    n = min(len(files) for _, files in rows)
    images = [[read_rgb(f) for f in files[:n]] for _, files in rows]
    results = [[shapes_check.score(img, prompt) for img in imgs] for (prompt, _), imgs in zip(rows, images)]
    correct = np.array([[r["all_correct"] for r in rs] for rs in results], float)
    result = {"samples_dir": os.path.abspath(a.samples_dir), "prompts": len(rows), "samples_per_prompt": n,
              "mean_sample": shapes_breakdown.summarize(r for rs in results for r in rs),
              "oracle": picked(results, correct.argmax(1)), "clip": {}}
    common.say(f"{len(rows)} prompts x {n} samples; mean sample {result['mean_sample']['accuracy']:.3f}, "
               f"oracle (best by the checker) {result['oracle']['accuracy']:.3f}")
    for clip_dir in a.clip_dir:
        enc = ClipEncoder(clip_dir)
        picks = [int(np.argmax(rerank.clip_scores(enc, prompt, imgs))) for (prompt, _), imgs in zip(rows, images)]
        s = result["clip"][os.path.abspath(clip_dir)] = picked(results, picks)
        common.say(f"CLIP {clip_dir}: {s['accuracy']:.3f} (by shapes "
                   f"{ {k: round(v['accuracy'], 3) for k, v in s['by_shapes'].items()} })")
    result["seconds"] = round(time.time() - t0, 1)
    line = json.dumps(result)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
