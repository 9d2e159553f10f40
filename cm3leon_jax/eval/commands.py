"""`cm3leon eval ...`: the evaluation subcommands (registered by cli.py).

- `fid --real=DIR --fake=DIR --features=clip --clip_dir=D`: Fréchet distance
  of two image dirs on a feature extractor (eval/fid.py).
- `clip_score --samples=OUT --clip_dir=D`: mean CLIP similarity of a
  `cm3leon generate --out` dir's images to their prompts (eval/samples.py).
- `shapes --samples=OUT`: the shapes checker's accuracy of those images
  against their prompts (eval/samples.py).
- `captions --predictions=FILE.jsonl`: CIDEr and BLEU-4 of image -> text
  predictions with pycocoevalcap (eval/captions.py).

Each prints one JSON line (and writes it to --out when given); bad input is
one `error:` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
from typing import List

EVAL_COMMANDS = ("fid", "clip_score", "shapes", "captions")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate generations: FID, CLIP score, shapes checker accuracy, captions",
                       description="Evaluation of generated images and text.")
    esub = p.add_subparsers(dest="eval_command", metavar="WHAT")
    f = esub.add_parser(
        "fid", help="Fréchet distance between two image dirs on a feature extractor",
        description="Fits a Gaussian to the features of each dir's images and prints the Fréchet "
                    "distance. --features=inception: the standard FID InceptionV3 pool3 features "
                    "(pytorch-fid / clean-fid), from --inception_weights; --features=clip: the CLIP "
                    "model dir's L2-normalised image embeddings (CLIP-FID). Unreadable images are "
                    "skipped and counted. FID is biased upwards on small sets: a warning is logged "
                    "below 2,048 images per side.",
        epilog="Example: cm3leon eval fid --real=demo_out/real --fake=demo_out/samples --features=clip "
               "--clip_dir=demo_out/clip",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--real", required=True, help="dir of reference images")
    f.add_argument("--fake", required=True, help="dir of generated images")
    f.add_argument("--features", choices=("inception", "clip"), default="inception",
                   help="feature extractor (default inception)")
    f.add_argument("--inception_weights", default=None,
                   help="for --features=inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    f.add_argument("--clip_dir", default=None, help="CLIP model dir, for --features=clip")
    f.add_argument("--batch_size", type=int, default=64, help="images per feature batch (default 64)")
    f.add_argument("--out", default=None, help="also write the result to this JSON file")
    f.set_defaults(func=cmd_fid)

    c = esub.add_parser(
        "clip_score", help="mean CLIP similarity of generated images to their prompts",
        description="Cosine similarity of the CLIP embeddings (L2-normalised) of each image in a "
                    "`cm3leon generate --out` dir and its prompt, averaged over all samples and over "
                    "each prompt's top-ranked sample.",
        epilog="Example: cm3leon eval clip_score --samples=/tmp/samples --clip_dir=demo_out/clip")
    c.add_argument("--samples", required=True, help="a `cm3leon generate --out` dir (or its samples.json)")
    c.add_argument("--clip_dir", required=True, help="CLIP model dir")
    c.add_argument("--out", default=None, help="also write the result to this JSON file")
    c.set_defaults(func=cmd_clip_score)

    s = esub.add_parser(
        "shapes", help="shapes-checker accuracy of generated images against their captions",
        description="Reads each image of a `cm3leon generate --out` dir back into shapes, colours, "
                    "sizes, positions and relations with the analytic checker and scores it against "
                    "its prompt: accuracy (every stated fact holds), the mean share of facts that "
                    "hold, the top-ranked sample's accuracy (best of N by CLIP) and a breakdown by "
                    "decoding. Prompts that are not shapes captions are counted and skipped.",
        epilog="Example: cm3leon eval shapes --samples=/tmp/samples")
    s.add_argument("--samples", required=True, help="a `cm3leon generate --out` dir (or its samples.json)")
    s.add_argument("--out", default=None, help="also write the result to this JSON file")
    s.set_defaults(func=cmd_shapes)

    k = esub.add_parser(
        "captions", help="CIDEr and BLEU-4 of image -> text predictions (pycocoevalcap)",
        description="Scores captions with COCO's own scorers (pycocoevalcap's CIDEr and BLEU). Input: "
                    "a JSON-lines file, one {\"id\", \"prediction\", \"references\": [...]} per image. "
                    "Tokenised with COCO's PTB tokenizer when java is installed, else a built-in one "
                    "(with a warning).",
        epilog="Example: cm3leon eval captions --predictions=/tmp/captions.jsonl")
    k.add_argument("--predictions", required=True, help="JSON-lines file of id / prediction / references")
    k.add_argument("--tokenizer", choices=("auto", "ptb", "simple"), default="auto",
                   help="auto (default): PTB when java is on PATH, else simple")
    k.add_argument("--out", default=None, help="also write the result to this JSON file")
    k.set_defaults(func=cmd_captions)


def cmd_fid(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    import logging

    from cm3leon_jax.eval import fid

    logging.getLogger().setLevel(logging.INFO)

    def job():
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        fid.list_images(args.real), fid.list_images(args.fake)  # fail before loading a model
        extractor = fid.make_extractor(args.features, clip_dir=args.clip_dir, batch_size=args.batch_size,
                                       inception_weights=args.inception_weights)
        return fid.fid_between(args.real, args.fake, extractor)

    return _run(job, args.out)


def _run(fn, out: str) -> int:
    from cm3leon_jax.cli import _input_error
    from cm3leon_jax.eval import fid

    try:
        result = fn()
        fid.write_json(result, out)
    except (ValueError, OSError) as e:
        return _input_error(e)
    print(json.dumps(result), flush=True)
    return 0


def cmd_clip_score(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.eval import samples

    return _run(lambda: samples.clip_score(args.samples, args.clip_dir), args.out)


def cmd_shapes(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.eval import samples

    return _run(lambda: samples.shapes_accuracy(args.samples), args.out)


def cmd_captions(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.eval import captions

    def job():
        refs, preds = captions.read_predictions(args.predictions)
        return captions.score_captions(refs, preds, tokenizer=args.tokenizer)

    return _run(job, args.out)
