"""Binding probe: does a decoder tie each caption word to its own shape?

Scores checkpoints of a trained decoder teacher-forced, without sampling
(about 20 s of CPU a checkpoint on the 200 held-out captions): the
image-code NLL of `caption <break> image` (by number of shapes) and
time_to_quality's binding probe, the share of multi-shape captions whose
real image fits its own caption better than the caption with two shapes'
kinds (colours) swapped, or with the first relation turned to its opposite
(0.5 for a model that reads a bag of words, 1.0 for one that binds), and
the mean margin in nats per image.

It judges a lever by the step at which binding starts, which the image NLL
and short sampled runs do not show (benchmarks/RESULTS.md, "A binding
probe"). With --watch it follows a training as it writes checkpoints (run it
at low priority beside the training) and stops after --until.

Writes one JSON line per checkpoint to --out (appending; steps already there
are skipped) and prints a JSON line last: every row.

Example (the long demo's decoder, while it trains):
  nice -n 19 .venv/bin/python benchmarks/binding_probe.py --model_dir=demo_full_out/model \\
      --data_dir=demo_full_out/data --prompts=demo_full_out/heldout/captions.jsonl \\
      --out=/tmp/probe.jsonl --watch --until=9000
"""
from __future__ import annotations

import argparse
import json
import os
import time

import common
from time_to_quality import read_prompts, teacher_forced


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a `cm3leon train` model dir (checkpoints/ inside)")
    p.add_argument("--data_dir", required=True, help="the prepared shapes data it trained on (for the VQ-GAN and BPE)")
    p.add_argument("--prompts", required=True, help="captions.jsonl with real images (e.g. heldout/captions.jsonl)")
    p.add_argument("--num_prompts", type=int, default=200)
    p.add_argument("--out", required=True, help="JSONL file, one row per checkpoint (appended)")
    p.add_argument("--steps", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="comma-separated checkpoint steps (default: all)")
    p.add_argument("--watch", action="store_true", help="keep polling for new checkpoints")
    p.add_argument("--until", type=int, default=None, help="with --watch: stop once this step is scored")
    p.add_argument("--poll_seconds", type=float, default=30.0)
    return p.parse_args(argv)


def done_steps(path: str) -> set:
    if not os.path.isfile(path):
        return set()
    return {json.loads(line)["step"] for line in open(path) if line.strip()}


def score(args, step: int, captions, image_paths) -> dict:
    import gin

    from cm3leon_jax.sampling import generate as gen_lib

    gin.clear_config()
    bundle = gen_lib.load_model(args.model_dir, data_dir=args.data_dir, step=step)
    gin.clear_config()
    row = {"step": step, **teacher_forced(gen_lib.Generator(bundle), captions, image_paths)}
    b = row["binding"]
    common.say(f"step {step:5d} | image nll {row['image_nll']:.3f} ("
               + " / ".join(f"{v:.3f}" for v in row["image_nll_by_shapes"].values()) + ") | "
               + " | ".join(f"{k}: own fits better {v['prefers_own']:.2f}, margin "
                            f"{v['margin_nats']:+.2f} +- {v['margin_se']:.2f}" for k, v in b.items()))
    return row


def main(argv=None):
    args = parse_args(argv)
    captions, image_paths = read_prompts(args.prompts, args.num_prompts)
    if not image_paths:
        raise SystemExit(f"--prompts={args.prompts}: the probe needs real images (a captions.jsonl)")
    from cm3leon_jax.sampling.generate import checkpoint_steps

    rows = []
    while True:
        have = done_steps(args.out)
        todo = [s for s in checkpoint_steps(args.model_dir) if s not in have
                and (args.steps is None or s in args.steps)]
        for step in todo:
            row = score(args, step, captions, image_paths)
            rows.append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        finished = args.until is not None and args.until in done_steps(args.out)
        if not args.watch or finished:
            break
        time.sleep(args.poll_seconds)
    print(json.dumps({"benchmark": "binding_probe", "model_dir": os.path.abspath(args.model_dir),
                      "rows": rows}), flush=True)


if __name__ == "__main__":
    main()
