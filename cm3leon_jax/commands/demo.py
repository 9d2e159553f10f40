"""`cm3leon demo`: the embedded end-to-end run (registered by cli.py)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

from cm3leon_jax import gin_utils

DEFAULT_GIN = "gin/demo.gin"


def add_demo(sub) -> None:
    from cm3leon_jax.demo.stages import STAGES

    p = sub.add_parser(
        "demo", help="the end-to-end demo on the embedded shapes corpus: train everything, sample, evaluate",
        description="Builds the shapes corpus, trains the VQ-GAN tokenizer and the CLIP retriever, prepares, "
                    "embeds and indexes the corpus, trains the tiny CM3Leon on shapes_cm3_retrieval, samples "
                    "held-out captions under the paper's ablations (retrieval, CFG scale, top-p / CD-K / "
                    "mixed, CLIP reranking), evaluates them (shapes checker, CLIP-FID, CLIP score) and writes "
                    "OUT/report.md with grids and plots. Every stage runs the project's own command; a rerun "
                    "skips finished stages and resumes an interrupted one (training from its last checkpoint). "
                    f"Stages: {', '.join(STAGES)}.",
        epilog="Example: cm3leon demo                      (gin/demo.gin, about 30 minutes on 2 cores)\n"
               "         cm3leon demo --only=report        (rewrite the report from what is there)\n"
               "         cm3leon demo --gin.demo.train_bindings=\"['TRAIN_STEPS = 300']\" --out_dir=/tmp/d",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_utils.add_gin_arguments(p)
    p.add_argument("--out_dir", default=None, help="output dir (default: demo.out_dir, demo_out)")
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run only this stage (repeatable), even if it finished before")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   help="forget that this stage finished and run it again (repeatable)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args, gin_bindings: List[str]) -> int:
    from cm3leon_jax.commands.helpers import input_error

    files = args.gin_file or [DEFAULT_GIN]
    bindings = list(args.gin_bindings) + list(gin_bindings)
    if args.out_dir:
        bindings.append(f"demo.out_dir = {args.out_dir!r}")
    if args.no_progress:
        bindings.append("demo.progress = False")
    search = [s for s in (args.gin_search_paths or "").split(",") if s]
    gin_utils.parse(files, bindings, search, extra_modules=("cm3leon_jax.demo.pipeline",))
    from cm3leon_jax.demo import pipeline

    config = pipeline.DemoConfig()
    try:
        results = pipeline.run(config, only=args.only, redo=args.redo)
    except (ValueError, OSError) as e:
        return input_error(e)
    except RuntimeError as e:  # a stage's command failed: its own output says why
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; rerun `cm3leon demo` to continue", file=sys.stderr)
        return 130
    report = results.get("report", {})
    print(json.dumps({"out_dir": config.path(), "report": report.get("report"),
                      "best_setting": report.get("best_setting"), "best_accuracy": report.get("best_accuracy"),
                      "unguided_accuracy": report.get("unguided_accuracy")}), flush=True)
    return 0
