"""`cm3leon tokenizer train-image|train-text`: the VQ-GAN and the BPE that make the unified vocabulary
(registered by cli.py)."""
from __future__ import annotations

from typing import List

from cm3leon_jax import gin_utils
from cm3leon_jax.commands.helpers import run_trainer


VQ_MODULES = ("cm3leon_jax.models.vqgan", "cm3leon_jax.train.vqgan_trainer")


def add_tokenizer(sub):
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


def cmd_tokenizer_train_image(args, gin_bindings: List[str]) -> int:
    gin_utils.parse_from_args(args, gin_bindings, extra_modules=VQ_MODULES)
    import gin

    from cm3leon_jax.train import vqgan_trainer

    model_dir = args.model_dir or gin.query_parameter("MODEL_DIR/macro.value")
    return run_trainer(model_dir, vqgan_trainer.train_vqgan)


def cmd_tokenizer_train_text(args, gin_bindings: List[str]) -> int:
    del gin_bindings
    from cm3leon_jax.data import bpe_training

    files = [f for item in args.input for f in item.split(",") if f]
    return bpe_training.train_text_main(files, args.vocab_size, args.out)
