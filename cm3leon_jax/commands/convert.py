"""`cm3leon convert vqgan|clip|chameleon`: external (Hugging Face safetensors) weights into model dirs
(registered by cli.py)."""
from __future__ import annotations

import json
from typing import List

from cm3leon_jax.commands.helpers import input_error


def add_convert(sub):
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
