"""Time to quality: how fast the demo decoder learns to draw what its captions say.

Trains the decoder with the real `cm3leon train` (a child process) on a
prepared shapes data dir (`cm3leon task-data` layout, e.g. demo_out/data),
saving a checkpoint every --eval_every steps and noting the wall-clock
minutes since the start of training when each appears. Afterwards every
checkpoint samples the held-out captions at one setting (default: top-p 0.9,
T 1, CFG 3, 2 retrieved documents, the demo's base setting) and the shapes
checker scores them:

- whole-caption accuracy of a single sample (sample 0) and, at the last
  checkpoint (every checkpoint with --best_of_every), of the best of
  --best_of samples reranked by CLIP;
- per-fact accuracy (kind, colour, size, position, relation, count) and
  accuracy by number of shapes (eval/shapes_breakdown.py);
- the tokenizer's ceiling: the same scores for the VQ-GAN reconstructions
  of the real held-out images (the best any decoder can do with these codes);
- with real images (a captions.jsonl): the teacher-forced fit of their codes
  in the `caption <break> image` layout (image-code NLL and argmax accuracy),
  a binding probe (does the image fit its own caption better than the
  caption with two shapes' kinds, or colours, swapped?) and how many of
  sample 0's images are exactly the real image's codes (memorisation runs
  prompt with training captions).

Writes OUT/curve.json and OUT/curve.png and prints one JSON line last: the
curve and the training minutes to reach whole-caption accuracy 0.5 (single
sample, and best of N where measured; null when not reached).

Example (the demo's decoder on the demo's data):
  .venv/bin/python benchmarks/time_to_quality.py --data_dir=demo_out/data \
      --prompts=demo_out/heldout/captions.jsonl --out=/tmp/ttq/base --steps=700 --eval_every=100
Extra gin bindings go to `cm3leon train` unchanged:
  ... --gin DecoderConfig.positions="'rotary'" --gin TRAIN_STEPS=1000
Memorisation (train on a small data dir, prompt with its own captions):
  ... --data_dir=/tmp/mem256/data --prompts=/tmp/mem256/corpus/captions.jsonl --num_prompts=128
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import common

TARGET = 0.5


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument("--data_dir", default="demo_out/data", help="prepared shapes data (`cm3leon task-data` --out)")
    p.add_argument("--prompts", default="demo_out/heldout/captions.jsonl",
                   help="captions.jsonl (image folder: also gives the real images for the ceiling) or a "
                        "text file of one caption per line")
    p.add_argument("--num_prompts", type=int, default=200, help="captions scored at each checkpoint")
    p.add_argument("--out", required=True, help="output dir (model/, samples/, curve.json, curve.png)")
    p.add_argument("--train_gin", default="gin/cm3leon_tiny.gin", help="the decoder's full-run gin file")
    p.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE",
                   help="extra gin binding for `cm3leon train` (repeatable)")
    p.add_argument("--steps", type=int, default=700, help="training steps (TRAIN_STEPS)")
    p.add_argument("--eval_every", type=int, default=100, help="checkpoint (and score) every N steps")
    p.add_argument("--cfg_scale", type=float, default=3.0)
    p.add_argument("--num_retrieved", type=int, default=1, help="retrieved documents at sampling (the demo trains with 1)")
    p.add_argument("--decoding", default="top_p", choices=("top_p", "cd_k", "mixed"))
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cd_alpha", type=float, default=None,
                   help="CD-K's alpha (default: SamplingSettings', see benchmarks/cdk_scores.py)")
    p.add_argument("--cd_k", type=int, default=None, help="CD-K's k (default: SamplingSettings')")
    p.add_argument("--best_of", type=int, default=8, help="samples reranked by CLIP at the last checkpoint")
    p.add_argument("--best_of_every", action="store_true", help="best-of-N at every checkpoint, not only the last")
    p.add_argument("--batch_rows", type=int, default=200, help="rows (prompt x sample) per sampler call")
    p.add_argument("--skip_train", action="store_true", help="score the checkpoints already in OUT/model")
    p.add_argument("--score_steps", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="score only these checkpoint steps (comma-separated; default: every one)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    return p.parse_args(argv)


def cd_settings(args) -> dict:
    """The CD-K settings given on the command line (the rest keep their defaults)."""
    return {k: v for k, v in (("cd_alpha", args.cd_alpha), ("cd_k", args.cd_k)) if v is not None}


def read_prompts(path: str, n: int):
    """(captions, image paths or None) of the first n entries."""
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in open(path) if line.strip()][:n]
        base = os.path.dirname(os.path.abspath(path))
        return [r["caption"] for r in rows], [os.path.join(base, r["file"]) for r in rows]
    return [line.strip() for line in open(path) if line.strip()][:n], None


def text_vocab_size(data_dir: str) -> int:
    with open(os.path.join(data_dir, "prepared", "prepared.json")) as f:
        return int(json.load(f)["settings"]["vocabulary"]["text_vocab_size"])


def train(args, model_dir: str) -> dict:
    """Runs `cm3leon train`; returns {step: minutes since its start when the
    checkpoint appeared}. Its output goes to OUT/train.log."""
    cmd = [sys.executable, "-m", "cm3leon_jax.cli", "train", f"--gin_file={args.train_gin}",
           f"--model_dir={model_dir}", f"--gin.shapes_data_dir.path={os.path.abspath(args.data_dir)!r}",
           f"--gin.UnifiedVocabulary.text_vocab_size={text_vocab_size(args.data_dir)}",
           f"--gin.TRAIN_STEPS={args.steps}", f"--gin.train.checkpoint_every={args.eval_every}",
           "--gin.train.keep_checkpoints=None", "--gin.train.log_every=10",
           *[f"--gin.{b}" for b in args.gin]]
    common.say("$ " + " ".join(cmd[2:]))
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    seen, t0 = {}, time.time()
    done = threading.Event()

    def watch():
        while not done.is_set():
            if os.path.isdir(ckpt_dir):
                for name in os.listdir(ckpt_dir):
                    if name.isdigit() and int(name) not in seen:
                        seen[int(name)] = (time.time() - t0) / 60
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()
    with open(os.path.join(args.out, "train.log"), "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    done.set()
    if rc:
        sys.exit(f"cm3leon train failed (exit {rc}); see {os.path.join(args.out, 'train.log')}")
    with open(os.path.join(args.out, "minutes.json"), "w") as f:
        json.dump(seen, f)
    common.say(f"trained {args.steps} steps in {(time.time() - t0) / 60:.1f} min")
    return seen


def loss_at(model_dir: str) -> dict:
    """{step: training loss} from metrics.jsonl."""
    out = {}
    path = os.path.join(model_dir, "metrics.jsonl")
    if os.path.isfile(path):
        for line in open(path):
            row = json.loads(line)
            if "loss" in row:
                out[int(row["step"])] = float(row["loss"])
    return out


def image_logits(g, prefixes, ids):
    """Teacher-forced logits [N, n, V] at the n image positions of each row
    `BOS + prefix + ids[i]` (the BOS that training sequences and the
    sampler's prompts start with): row i's logits that predict ids[i]."""
    import jax.numpy as jnp
    import numpy as np

    from cm3leon_jax import vocab as vocab_lib
    from cm3leon_jax.models.decoder import Decoder

    rows = [[vocab_lib.PAD_ID] + list(p) + list(r) for p, r in zip(prefixes, np.asarray(ids).tolist())]
    width = max(map(len, rows))
    toks = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
    logits = np.asarray(Decoder(g.b.cfg).apply({"params": g.params}, jnp.asarray(toks[:, :-1])), np.float32)
    n = np.asarray(ids).shape[1]
    return np.stack([logits[i, len(r) - 1 - n:len(r) - 1] for i, r in enumerate(rows)])


def code_nll(g, captions, ids):
    """[N, n] NLL of each image code ids[i] after `caption <break>` (no
    retrieved documents: the layout `generate` prompts with), and the
    teacher-forced logits."""
    import numpy as np

    from cm3leon_jax import vocab as vocab_lib

    logits = image_logits(g, [g.text.encode(c).tolist() + [vocab_lib.BREAK_ID] for c in captions], ids)
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0], logits


def binding_probe(g, captions, ids, own_nll) -> dict:
    """Does the model tie each word to its own shape? For every caption with
    two shapes that differ in kind (colour), or with a relation, the image's
    codes are scored under the caption (`own_nll`, code_nll's [N, n] for
    `captions`) and under `swap_attribute`'s swap (the relation: its
    opposite): the share of captions whose own caption fits
    better (0.5 for a bag of words, 1.0 for a model that binds) and the mean
    margin in nats per image."""
    import numpy as np

    from cm3leon_jax.data.shapes import swap_attribute

    out = {}
    for attribute in ("kind", "color", "relation"):
        pairs = [(i, swap_attribute(c, attribute)) for i, c in enumerate(captions)]
        pairs = [(i, sw) for i, sw in pairs if sw]
        if not pairs:
            continue
        sel = np.array([i for i, _ in pairs])
        own = own_nll[sel].sum(1)
        swapped = code_nll(g, [sw for _, sw in pairs], ids[sel])[0].sum(1)
        margin = swapped - own
        out[attribute] = {"captions": int(len(sel)), "prefers_own": round(float((margin > 0).mean()), 4),
                          "margin_nats": round(float(margin.mean()), 3),
                          "margin_se": round(float(margin.std() / np.sqrt(len(sel))), 3)}
    return out


def teacher_forced(g, captions, image_paths) -> dict:
    """The model's fit of `caption <break> image`: mean NLL of the image
    codes, the share of codes that are the argmax given the true codes before
    them, the NLL by number of shapes, and the binding probe."""
    import numpy as np

    from cm3leon_jax.data.images import read_rgb as load_image
    from cm3leon_jax.data.shapes import caption_facts

    codes = g.vq.encode(np.stack([load_image(p) for p in image_paths])).reshape(len(image_paths), -1)
    ids = np.asarray(g.b.vocab.image_code_to_id(codes))
    nll, logits = code_nll(g, captions, ids)
    counts = np.array([len(caption_facts(c).shapes) for c in captions])
    by_shapes = {str(n): float(nll[counts == n].mean()) for n in sorted(set(counts.tolist()))}
    return {"image_nll": float(nll.mean()), "code_accuracy": float((logits.argmax(-1) == ids).mean()),
            "image_nll_by_shapes": by_shapes, "binding": binding_probe(g, captions, ids, nll)}


def evaluate(args, model_dir: str, step: int, captions, best_of: int, image_paths=None) -> dict:
    import gin
    import numpy as np

    from cm3leon_jax.eval import shapes_breakdown
    from cm3leon_jax.data.images import read_rgb as load_image
    from cm3leon_jax.sampling import generate as gen_lib
    from cm3leon_jax.sampling import rerank
    from cm3leon_jax.sampling.sampler import SamplingSettings

    gin.clear_config()
    bundle = gen_lib.load_model(model_dir, data_dir=args.data_dir, step=step)
    gin.clear_config()
    g = gen_lib.Generator(bundle)
    settings = SamplingSettings(args.decoding, temperature=args.temperature, top_p=args.top_p,
                                cfg_scale=args.cfg_scale, **cd_settings(args))
    t = time.time()
    results = g.images_for_prompts(captions, best_of, settings, args.seed, args.num_retrieved,
                                   batch_rows=args.batch_rows)
    first = [imgs[0] for imgs, _, _ in results]
    row = {"step": step, "single": shapes_breakdown.score_images(first, captions),
           "sample_seconds": round(time.time() - t, 1)}
    if image_paths:
        row["teacher_forced"] = teacher_forced(g, captions, image_paths)
        # memorisation: sample 0's codes against the real image's codes
        true = g.vq.encode(np.stack([load_image(p) for p in image_paths])).reshape(len(image_paths), -1)
        drawn = np.stack([codes[0] for _, codes, _ in results]).reshape(true.shape)
        row["redrawn"] = {"images_exact": float((drawn == true).all(axis=1).mean()),
                          "codes_equal": float((drawn == true).mean())}
    if best_of > 1:
        best = []
        for cap, (imgs, _, _) in zip(captions, results):
            order, _ = rerank.rerank(g.clip, cap, imgs, 1)
            best.append(imgs[order[0]])
        row["best_of"] = shapes_breakdown.score_images(best, captions)
        row["best_of_n"] = best_of
        grid_rows = [np.concatenate(list(imgs), axis=1) for imgs, _, _ in results[:8]]
    else:
        grid_rows = [np.concatenate(first[i:i + 8], axis=1) for i in range(0, min(len(first), 64), 8)
                     if len(first[i:i + 8]) == 8]
    if grid_rows:
        from PIL import Image

        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        Image.fromarray(np.concatenate(grid_rows, axis=0)).save(
            os.path.join(args.out, "samples", f"step{step:06d}.png"))
    return row


def minutes_to(curve, key: str, target: float = TARGET):
    for r in curve:
        if key in r and r[key]["accuracy"] >= target:
            return r["minutes"]
    return None


def plot(curve, ceiling, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = [r["minutes"] for r in curve]
    ax = axes[0]
    ax.plot(x, [r["single"]["accuracy"] for r in curve], "o-", label="whole caption, 1 sample")
    best = [(r["minutes"], r["best_of"]["accuracy"]) for r in curve if "best_of" in r]
    if best:
        ax.plot(*zip(*best), "s", label=f"whole caption, best of {curve[-1].get('best_of_n', '')}")
    if ceiling:
        ax.axhline(ceiling["accuracy"], ls="--", c="gray", label="tokenizer ceiling")
    ax.axhline(TARGET, ls=":", c="k")
    ax.set_xlabel("training minutes")
    ax.set_ylabel("checker accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax = axes[1]
    for t in ("kind", "color", "size", "position", "relation", "count"):
        ys = [r["single"]["facts"].get(t, float("nan")) for r in curve]
        ax.plot(x, ys, "o-", label=t)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("fact accuracy (1 sample)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.join(args.out, "model")
    captions, image_paths = read_prompts(args.prompts, args.num_prompts)
    with open(os.path.join(args.data_dir, "prepared", "prepared.json")) as f:
        vqgan_dir = json.load(f)["models"]["vqgan_dir"]
    ceiling = None
    if image_paths:
        from cm3leon_jax.eval.shapes_breakdown import tokenizer_ceiling

        ceiling = tokenizer_ceiling(vqgan_dir, os.path.dirname(os.path.abspath(args.prompts)), len(captions))
        common.say(f"tokenizer ceiling: accuracy {ceiling['accuracy']:.3f}, facts "
                   + ", ".join(f"{k} {v:.2f}" for k, v in ceiling["facts"].items()))
    minutes = {}
    if not args.skip_train:
        minutes = train(args, model_dir)
    elif os.path.isfile(os.path.join(args.out, "minutes.json")):
        minutes = {int(k): v for k, v in json.load(open(os.path.join(args.out, "minutes.json"))).items()}
    from cm3leon_jax.sampling.generate import checkpoint_steps

    steps = checkpoint_steps(model_dir)
    if args.score_steps:
        steps = [s for s in steps if s in args.score_steps]
    losses = loss_at(model_dir)
    curve = []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        row = evaluate(args, model_dir, step, captions, args.best_of if (last or args.best_of_every) else 1,
                       image_paths)
        row["minutes"] = round(minutes.get(step, float("nan")), 2)
        row["loss"] = losses.get(step)
        curve.append(row)
        s = row["single"]
        line = (f"step {step:5d} | {row['minutes']:5.1f} min | loss {row['loss'] or float('nan'):.3f} | "
                f"acc {s['accuracy']:.3f}")
        if "best_of" in row:
            line += f" (best of {row['best_of_n']}: {row['best_of']['accuracy']:.3f})"
        line += " | " + " ".join(f"{k} {v:.2f}" for k, v in s["facts"].items())
        line += " | by shapes " + " ".join(f"{k}:{v['accuracy']:.2f}" for k, v in s["by_shapes"].items())
        if "teacher_forced" in row:
            line += (f" | teacher-forced codes: nll {row['teacher_forced']['image_nll']:.3f}, "
                     f"argmax {row['teacher_forced']['code_accuracy']:.3f}, nll by shapes "
                     + " ".join(f"{k}:{v:.3f}" for k, v in row["teacher_forced"]["image_nll_by_shapes"].items())
                     + " | binding (own caption fits better than the swap) "
                     + " ".join(f"{k} {v['prefers_own']:.2f} ({v['margin_nats']:+.2f} nats)"
                                for k, v in row["teacher_forced"]["binding"].items())
                     + " | redrawn exactly "
                     f"{row['redrawn']['images_exact']:.3f} (codes {row['redrawn']['codes_equal']:.3f})")
        common.say(line)
    result = {"benchmark": "time_to_quality", "out": os.path.abspath(args.out), "steps": args.steps,
              "gin": args.gin, "train_gin": args.train_gin, "prompts": args.prompts,
              "num_prompts": len(captions),
              "setting": {"decoding": args.decoding, "cfg_scale": args.cfg_scale,
                          "num_retrieved": args.num_retrieved, "top_p": args.top_p,
                          "temperature": args.temperature, **cd_settings(args)},
              "tokenizer_ceiling": ceiling, "curve": curve,
              "minutes_to_0.5_single": minutes_to(curve, "single"),
              "minutes_to_0.5_best_of": minutes_to(curve, "best_of")}
    with open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump(result, f, indent=1)
    if curve:
        plot(curve, ceiling, os.path.join(args.out, "curve.png"))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
