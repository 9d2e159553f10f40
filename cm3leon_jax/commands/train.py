"""`cm3leon train` and `cm3leon info`: the decoder's training run and its size (registered by cli.py)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

from cm3leon_jax import gin_utils
from cm3leon_jax.commands.helpers import run_trainer
from cm3leon_jax.data.pipeline import TRAIN_DATA_MODULES


def add_train(sub):
    p = sub.add_parser(
        "train", help="train the decoder from gin files (t5x-style flags)",
        description="Train the CM3Leon decoder. Resumes automatically from the latest good "
                    "checkpoint in --model_dir; SIGTERM saves a checkpoint and exits.",
        epilog="Example: cm3leon train --gin_file=gin/cm3leon_tiny.gin --gin.TRAIN_STEPS=300 "
               "--model_dir=/tmp/tiny\nREQUIRED macros: MODEL_DIR (or --model_dir), "
               "MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_utils.add_gin_arguments(p)
    p.add_argument("--model_dir", help="output directory (sets the MODEL_DIR macro)")
    p.set_defaults(func=cmd_train)


def add_info(sub):
    p = sub.add_parser("info", help="parameter count and training FLOPs of a gin config",
                       description="Print the decoder's parameter counts (non-embedding and "
                                   "embedding apart) and per-token training FLOPs.")
    gin_utils.add_gin_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def cmd_train(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings, extra_modules=TRAIN_DATA_MODULES)
    import gin

    from cm3leon_jax import distributed
    from cm3leon_jax.data import pipeline
    from cm3leon_jax.train import trainer

    # Multi-host runs: jax.distributed.initialize before any JAX call that
    # touches devices (write_config asks for the process index); a no-op for
    # a single process. Settings: gin initialize_distributed.*, CM3LEON_* env.
    try:
        distributed.initialize_distributed()
    except distributed.DistributedConfigError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # without gin's "In call to" line
        return 2
    model_dir = gin.query_parameter("MODEL_DIR/macro.value") if not args.model_dir else args.model_dir
    task = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
    pipeline.check_task_name(task)  # unknown task names fail before any work
    return run_trainer(model_dir, trainer.train)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def cmd_info(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings, check_required=False)
    import gin

    from cm3leon_jax.models.decoder_config import DecoderConfig

    cfg = DecoderConfig()
    lengths = gin_utils.macro_value("TASK_FEATURE_LENGTHS") or {}
    seq = int(lengths.get("targets", cfg.max_length)) if isinstance(lengths, dict) else cfg.max_length
    counts = cfg.param_counts()
    embedding = counts["token_embedding"] + counts["position_embedding"] + counts["output_projection"]
    flops = cfg.train_flops_per_token(seq)
    out = {
        "gin_files": args.gin_file,
        "num_layers": cfg.num_layers, "d_model": cfg.d_model, "num_heads": cfg.num_heads,
        "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size, "seq_len": seq,
        "params_total": counts["total"], "params_non_embedding": counts["non_embedding"],
        "params_embedding": embedding, **{f"params_{k}": v for k, v in counts.items()
                                          if k not in ("total", "non_embedding")},
        "train_flops_per_token": flops,
    }
    del gin
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"config      : {', '.join(args.gin_file)}")
    print(f"layers {cfg.num_layers}, d_model {cfg.d_model}, heads {cfg.num_heads}, d_ff {cfg.d_ff}, "
          f"vocab {cfg.vocab_size:,}, seq {seq}")
    print(f"parameters  : {counts['total']:,} ({_fmt_count(counts['total'])})")
    print(f"  non-embedding (layers)      : {counts['non_embedding']:,} ({_fmt_count(counts['non_embedding'])})")
    print(f"  embedding, all              : {embedding:,} ({_fmt_count(embedding)})")
    print(f"    token embedding           : {counts['token_embedding']:,}")
    print(f"    output projection (untied): {counts['output_projection']:,}")
    print(f"    position embedding        : {counts['position_embedding']:,}")
    print("  note: the output layer is untied (the paper zero-initialises it) and the vocabulary "
          "is unified,\n  so totals exceed the size names, which (as OPT's) count one embedding "
          "matrix.")
    print(f"train FLOPs : {flops:.4g} per token (6 x matmul params + attention at seq {seq}); "
          f"{flops * seq:.4g} per sequence")
    return 0
