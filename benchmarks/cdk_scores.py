"""What CD-K prefers at this scale: its choices on real held-out images, teacher-forced.

For each held-out image (captions.jsonl of an image folder), the model reads
the true image codes after the two prompts `generate` builds
(`Generator.image_prompt`: the retrieved documents, then the caption and
`<break>` for the expert stream, `<mask:0> <break>` for the amateur stream).
At every image position it takes both streams' logits over the image codes
(the sampler's modality constraint) and, for each (alpha, k) asked, the code
CD-K would pick there (`guidance.contrastive_scores`: allowed are codes with
p_EXP >= alpha * kmax(p_EXP), the pick maximises log p_EXP - log p_AMA).

Reported per (alpha, k), separately for background positions (the true code
is the blank-background code, the most frequent code of the set) and shape
positions:
- `pick_is_true`: the pick is the true code; `pick_is_argmax`: it is the
  expert's most likely code (what greedy decoding would take);
- `expert_p_median`: the expert's probability of the pick;
- `expert_p_below_1pct`: the share of picks the expert itself gives < 1%;
- `allowed_median`: how many codes pass the plausibility test.
The same numbers for the expert's argmax are the reference row
(`greedy`). Prints one JSON line last.

  .venv/bin/python benchmarks/cdk_scores.py --model_dir=/tmp/ttq/run/model \\
      --data_dir=demo_out/data --images=demo_out/heldout --grid 0.1,5 0.5,1
"""
from __future__ import annotations

import json
import os

import common
from time_to_quality import image_logits


def parse_args(argv=None):
    p = common.make_parser(__doc__)
    p.add_argument("--model_dir", required=True, help="a `cm3leon train` model dir")
    p.add_argument("--data_dir", default="demo_out/data", help="prepared shapes data (the memory bank)")
    p.add_argument("--images", default="demo_out/heldout", help="image folder with captions.jsonl")
    p.add_argument("--num_images", type=int, default=100)
    p.add_argument("--num_retrieved", type=int, default=2)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--grid", nargs="+", default=["0.1,5", "0.1,1", "0.5,1", "0.9,1", "0.5,2"],
                   metavar="ALPHA,K", help="CD-K settings to score")
    return p.parse_args(argv)


def summarize(pick, true, expert_logp, allowed_counts, where) -> dict:
    import numpy as np

    p_pick = np.exp(np.take_along_axis(expert_logp, pick[..., None], -1)[..., 0])
    argmax = expert_logp.argmax(-1)
    return {"positions": int(where.sum()),
            "pick_is_true": float((pick == true)[where].mean()),
            "pick_is_argmax": float((pick == argmax)[where].mean()),
            "expert_p_median": float(np.median(p_pick[where])),
            "expert_p_below_1pct": float((p_pick < 0.01)[where].mean()),
            "allowed_median": float(np.median(allowed_counts[where])) if allowed_counts is not None else 1.0}


def main(argv=None):
    args = parse_args(argv)
    import gin
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cm3leon_jax.data.images import read_rgb as load_image
    from cm3leon_jax.sampling import generate as gen_lib
    from cm3leon_jax.sampling import guidance

    with open(os.path.join(args.images, "captions.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()][:args.num_images]
    gin.clear_config()
    bundle = gen_lib.load_model(args.model_dir, data_dir=args.data_dir, step=args.step)
    gin.clear_config()
    g = gen_lib.Generator(bundle)
    captions = [r["caption"] for r in rows]
    codes = g.vq.encode(np.stack([load_image(os.path.join(args.images, r["file"])) for r in rows]))
    codes = codes.reshape(len(rows), -1)
    ids = g.b.vocab.image_code_to_id(codes)
    prompts = [g.image_prompt(c, g.retrieve(c, args.num_retrieved)) for c in captions]
    lo, hi = bundle.cfg.image_id_range
    expert = image_logits(g, [p[0] for p in prompts], ids)[..., lo:hi]
    amateur = image_logits(g, [p[1] for p in prompts], ids)[..., lo:hi]
    true = ids - lo
    blank = np.bincount(codes.reshape(-1)).argmax()
    background = codes == blank
    expert_logp = np.asarray(jax.nn.log_softmax(jnp.asarray(expert), -1))
    parts = {"background": background, "shape": ~background}
    result = {"greedy": {k: summarize(expert_logp.argmax(-1), true, expert_logp, None, w) for k, w in parts.items()}}
    common.say(f"{len(rows)} images, {args.num_retrieved} retrieved, {int(background.sum())} background / "
               f"{int((~background).sum())} shape positions (blank code {int(blank)})")
    for spec in args.grid:
        alpha, k = float(spec.split(",")[0]), int(spec.split(",")[1])
        scores = np.asarray(guidance.contrastive_scores(jnp.asarray(expert), jnp.asarray(amateur), alpha, k))
        pick = scores.argmax(-1)
        allowed = np.isfinite(scores).sum(-1)
        result[f"alpha={alpha},k={k}"] = {name: summarize(pick, true, expert_logp, allowed, w)
                                          for name, w in parts.items()}
    for name, r in result.items():
        common.say(f"{name:>16}: " + " | ".join(
            f"{part}: true {v['pick_is_true']:.3f} argmax {v['pick_is_argmax']:.3f} "
            f"p_exp med {v['expert_p_median']:.3f} <1% {v['expert_p_below_1pct']:.3f} "
            f"allowed {v['allowed_median']:.0f}" for part, v in r.items()))
    print(json.dumps({"benchmark": "cdk_scores", "model_dir": os.path.abspath(args.model_dir),
                 "images": len(rows), "num_retrieved": args.num_retrieved, "step": bundle.step,
                 "settings": result}), flush=True)


if __name__ == "__main__":
    main()
