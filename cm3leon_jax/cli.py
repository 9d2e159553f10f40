"""`cm3leon <command>`: the project's command line.

Only argparse is imported at module level so that `--help` answers at once;
JAX, TensorFlow, SeqIO and the models are imported inside the commands.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from cm3leon_jax import gin_utils

DESCRIPTION = """CM3Leon in JAX: train, inspect and (in later commands) sample the
retrieval-augmented multimodal decoder. Configuration is gin, t5x-style:
  cm3leon train --gin_file=gin/cm3leon_tiny.gin --gin.TRAIN_STEPS=300 --model_dir=/tmp/tiny
  cm3leon info  --gin_file=gin/cm3leon_7b.gin"""


def _add_train(sub):
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


def _add_info(sub):
    p = sub.add_parser("info", help="parameter count and training FLOPs of a gin config",
                       description="Print the decoder's parameter counts (non-embedding and "
                                   "embedding apart) and per-token training FLOPs.")
    gin_utils.add_gin_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)


def _add_tokenizer(sub):
    p = sub.add_parser("tokenizer", help="train the image (VQ-GAN) or text (BPE) tokenizer",
                       description="Train the tokenizers that put images and text into the "
                                   "unified vocabulary.")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="WHAT")
    img = tsub.add_parser(
        "train-image", help="train the VQ-GAN on the embedded shapes corpus (gin-configured)",
        description="Train the VQ-GAN image tokenizer; resumes from --model_dir; writes "
                    "vqgan_config.json, checkpoints/, metrics.jsonl and eval.json (checker "
                    "accuracy on held-out reconstructions, codebook usage).",
        epilog="Example: cm3leon tokenizer train-image --gin_file=gin/vqgan_shapes.gin "
               "--model_dir=/tmp/vqgan_shapes")
    gin_utils.add_gin_arguments(img)
    img.add_argument("--model_dir", help="output directory (sets the MODEL_DIR macro)")
    img.set_defaults(func=cmd_tokenizer_train_image)
    txt = tsub.add_parser(
        "train-text", help="train the byte-level BPE on text / captions.jsonl files",
        description="Train a byte-level BPE (HF tokenizers) whose ids occupy the unified "
                    "vocabulary's text block.",
        epilog="Example: cm3leon tokenizer train-text --input captions.jsonl --vocab_size 1472 "
               "--out /tmp/bpe")
    txt.add_argument("--input", required=True, action="append",
                     help="text file (one document a line) or .jsonl with a 'caption' field; "
                          "repeatable or comma-separated")
    txt.add_argument("--vocab_size", required=True, type=int,
                     help="number of BPE ids (UnifiedVocabulary.text_vocab_size)")
    txt.add_argument("--out", required=True, help="output directory for tokenizer.json")
    txt.set_defaults(func=cmd_tokenizer_train_text)


def _add_convert(sub):
    p = sub.add_parser("convert", help="import external weights (safetensors only)",
                       description="Convert a Hugging Face checkpoint into a cm3leon model dir.")
    csub = p.add_subparsers(dest="convert_command", metavar="WHAT")
    vq = csub.add_parser(
        "vqgan", help="Chameleon / Anole / Janus VQ-VAE (transformers layout) -> our VQ-GAN",
        description="Read a transformers VQ-VAE (a directory with config.json and "
                    "*.safetensors) and write a model dir usable by every command that takes "
                    "a VQ-GAN.")
    vq.add_argument("--input", required=True, help="HF directory or .safetensors file")
    vq.add_argument("--out", required=True, help="output model dir")
    vq.add_argument("--resolution", type=int, default=None,
                    help="image side; default from the config (num_patches x factor)")
    vq.set_defaults(func=cmd_convert_vqgan)
    clip = csub.add_parser(
        "clip", help="CLIP (transformers CLIPModel, e.g. ViT-B/32) -> our retriever's bi-encoder",
        description="Read a transformers CLIPModel (a directory with config.json and "
                    "*.safetensors, plus its tokenizer files) and write a CLIP model dir: "
                    "clip_config.json, checkpoints/ and tokenizer/.",
        epilog="Example: cm3leon convert clip --input=clip-vit-base-patch32 --out=/tmp/clip_b32")
    clip.add_argument("--input", required=True, help="HF directory or .safetensors file")
    clip.add_argument("--out", required=True, help="output model dir")
    clip.set_defaults(func=cmd_convert_clip)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cm3leon", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_info(sub)
    _add_tokenizer(sub)
    _add_convert(sub)
    return parser


def cmd_train(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings)
    import gin

    from cm3leon_jax.data import pipeline
    from cm3leon_jax.train import trainer

    model_dir = gin.query_parameter("MODEL_DIR/macro.value") if not args.model_dir else args.model_dir
    task = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
    pipeline.check_task_name(task)  # unknown task names fail before any work
    gin_utils.write_config(model_dir)
    result = trainer.train()
    print(json.dumps({k: v for k, v in result.items()}), flush=True)
    return 0


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))


def cmd_info(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings, check_required=False)
    import gin

    from cm3leon_jax.models.decoder import DecoderConfig

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


def cmd_tokenizer_train_image(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings, extra_modules=VQ_MODULES)
    import gin

    from cm3leon_jax.train import vqgan_trainer

    model_dir = args.model_dir or gin.query_parameter("MODEL_DIR/macro.value")
    gin_utils.write_config(model_dir)
    result = vqgan_trainer.train_vqgan()
    print(json.dumps(result), flush=True)
    return 0


def cmd_tokenizer_train_text(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.data import tokenizers

    files = [f for item in args.input for f in item.split(",") if f]
    return tokenizers.train_text_main(files, args.vocab_size, args.out)


def cmd_convert_vqgan(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.models import vqgan_convert

    report = vqgan_convert.convert_to_model_dir(args.input, args.out, args.resolution)
    print(json.dumps(report), flush=True)
    return 0


def cmd_convert_clip(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.models import clip_convert

    report = clip_convert.convert_to_model_dir(args.input, args.out)
    print(json.dumps(report), flush=True)
    return 0


VQ_MODULES = ("cm3leon_jax.models.vqgan", "cm3leon_jax.train.vqgan_trainer")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, gin_bindings = gin_utils.split_gin_dot_flags(argv)
    except gin_utils.GinConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        sub = {"tokenizer": "tokenizer", "convert": "convert"}.get(args.command)
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
