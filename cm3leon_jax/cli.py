"""`cm3leon <command>`: the project's command line.

Only argparse is imported at module level so that `--help` answers at once;
JAX, TensorFlow, SeqIO and the models are imported inside the commands.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from cm3leon_jax import gin_utils, platform_env
from cm3leon_jax.commands.helpers import (add_sampling_args, input_error, run_resumable, run_trainer,
                                          sampling_settings)
from cm3leon_jax.data.pipeline import TRAIN_DATA_MODULES

DESCRIPTION = """CM3Leon in JAX: the retrieval-augmented, token-based multimodal decoder,
from raw image-text pairs to sampled images and captions.
  data:      tokenizer, clip, convert -> prepare, embed, index, task-data
  model:     train, finetune (sft for instruction data), info, compile
  use:       generate (text -> image, image -> text), eval
  all of it: demo (the embedded shapes corpus, end to end on a CPU)
Configuration is gin, t5x-style:
  cm3leon train --gin_file=gin/cm3leon_tiny.gin --gin.TRAIN_STEPS=300 --model_dir=/tmp/tiny
  cm3leon info  --gin_file=gin/cm3leon_7b.gin
`cm3leon COMMAND --help` describes each command."""


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
    cham = csub.add_parser(
        "chameleon", help="Chameleon / Anole (transformers ChameleonForConditionalGeneration) -> a decoder model dir",
        description="Read a transformers Chameleon checkpoint (a `save_pretrained` dir: config.json and "
                    "*.safetensors; pickles are never read) and write a model dir that `cm3leon generate` "
                    "loads: config.gin (the decoder with RMSNorm, rotary, QK-norm, SwiGLU options), an Orbax "
                    "checkpoint, vocab_mapping.json (Chameleon id <-> our id: image tokens moved to our "
                    "image-code block, <s> </s> <racm3:break> <eoss> <sentinel:i> to our specials). The "
                    "checkpoint's VQ-VAE encoder is skipped (images need --vqgan_dir at generation).",
        epilog="Example: cm3leon convert chameleon --hf_dir=Anole-7b-v0.1-hf --out=/tmp/anole_7b")
    cham.add_argument("--hf_dir", required=True, help="transformers Chameleon dir (config.json + *.safetensors)")
    cham.add_argument("--out", required=True, help="output model dir")
    cham.add_argument("--num_mask_tokens", type=int, default=32,
                      help="how many <sentinel:i> become our <mask:i> ids (default 32, fewer if absent)")
    cham.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                      help="compute dtype written to config.gin (default bfloat16)")
    cham.add_argument("--param_dtype", default="float32", choices=("bfloat16", "float32", "float16"),
                      help="dtype of the saved params (default float32, as the trainer keeps them)")
    cham.set_defaults(func=cmd_convert_chameleon)


def _add_model_dir_args(p):
    """The three models a prepared dataset is made with."""
    p.add_argument("--vqgan_dir", required=True, help="VQ-GAN model dir (image tokenizer)")
    p.add_argument("--text_tokenizer", required=True, help="the project's BPE dir (tokenizer.json)")
    p.add_argument("--clip_dir", required=True, help="CLIP model dir (retrieval embeddings)")


def _add_prepare(sub):
    p = sub.add_parser(
        "prepare", help="raw image-text pairs -> a prepared dataset (ArrayRecord; Apache Beam)",
        description="Turn a source of image-text pairs into a prepared dataset: per document the "
                    "VQ-GAN image ids, the BPE text ids (truncated to --max_text_tokens), the caption, "
                    "L2-normalised CLIP text and image embeddings and the source id, in ArrayRecord "
                    "shards read by random access (grain). Runs as an Apache Beam pipeline "
                    "(DirectRunner by default). Prints one JSON line: records written, skipped by "
                    "reason, truncated captions, shards, resumed shards. Rerunning on the same --out "
                    "continues and never duplicates; other settings on the same --out are refused.",
        epilog="Example: cm3leon prepare --source=image_folder:/data/pairs --out=/data/prepared "
               "--vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe --clip_dir=/m/clip\n"
               "Sources: shapes:N[:SEED], image_folder:PATH (images + captions.jsonl), "
               "webdataset:GLOB (tar shards with .jpg/.png + .txt), tfds:NAME[@SPLIT][?data_dir=DIR] "
               "(prepared locally; never downloaded).\n"
               "Other runners: --runner=DataflowRunner --beam_arg=--project=P --beam_arg=--region=R ...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="document source spec, e.g. image_folder:/data/pairs")
    p.add_argument("--out", required=True, help="output directory of the prepared dataset")
    _add_model_dir_args(p)
    p.add_argument("--max_text_tokens", type=int, default=128,
                   help="captions are truncated to this many BPE ids (counted, not skipped)")
    p.add_argument("--records_per_shard", type=int, default=1000,
                   help="source documents per ArrayRecord shard (the unit of resumption)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side the source decodes to (default: the VQ-GAN's)")
    p.add_argument("--batch_size", type=int, default=32, help="documents per jitted encode call")
    p.add_argument("--keep_single_modality", action="store_true",
                   help="keep documents with only a caption or only an image (default: skip them)")
    p.add_argument("--max_image_pixels", type=int, default=None,
                   help="images over this many pixels (width x height) are skipped as 'too large' from "
                        "their header, never decoded (default 8192 x 8192 = 67108864)")
    p.add_argument("--runner", default="DirectRunner", help="Apache Beam runner")
    p.add_argument("--beam_arg", action="append", default=[],
                   help="one more Beam pipeline option, e.g. --beam_arg=--direct_num_workers=2 (repeatable)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)


def _add_task_data(sub):
    p = sub.add_parser(
        "task-data", help="raw pairs -> the data dir a CM3 SeqIO task trains on (prepare + bank + index)",
        description="Build the data dir of a retrieval-augmented CM3 task in one command: `prepare` "
                    "(DIR/prepared), `embed --source=prepared:` (DIR/bank, from the stored CLIP "
                    "embeddings), `index build` (DIR/index) and `index neighbours --k=K` "
                    "(DIR/bank/neighbours). Each stage is skipped when its output is complete, so an "
                    "interrupted run continues. Point the built-in tasks at DIR: shapes_cm3[_retrieval] "
                    "read $CM3LEON_SHAPES_DATA (gin shapes_data_dir.path), corpus_cm3[_retrieval] read "
                    "$CM3LEON_CORPUS_DATA (gin corpus_data_dir.path); or register your own with "
                    "cm3leon_jax.data.tasks.register_cm3_task(name, DIR/prepared, DIR/bank).",
        epilog="Example: cm3leon task-data --source=shapes:20000 --out=demo_out/data "
               "--vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe --clip_dir=/m/clip",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, help="document source spec (as for `cm3leon prepare`)")
    p.add_argument("--out", required=True, help="the task data dir")
    _add_model_dir_args(p)
    p.add_argument("--k", type=int, default=16, help="candidates per document in the neighbour table")
    p.add_argument("--max_text_tokens", type=int, default=128, help="captions are truncated to this many BPE ids")
    p.add_argument("--records_per_shard", type=int, default=1000, help="documents per prepared shard")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_task_data)


def _add_generate(sub):
    p = sub.add_parser(
        "generate", help="sample images for text prompts (or text for an image) with a trained model",
        description="Text -> image: for each prompt, --num_samples samples (one batch, a jitted KV-cache "
                    "decoder), with classifier-free guidance (--cfg_scale; the unconditional stream is the "
                    "prompt with its text replaced by <mask>), top-p or contrastive decoding (CD-K) or "
                    "both (mixed: half each), optional retrieval (--num_retrieved) from the training "
                    "task's memory bank, reranked by CLIP; writes PNGs, grid.png and samples.json. "
                    "Image -> text: --image=PATH [--prompt='Question: ...'] prints the generated text "
                    "(captioning, VQA). The VQ-GAN, BPE and CLIP come from the training data's manifest "
                    "unless given.",
        epilog="Example: cm3leon generate --model_dir=/tmp/tiny --prompt='a red circle above a blue square' "
               "--num_samples=8 --decoding=mixed --cfg_scale=3 --num_retrieved=2 --out=/tmp/samples",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a `cm3leon train` model dir")
    p.add_argument("--prompt", default=None, help="text prompt (or the question, with --image)")
    p.add_argument("--prompts_file", default=None, help="one prompt per line")
    p.add_argument("--image", default=None, help="image -> text: the input image")
    p.add_argument("--num_samples", type=int, default=8,
                   help="samples per prompt, one batch (default 8, as the paper reranks 8)")
    p.add_argument("--keep", type=int, default=None, help="write only the best K by CLIP score (default: all)")
    p.add_argument("--batch_rows", type=int, default=32,
                   help="rows (prompt x sample) per sampler call (default 32); results do not depend on it")
    add_sampling_args(p)
    p.add_argument("--image_cfg_scale", type=float, default=None,
                   help="image + instruction -> image (editing, edge map -> image) with a `cm3leon finetune` "
                        "model: two-scale guidance, s_I for the input image (InstructPix2Pix: 1.5) and "
                        "--cfg_scale for the instruction (7.5); writes --num_samples PNGs to --out")
    p.add_argument("--num_retrieved", type=int, default=0,
                   help="documents retrieved for the prompt and prepended, as in training (default 0; "
                        "the paper uses 2)")
    p.add_argument("--max_text_tokens", type=int, default=64,
                   help="image -> text: tokens generated at most (default 64)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: weight-only int8 decoding, about half the bf16 weight bytes (default none)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed writes the same PNGs")
    p.add_argument("--out", default=None, help="output dir (text -> image)")
    p.add_argument("--vqgan_dir", default=None, help="override the VQ-GAN of the training data")
    p.add_argument("--text_tokenizer", default=None, help="override the BPE of the training data")
    p.add_argument("--clip_dir", default=None, help="override the CLIP of the training data")
    p.add_argument("--data_dir", default=None, help="a `cm3leon task-data` dir (bank and index for retrieval)")
    p.set_defaults(func=cmd_generate)


def _add_clip(sub):
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


def build_parser() -> argparse.ArgumentParser:
    from cm3leon_jax.commands.retrieval import add_embed, add_index

    parser = argparse.ArgumentParser(prog="cm3leon", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_info(sub)
    _add_tokenizer(sub)
    _add_convert(sub)
    _add_prepare(sub)
    add_embed(sub)
    _add_task_data(sub)
    add_index(sub)
    _add_generate(sub)
    _add_clip(sub)
    from cm3leon_jax.commands.demo import add_demo
    from cm3leon_jax.commands.eval import add_eval
    from cm3leon_jax.commands.sft import add_finetune, add_sft

    from cm3leon_jax.commands.compile import add_compile

    add_finetune(sub)
    add_sft(sub)
    add_eval(sub)
    add_demo(sub)
    add_compile(sub)
    return parser


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
    return run_trainer(model_dir, vqgan_trainer.train_vqgan)


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


def cmd_convert_chameleon(args, gin_bindings: List[str]) -> int:
    if gin_bindings:
        return input_error(ValueError("convert chameleon takes no --gin.* flags"))
    try:
        from cm3leon_jax.models import chameleon_convert

        report = chameleon_convert.convert_to_model_dir(
            args.hf_dir, args.out, num_mask_tokens=args.num_mask_tokens, dtype=args.dtype,
            param_dtype=args.param_dtype)
    except (ValueError, OSError) as e:
        return input_error(e)
    print(json.dumps(report), flush=True)
    return 0


def cmd_prepare(args, gin_bindings: List[str]) -> int:
    del gin_bindings

    def job():
        from cm3leon_jax.data import prepare

        return prepare.prepare(args.source, args.out, args.vqgan_dir, args.text_tokenizer, args.clip_dir,
                               max_text_tokens=args.max_text_tokens, records_per_shard=args.records_per_shard,
                               resolution=args.resolution, batch_size=args.batch_size,
                               require_both=not args.keep_single_modality, runner=args.runner,
                               pipeline_args=args.beam_arg, progress=not args.no_progress,
                               **({} if args.max_image_pixels is None else
                                  {"max_image_pixels": args.max_image_pixels}))

    return run_resumable(job, "shards")


def cmd_task_data(args, gin_bindings: List[str]) -> int:
    del gin_bindings

    def job():
        from cm3leon_jax.data import tasks

        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        return tasks.build_task_data(args.source, args.out, args.vqgan_dir, args.text_tokenizer, args.clip_dir,
                                     k=args.k, max_text_tokens=args.max_text_tokens,
                                     records_per_shard=args.records_per_shard, progress=not args.no_progress)

    return run_resumable(job, "stages")


def cmd_generate(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    import os

    try:
        from cm3leon_jax.data import text as text_lib

        prompts = []
        if args.prompt is not None:
            args.prompt = text_lib.strict_text(args.prompt, "--prompt").strip()
            if args.image is None:
                if not args.prompt:
                    raise ValueError("--prompt is empty: give the text to generate an image for")
                prompts.append(args.prompt)
        if args.prompts_file:
            prompts += text_lib.read_prompts(args.prompts_file)
        if args.image is None and not prompts:
            raise ValueError("nothing to generate: give --prompt, --prompts_file or --image")
        if args.num_samples < 1:
            raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
        if (args.image is None or args.image_cfg_scale is not None) and not args.out:
            raise ValueError("--out is required for image outputs (text -> image, or --image with "
                             "--image_cfg_scale)")
        from cm3leon_jax.sampling import generate as gen_lib

        settings = sampling_settings(args)
        if args.image_cfg_scale is not None:
            import dataclasses

            settings = dataclasses.replace(settings, image_cfg_scale=args.image_cfg_scale)
        bundle = gen_lib.load_model(args.model_dir, args.vqgan_dir, args.text_tokenizer, args.clip_dir,
                                    args.data_dir)
        g = gen_lib.Generator(bundle, quantize=args.quantize)
        if args.image is not None:
            from cm3leon_jax.data.images import load_image

            image = load_image(args.image, g.vq.resolution)
            if args.image_cfg_scale is not None:
                return _write_edits(g, image, args, settings)
            text = g.text_from_image(image, args.prompt or "", settings, args.seed, args.max_text_tokens)
            print(json.dumps({"image": args.image, "prompt": args.prompt, "text": text}), flush=True)
            return 0
        report = gen_lib.write_samples(g, prompts, args.out, settings, num_samples=args.num_samples,
                                       seed=args.seed, num_retrieved=args.num_retrieved, keep=args.keep,
                                       batch_rows=args.batch_rows)
    except (ValueError, OSError) as e:
        return input_error(e)
    print(json.dumps({"out": os.path.abspath(args.out), "prompts": len(prompts),
                      "images": sum(len(r["samples"]) for r in report)}), flush=True)
    return 0


def _write_edits(g, image, args, settings) -> int:
    import os

    from PIL import Image

    if not g.b.sft:
        raise ValueError(f"--image_cfg_scale needs a fine-tuned model (`cm3leon finetune`); {args.model_dir!r} "
                         "was trained on a pretraining task")
    if not args.prompt:
        raise ValueError("--image_cfg_scale needs the instruction: pass --prompt (e.g. 'make the circle green')")
    from cm3leon_jax.sft import infer

    images = infer.edit_image(g, image, args.prompt, args.num_samples, settings, args.seed)
    os.makedirs(args.out, exist_ok=True)
    files = []
    for j, img in enumerate(images):
        files.append(f"edit_{j}.png")
        Image.fromarray(img).save(os.path.join(args.out, files[-1]))
    print(json.dumps({"image": args.image, "prompt": args.prompt, "out": os.path.abspath(args.out),
                      "files": files, "cfg_scale": settings.cfg_scale,
                      "image_cfg_scale": settings.image_cfg_scale}), flush=True)
    return 0


VQ_MODULES = ("cm3leon_jax.models.vqgan", "cm3leon_jax.train.vqgan_trainer")
CLIP_MODULES = ("cm3leon_jax.models.clip", "cm3leon_jax.train.clip_trainer")


def cmd_clip_train(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings, extra_modules=CLIP_MODULES)
    import gin

    from cm3leon_jax.train import clip_trainer

    model_dir = args.model_dir or gin.query_parameter("MODEL_DIR/macro.value")
    return run_trainer(model_dir, clip_trainer.train_clip)


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
