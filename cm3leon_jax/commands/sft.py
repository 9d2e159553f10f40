"""`cm3leon finetune` and `cm3leon sft ...` (registered by cli.py).

- `finetune --gin_file=gin/sft_shapes.gin --init_checkpoint=DIR --model_dir=DIR`:
  the trainer on an SFT task, starting from a pretrained model's params
  (not its optimizer state); the architecture and vocabulary bindings come
  from the pretrained model dir's config.gin unless overridden.
- `sft prepare --records=FILE.jsonl --out=DIR --vqgan_dir=D --text_tokenizer=D`:
  instruction records -> a prepared SFT dataset (sft/records.py).
- `sft convert FORMAT ...`: a dataset in a format users hold -> instruction
  records (sft/sources.py).
- `sft shapes --out=DIR ...`: the shapes instruction corpus, prepared.
- `sft eval --model_dir=D --data_dir=DIR`: a fine-tuned model on held-out
  instruction examples (VQA exact match, captioning facts, editing,
  detection IoU, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from cm3leon_jax import gin_utils
from cm3leon_jax import paths as paths_lib

# The bindings of the pretrained model that the fine-tuned one must share.
ARCHITECTURE_CONFIGURABLES = ("DecoderConfig", "UnifiedVocabulary")


def add_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune", help="supervised fine-tuning of a pretrained model on instruction tasks",
        description="Fine-tunes a pretrained CM3Leon (PAPER.md, SFT) on a SeqIO SFT task or mixture: the "
                    "trainer of `cm3leon train` (sharding, checkpoints, resume) started from "
                    "--init_checkpoint's params; its optimizer state and step are not loaded. The "
                    "DecoderConfig and UnifiedVocabulary bindings are read from the init model dir's "
                    "config.gin (so the SFT gin file needs no model file); --gin flags still override "
                    "them. A rerun on the same --model_dir resumes the fine-tuning itself.",
        epilog="Example: cm3leon finetune --gin_file=gin/sft_shapes.gin --init_checkpoint=demo_out/model "
               "--model_dir=demo_out/sft_model",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_utils.add_gin_arguments(p)
    p.add_argument("--init_checkpoint", required=True,
                   help="the pretrained model: a `cm3leon train` model dir (its latest checkpoint) or one "
                        "checkpoints/STEP dir")
    p.add_argument("--model_dir", help="output directory (sets the MODEL_DIR macro)")
    p.set_defaults(func=cmd_finetune)


def find_config(init_checkpoint: str) -> Optional[str]:
    """The config.gin of the model dir holding `init_checkpoint` (it or up to
    three parents: model dir, checkpoints/, checkpoints/STEP, .../state)."""
    d = paths_lib.abspath(init_checkpoint)
    d = d.rstrip("/") if paths_lib.is_url(d) else d  # gs://b/run/ -> gs://b/run, so dirname walks up
    for _ in range(4):
        if paths_lib.isfile(os.path.join(d, "config.gin")):
            return os.path.join(d, "config.gin")
        d = os.path.dirname(d)
    return None


def architecture_bindings(config_path: str) -> List[str]:
    """The `DecoderConfig.*` / `UnifiedVocabulary.*` bindings of a written
    config.gin (gin.config_str() output), as binding lines."""
    return [f"{name} = {value}" for name, value in gin_utils.read_written_bindings(config_path).items()
            if name.split(".")[0] in ARCHITECTURE_CONFIGURABLES and name.count(".") == 1]


def cmd_finetune(args, gin_bindings: List[str]) -> int:
    from cm3leon_jax.commands.helpers import input_error, run_trainer
    from cm3leon_jax.data.pipeline import TRAIN_DATA_MODULES

    config = find_config(args.init_checkpoint)
    if not paths_lib.exists(args.init_checkpoint):
        return input_error(ValueError(f"--init_checkpoint {args.init_checkpoint!r} does not exist"))
    arch = architecture_bindings(config) if config else []
    if not arch:
        print(f"warning: no config.gin with model bindings found above {args.init_checkpoint!r}; the SFT gin "
              "file must bind the pretrained model's DecoderConfig and UnifiedVocabulary", file=sys.stderr)
    bindings = arch + list(args.gin_bindings) + list(gin_bindings)
    bindings.append(f"train.init_checkpoint = {paths_lib.abspath(args.init_checkpoint)!r}")
    if args.model_dir:
        bindings.append(f"MODEL_DIR = {args.model_dir!r}")
    search = [s for s in (args.gin_search_paths or "").split(",") if s]
    gin_utils.parse(args.gin_file, bindings, search, TRAIN_DATA_MODULES)
    import gin

    from cm3leon_jax import distributed
    from cm3leon_jax.data import pipeline
    from cm3leon_jax.train import trainer

    try:  # multi-host: before write_config asks JAX for the process index
        distributed.initialize_distributed()
    except distributed.DistributedConfigError as e:
        return input_error(e)

    model_dir = gin.query_parameter("MODEL_DIR/macro.value")
    task = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
    try:
        pipeline.check_task_name(task)
        pipeline.check_not_empty(task)
    except ValueError as e:
        return input_error(e)
    try:
        return run_trainer(model_dir, trainer.train)
    except ValueError as e:
        if "init checkpoint" in str(e) or "init_checkpoint" in str(e):
            return input_error(e)
        raise


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="instruction data for fine-tuning: convert, prepare, the shapes set, eval",
                       description="Supervised fine-tuning data and evaluation (see `cm3leon finetune`).")
    ssub = p.add_subparsers(dest="sft_command", metavar="WHAT")
    pr = ssub.add_parser(
        "prepare", help="instruction records (JSONL) -> a prepared SFT dataset",
        description="Tokenises instruction records (one JSON object per line: task, instruction, "
                    "input_image, output_image / output_text, meta; image paths relative to the file) "
                    "with the VQ-GAN and the BPE into DIR/FAMILY/SPLIT-*.tfrecord and DIR/sft.json. "
                    "Records naming a missing or corrupt image, with an empty instruction or output, or "
                    "longer than the length limits are skipped and counted by reason.",
        epilog="Example: cm3leon sft prepare --records=/data/vqa/instructions.jsonl --out=/data/sft "
               "--vqgan_dir=demo_out/vqgan --text_tokenizer=demo_out/clip/bpe",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("--records", required=True, help="instructions.jsonl (from `cm3leon sft convert`)")
    pr.add_argument("--out", required=True, help="the prepared SFT dataset dir (splits accumulate in it)")
    pr.add_argument("--split", choices=("train", "validation"), default="train", help="default train")
    pr.add_argument("--vqgan_dir", required=True, help="the VQ-GAN model dir (the pretrained model's)")
    pr.add_argument("--text_tokenizer", required=True, help="the BPE dir (the pretrained model's)")
    pr.add_argument("--max_inputs_length", type=int, default=128,
                    help="longest instruction + input in tokens; longer records are skipped (default 128)")
    pr.add_argument("--max_targets_length", type=int, default=128,
                    help="longest output + <eos>; longer records are skipped (default 128)")
    pr.add_argument("--no_progress", action="store_true")
    pr.set_defaults(func=cmd_sft_prepare)

    cv = ssub.add_parser(
        "convert", help="a dataset in a format users hold -> instruction records (JSONL)",
        description="Converts InstructPix2Pix (editing), COCO captions (captioning), VQA v2 (vqa) or COCO "
                    "instances (detection and spatially grounded generation) into instruction records for "
                    "`cm3leon sft prepare` (cm3leon_jax/sft/sources.py). Records naming a missing image "
                    "are skipped and counted.",
        epilog="Examples:\n"
               "  cm3leon sft convert instructpix2pix --src=/data/clip-filtered-dataset --out=/data/ip2p.jsonl\n"
               "  cm3leon sft convert coco_captions --annotations=captions_train2014.json --images=train2014 "
               "--out=cap.jsonl\n"
               "  cm3leon sft convert vqa --questions=v2_OpenEnded_mscoco_train2014_questions.json "
               "--annotations=v2_mscoco_train2014_annotations.json --images=train2014 --out=vqa.jsonl\n"
               "  cm3leon sft convert coco_detection --annotations=instances_train2014.json --images=train2014 "
               "--out=det.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cv.add_argument("format", choices=("instructpix2pix", "coco_captions", "vqa", "coco_detection"))
    cv.add_argument("--out", required=True, help="the instructions.jsonl to write")
    cv.add_argument("--src", help="instructpix2pix: the dataset dir (seeds.json, prompt dirs)")
    cv.add_argument("--annotations", help="coco_captions / vqa / coco_detection: the annotations JSON")
    cv.add_argument("--questions", help="vqa: the questions JSON")
    cv.add_argument("--images", help="the image dir (COCO formats)")
    cv.add_argument("--tasks", default="detection,spatial",
                    help="coco_detection: which records to write (default detection,spatial)")
    cv.set_defaults(func=cmd_sft_convert)

    sh = ssub.add_parser(
        "shapes", help="the shapes instruction corpus (all six families), prepared",
        description="Builds every SFT family from the procedural shapes scenes with exact ground truth "
                    "(cm3leon_jax/sft/shapes_instructions.py) and prepares it with the given tokenizers: "
                    "train and validation (held-out scenes) splits.",
        epilog="Example: cm3leon sft shapes --out=demo_out/sft_data --vqgan_dir=demo_out/vqgan "
               "--text_tokenizer=demo_out/clip/text_tokenizer",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sh.add_argument("--out", required=True, help="the prepared SFT dataset dir")
    sh.add_argument("--vqgan_dir", required=True, help="the VQ-GAN model dir (the pretrained model's)")
    sh.add_argument("--text_tokenizer", required=True, help="the BPE dir (the pretrained model's)")
    sh.add_argument("--train_per_family", type=int, default=8000,
                    help="training records per family (8000; about 5 minutes on 2 cores)")
    sh.add_argument("--heldout_per_family", type=int, default=200, help="held-out records per family (200)")
    sh.add_argument("--no_progress", action="store_true")
    sh.set_defaults(func=cmd_sft_shapes)

    ev = ssub.add_parser(
        "eval", help="score a fine-tuned model on the held-out shapes instruction examples",
        description="Runs every family's validation records through the model and scores them against "
                    "their exact ground truth (cm3leon_jax/sft/evaluate.py): VQA exact match, captioning "
                    "checker facts, detection mean IoU, editing change + preservation, grounded and "
                    "spatial generation checker accuracy. Prints one JSON line.",
        epilog="Example: cm3leon sft eval --model_dir=demo_out/sft_model --data_dir=demo_out/sft_data",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model_dir", required=True, help="a `cm3leon finetune` model dir")
    ev.add_argument("--data_dir", required=True, help="the prepared shapes SFT data (`cm3leon sft shapes`)")
    ev.add_argument("--families", default=None, help="comma-separated families (default: all six)")
    ev.add_argument("--limit", type=int, default=None, help="validation records per family (default all)")
    ev.add_argument("--batch_rows", type=int, default=64, help="prompts per sampler call (default 64)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default=None, help="also write the report to this JSON file")
    from cm3leon_jax.commands.helpers import add_sampling_args

    add_sampling_args(ev)
    ev.add_argument("--image_cfg_scale", type=float, default=1.5,
                    help="two-scale guidance: the input-image scale s_I (default 1.5, InstructPix2Pix)")
    ev.set_defaults(func=cmd_sft_eval, decoding="top_p")


def cmd_sft_prepare(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.commands.helpers import input_error
    from cm3leon_jax.sft import records

    try:
        entry = records.prepare_sft(args.records, args.out, args.vqgan_dir, args.text_tokenizer,
                                    split=args.split, max_inputs_length=args.max_inputs_length,
                                    max_targets_length=args.max_targets_length,
                                    progress=not args.no_progress)
    except (ValueError, OSError) as e:
        return input_error(e)
    print(json.dumps(dict(entry, out=os.path.abspath(args.out), split=args.split)), flush=True)
    return 0


def cmd_sft_shapes(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.commands.helpers import input_error
    from cm3leon_jax.sft import shapes_instructions as instructions

    try:
        report = instructions.build(args.out, args.vqgan_dir, args.text_tokenizer,
                                    train_per_family=args.train_per_family,
                                    heldout_per_family=args.heldout_per_family, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        return input_error(e)
    print(json.dumps({"out": os.path.abspath(args.out),
                      **{split: {"count": e["count"], "skipped": e["skipped"]} for split, e in report.items()}}),
          flush=True)
    return 0


def cmd_sft_eval(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    import dataclasses

    from cm3leon_jax.commands.helpers import input_error, sampling_settings
    from cm3leon_jax.sft import evaluate
    from cm3leon_jax.sft import format as fmt

    try:
        families = [f.strip() for f in args.families.split(",")] if args.families else list(fmt.FAMILIES)
        for f in families:
            fmt.check_family(f)
        settings = dataclasses.replace(sampling_settings(args), image_cfg_scale=args.image_cfg_scale)
        report = evaluate.evaluate(args.model_dir, args.data_dir, families=families, limit=args.limit,
                                   settings=settings, seed=args.seed, batch_rows=args.batch_rows)
    except (ValueError, OSError) as e:
        return input_error(e)
    line = json.dumps(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return 0


def cmd_sft_convert(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.commands.helpers import input_error
    from cm3leon_jax.sft import sources as sft_sources

    need = {"instructpix2pix": ("src",), "coco_captions": ("annotations", "images"),
            "vqa": ("questions", "annotations", "images"), "coco_detection": ("annotations", "images")}[args.format]
    try:
        missing = [k for k in need if not getattr(args, k)]
        if missing:
            raise ValueError(f"{args.format} needs " + ", ".join(f"--{k}" for k in missing))
        kwargs = {k: getattr(args, k) for k in need}
        if args.format == "coco_detection":
            kwargs["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        report = sft_sources.convert(args.format, args.out, **kwargs)
    except (ValueError, OSError) as e:
        return input_error(e)
    print(json.dumps(report), flush=True)
    return 0
