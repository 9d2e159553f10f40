"""`cm3leon <command>`: the project's command line: the parser of every command group and `main`.

Each command group lives in `cm3leon_jax/commands/` (its parser and what it runs);
this module only puts them together.

Only argparse is imported at module level so that `--help` answers at once;
JAX, TensorFlow, SeqIO and the models are imported inside the commands.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from cm3leon_jax import gin_utils, platform_env

DESCRIPTION = """CM3Leon in JAX: the retrieval-augmented, token-based multimodal decoder,
from raw image-text pairs to sampled images and captions.
  data:      tokenizer, clip, convert -> prepare, embed, index, task-data
  model:     train, finetune (sft for instruction data), info, compile
  use:       generate (text -> image, image -> text), serve (a web page and HTTP API), eval
  all of it: demo (the embedded shapes corpus, end to end on a CPU)
Configuration is gin, t5x-style:
  cm3leon train --gin_file=gin/cm3leon_tiny.gin --gin.TRAIN_STEPS=300 --model_dir=/tmp/tiny
  cm3leon info  --gin_file=gin/cm3leon_7b.gin
`cm3leon COMMAND --help` describes each command."""


def build_parser() -> argparse.ArgumentParser:
    from cm3leon_jax.commands.clip import add_clip
    from cm3leon_jax.commands.compile import add_compile
    from cm3leon_jax.commands.convert import add_convert
    from cm3leon_jax.commands.demo import add_demo
    from cm3leon_jax.commands.eval import add_eval
    from cm3leon_jax.commands.generate import add_generate
    from cm3leon_jax.commands.prepare import add_prepare, add_task_data
    from cm3leon_jax.commands.retrieval import add_embed, add_index
    from cm3leon_jax.commands.serve import add_serve
    from cm3leon_jax.commands.sft import add_finetune, add_sft
    from cm3leon_jax.commands.tokenizer import add_tokenizer
    from cm3leon_jax.commands.train import add_info, add_train

    parser = argparse.ArgumentParser(prog="cm3leon", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train(sub)
    add_info(sub)
    add_tokenizer(sub)
    add_convert(sub)
    add_prepare(sub)
    add_embed(sub)
    add_task_data(sub)
    add_index(sub)
    add_generate(sub)
    add_serve(sub)
    add_clip(sub)
    add_finetune(sub)
    add_sft(sub)
    add_eval(sub)
    add_demo(sub)
    add_compile(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    # Before anything imports jax or tensorflow: no probing for a TPU or GPU
    # this machine does not have (platform_env's docstring).
    platform_env.apply()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, gin_bindings = gin_utils.split_gin_dot_flags(argv)
    except gin_utils.GinConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        sub = {"tokenizer": "tokenizer", "convert": "convert", "index": "index",
               "clip": "clip", "eval": "eval", "sft": "sft"}.get(args.command)
        if sub:
            parser.parse_args([sub, "--help"])
        parser.print_help()
        return 2
    try:
        return args.func(args, gin_bindings)
    except gin_utils.GinConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if "SeqIO task" in str(e) or "TASK_FEATURE_LENGTHS" in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
