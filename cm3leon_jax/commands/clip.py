"""`cm3leon clip train`: the CLIP retriever trained on the shapes corpus (registered by cli.py)."""
from __future__ import annotations

from typing import List

from cm3leon_jax import gin_utils
from cm3leon_jax.commands.helpers import run_trainer


CLIP_MODULES = ("cm3leon_jax.models.clip", "cm3leon_jax.train.clip_trainer")


def add_clip(sub):
    p = sub.add_parser("clip", help="train a small CLIP retriever on the shapes corpus",
                       description="Train the CLIP bi-encoder that the demo retrieves with.")
    csub = p.add_subparsers(dest="clip_command", metavar="WHAT")
    t = csub.add_parser(
        "train", help="contrastive (InfoNCE) training on the embedded shapes corpus (gin-configured)",
        description="Train a CLIP from scratch on the shapes corpus with CLIP's symmetric InfoNCE "
                    "loss and learned temperature; resumes from --model_dir; writes clip_config.json, "
                    "text_tokenizer/ (the BPE), checkpoints/, metrics.jsonl and eval.json (held-out "
                    "text-to-image top-1 retrieval scored by the shapes checker). The dir is read by "
                    "`cm3leon embed --clip_dir`.",
        epilog="Example: cm3leon clip train --gin_file=gin/clip_shapes.gin --model_dir=/tmp/clip_shapes")
    gin_utils.add_gin_arguments(t)
    t.add_argument("--model_dir", help="output directory (sets the MODEL_DIR macro)")
    t.set_defaults(func=cmd_clip_train)


def cmd_clip_train(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings, extra_modules=CLIP_MODULES)
    import gin

    from cm3leon_jax.train import clip_trainer

    model_dir = args.model_dir or gin.query_parameter("MODEL_DIR/macro.value")
    return run_trainer(model_dir, clip_trainer.train_clip)
