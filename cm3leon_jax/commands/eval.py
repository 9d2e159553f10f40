"""`cm3leon eval ...`: the evaluation subcommands (registered by cli.py).

- `fid --real=DIR --fake=DIR --features=clip --clip_dir=D`: Fréchet distance
  of two image dirs on a feature extractor (eval/fid.py).
- `clip_score --samples=OUT --clip_dir=D`: mean CLIP similarity of a
  `cm3leon generate --out` dir's images to their prompts (eval/samples.py).
- `shapes --samples=OUT`: the shapes checker's accuracy of those images
  against their prompts (eval/samples.py).
- `captions --predictions=FILE.jsonl`: CIDEr and BLEU-4 of image -> text
  predictions with pycocoevalcap (eval/captions.py).
- `coco --model_dir=D --coco_dir=DIR --num_images=30000 --out=OUT`: the
  MS-COCO 30K zero-shot FID protocol on a local COCO copy (eval/coco.py).

Each prints one JSON line (and writes it to --out when given); bad input is
one `error:` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
from typing import List

EVAL_COMMANDS = ("fid", "clip_score", "shapes", "captions", "coco")


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
                    "hold, the top-ranked sample's accuracy (best of N by CLIP), a breakdown by "
                    "decoding, and per kind of fact (kind, color, size, position, relation, count) and "
                    "per number of shapes (1, 2, 3): over all samples (\"facts\", \"by_shapes\"), "
                    "sample 0 (\"first_sample\") and the top-ranked ones (\"top_ranked\"). Prompts "
                    "that are not shapes captions are counted and skipped.",
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

    co = esub.add_parser(
        "coco", help="MS-COCO 30K zero-shot FID: generate for COCO captions, FID against the COCO images",
        description="The paper's MS-COCO 30K protocol on a local copy of COCO (nothing is downloaded): "
                    "--num_images images of the split drawn with --seed, one caption each; one image "
                    "generated per caption (best of --num_samples by CLIP score); real images resized and "
                    "centre-cropped to the generator's resolution; FID on InceptionV3 pool3 features "
                    "(--inception_weights) or CLIP features. Writes OUT/real, OUT/fake, OUT/captions.jsonl "
                    "and OUT/fid.json; a rerun with the same flags continues where it stopped.",
        epilog="Example: cm3leon eval coco --model_dir=/m/cm3leon_350m --coco_dir=/data/coco --num_images=30000 "
               "--out=/tmp/coco30k --inception_weights=pt_inception-2015-12-05-6726825d.pth\n"
               "COCO_DIR layout: annotations/captions_val2014.json and val2014/*.jpg (COCO 2014, unzipped).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("--model_dir", required=True, help="a `cm3leon train` model dir")
    co.add_argument("--coco_dir", required=True, help="local COCO 2014 (annotations/ and the split's images)")
    co.add_argument("--out", required=True, help="output dir (real/, fake/, captions.jsonl, fid.json)")
    co.add_argument("--num_images", type=int, default=30000, help="images (and captions) drawn (default 30000)")
    co.add_argument("--split", default="val2014", help="COCO split (default val2014, the protocol's)")
    co.add_argument("--seed", type=int, default=0, help="selection and sampling seed (default 0)")
    co.add_argument("--features", choices=("inception", "clip"), default="inception",
                    help="FID features (default inception, the reported kind)")
    co.add_argument("--inception_weights", default=None,
                    help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (for --features=inception)")
    co.add_argument("--clip_dir", default=None, help="CLIP model dir for --features=clip")
    from cm3leon_jax.commands.helpers import add_sampling_args

    add_sampling_args(co)  # as `cm3leon generate`: mixed top-p / CD-K, CFG 3 by default
    co.add_argument("--num_samples", type=int, default=8,
                    help="samples per caption, reranked by CLIP; the best is kept (default 8, as the paper)")
    co.add_argument("--num_retrieved", type=int, default=2, help="retrieved documents (default 2, as the paper)")
    co.add_argument("--batch_rows", type=int, default=32, help="rows per sampler call (default 32)")
    co.add_argument("--data_dir", default=None, help="a `cm3leon task-data` dir for retrieval (default: the "
                                                      "training task's)")
    co.add_argument("--no_progress", action="store_true", help="no progress bars")
    co.set_defaults(func=cmd_coco)


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
    from cm3leon_jax.commands.helpers import input_error
    from cm3leon_jax.eval import fid

    try:
        result = fn()
        fid.write_json(result, out)
    except (ValueError, OSError) as e:
        return input_error(e)
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


def cmd_coco(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    import logging

    logging.getLogger().setLevel(logging.INFO)

    def job():
        from cm3leon_jax.commands.helpers import sampling_settings
        from cm3leon_jax.eval import coco

        if args.features == "clip" and not args.clip_dir:
            raise ValueError("--features=clip needs --clip_dir (a CLIP model dir)")
        for name in ("num_samples", "batch_rows"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        settings = sampling_settings(args)
        return coco.run_protocol(args.model_dir, args.coco_dir, args.out, num_images=args.num_images,
                                 split=args.split, seed=args.seed, sampling=settings, num_samples=args.num_samples,
                                 num_retrieved=args.num_retrieved, features=args.features,
                                 inception_weights=args.inception_weights, clip_features_dir=args.clip_dir,
                                 batch_rows=args.batch_rows, data_dir=args.data_dir,
                                 progress=not args.no_progress)

    return _run(job, None)
