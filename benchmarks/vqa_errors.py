"""Where a fine-tuned model's VQA answers go wrong, by question type and scene.

Answers the held-out VQA records of a prepared shapes SFT data dir (`cm3leon
sft shapes`) greedily, as `cm3leon sft eval` does, and counts each answer by
(question type, number of shapes in the scene, verdict), the verdict being:

    right     exact match (sft/evaluate.normalize_answer on both sides)
    other     wrong, but the colour or kind of another shape in the scene:
              the model read the image and picked the wrong shape (binding)
    absent    wrong, and no shape in the scene has it (perception), or the
              question's answer is a place (positions are not in a
              multi-shape caption, so "where" errors are all counted here)

Prints the counts, the first --show wrong answers, and a JSON line last.
For the colour questions of the 15,000-step demo_full model, most wrong
answers on two- and three-shape scenes are "other" (benchmarks/RESULTS.md,
"SFT on the fresh-clone make demo-full model").

Example:
  .venv/bin/python benchmarks/vqa_errors.py --model_dir=demo_full_out/sft_model \\
      --data_dir=demo_full_out/sft_data --types=color,where
"""
from __future__ import annotations

import argparse
import collections
import json


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a `cm3leon finetune` model dir")
    p.add_argument("--data_dir", required=True, help="a prepared shapes SFT data dir (`cm3leon sft shapes`)")
    p.add_argument("--types", default="color,kind,where",
                   help="comma-separated question types (color, kind, count, size, where)")
    p.add_argument("--limit", type=int, default=None, help="held-out VQA records read (default all)")
    p.add_argument("--show", type=int, default=20, help="wrong answers printed")
    args = p.parse_args(argv)

    from cm3leon_jax.data import shapes
    from cm3leon_jax.sft import records as rec_lib
    from cm3leon_jax.sft.evaluate import load_generator, normalize_answer, text_outputs

    types = [t for t in args.types.split(",") if t]
    g = load_generator(args.model_dir, args.data_dir)
    exs = [e for e in rec_lib.read_examples(args.data_dir, "vqa", "validation", args.limit)
           if e["meta"]["type"] in types]
    if not exs:
        raise SystemExit(f"no held-out VQA records of types {types} in {args.data_dir}")
    outputs = text_outputs(g, exs, "vqa")
    counts = collections.Counter()
    wrong = []
    for e, output in zip(exs, outputs):
        meta = e["meta"]
        answer = normalize_answer(output)
        scene = shapes.caption_facts(meta["caption"]).shapes
        if answer == normalize_answer(meta["answer"]):
            verdict = "right"
        elif answer in {s.color for s in scene} | {s.kind for s in scene}:
            verdict = "other"
        else:
            verdict = "absent"
        counts[(meta["type"], len(scene), verdict)] += 1
        if verdict != "right":
            wrong.append({"question": g.text.decode(e["instruction"], skip_non_text=True),
                          "answer": meta["answer"], "output": answer, "caption": meta["caption"]})
    for key in sorted(counts):
        print(*key, counts[key])
    for w in wrong[:args.show]:
        print(json.dumps(w))
    report = {"benchmark": "vqa_errors", "model_dir": args.model_dir, "records": len(exs),
              "counts": [{"type": t, "shapes": n, "verdict": v, "count": c} for (t, n, v), c in sorted(counts.items())]}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
