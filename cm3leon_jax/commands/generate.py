"""`cm3leon generate`: text -> image, image -> text and image editing with a trained model
(registered by cli.py)."""
from __future__ import annotations

import argparse
import json
from typing import List

from cm3leon_jax.commands.helpers import (add_model_bundle_args, add_sampling_args, input_error,
                                          sampling_settings)


def add_generate(sub):
    p = sub.add_parser(
        "generate", help="sample images for text prompts (or text for an image) with a trained model",
        description="Text -> image: for each prompt, --num_samples samples (one batch, a jitted KV-cache "
                    "decoder), with classifier-free guidance (--cfg_scale; the unconditional stream is the "
                    "prompt with its text replaced by <mask>), top-p or contrastive decoding (CD-K) or "
                    "both (mixed: sample 1 of each prompt CD-K, the others top-p), optional retrieval "
                    "(--num_retrieved) from the training task's memory bank, reranked by CLIP; writes PNGs, "
                    "grid.png and samples.json. "
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
    add_model_bundle_args(p)
    p.set_defaults(func=cmd_generate)


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
