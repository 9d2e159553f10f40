"""`cm3leon prepare` and `cm3leon task-data`: raw image-text pairs into a prepared dataset, and into
the whole data dir of a retrieval-augmented task (registered by cli.py)."""
from __future__ import annotations

import argparse
from typing import List

from cm3leon_jax.commands.helpers import run_resumable


def _add_model_dir_args(p):
    """The three models a prepared dataset is made with."""
    p.add_argument("--vqgan_dir", required=True, help="VQ-GAN model dir (image tokenizer)")
    p.add_argument("--text_tokenizer", required=True, help="the project's BPE dir (tokenizer.json)")
    p.add_argument("--clip_dir", required=True, help="CLIP model dir (retrieval embeddings)")


def add_prepare(sub):
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


def add_task_data(sub):
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
        from cm3leon_jax.data.task_data_builder import build_task_data

        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        return build_task_data(args.source, args.out, args.vqgan_dir, args.text_tokenizer, args.clip_dir,
                               k=args.k, max_text_tokens=args.max_text_tokens,
                               records_per_shard=args.records_per_shard, progress=not args.no_progress)

    return run_resumable(job, "stages")
