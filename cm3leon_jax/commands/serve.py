"""`cm3leon serve`: a local web page and HTTP API for a trained model dir (registered by cli.py)."""
from __future__ import annotations

import argparse
from typing import List

from cm3leon_jax.commands.helpers import add_model_bundle_args, input_error


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="a web page and HTTP API for a trained model (text -> image, image -> text, editing)",
        description="Load a model dir once (decoder, VQ-GAN, BPE, CLIP, and the retrieval index when its task "
                    "data has one), compile the sampler, then serve a page (type a prompt, see the samples "
                    "ranked by CLIP with the retrieved documents and the `cm3leon generate` command that "
                    "reproduces them; caption or ask about an image; edit with a fine-tuned model) and a JSON "
                    "API: POST /api/generate, POST /api/describe, POST /api/edit, GET /api/info. Text -> image "
                    "requests that arrive together are decoded as one batch (each keeps its own samples); past "
                    "--max_queue waiting requests the API answers 503. Binds to localhost unless --host says "
                    "otherwise.",
        epilog="Example: cm3leon serve --model_dir=demo_out/model    (then open http://127.0.0.1:7860/)\n"
               "         curl -s localhost:7860/api/generate -H 'content-type: application/json' "
               "-d '{\"prompt\": \"a red circle\", \"num_samples\": 4, \"seed\": 1}'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a `cm3leon train` or `cm3leon finetune` model dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--max_batch_rows", type=int, default=32,
                   help="rows (request x sample) per sampler call when requests are batched (default 32)")
    p.add_argument("--max_queue", type=int, default=16,
                   help="requests waiting for the sampler before the API answers 503 (default 16)")
    p.add_argument("--batch_window_ms", type=float, default=50.0,
                   help="how long a request waits for others to share its batch (default 50 ms)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none", help="weight-only int8 decoding")
    p.add_argument("--no_warm_up", action="store_true", help="do not compile the sampler before serving")
    add_model_bundle_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args, gin_bindings: List[str]) -> int:
    if gin_bindings:
        return input_error(ValueError("serve takes no --gin.* flags (the model dir's config.gin is used)"))
    try:
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port must lie in [1, 65535], got {args.port}")
        if args.max_batch_rows < 1 or args.max_queue < 1 or args.batch_window_ms < 0:
            raise ValueError("--max_batch_rows and --max_queue must be >= 1 and --batch_window_ms >= 0")
        try:
            import fastapi  # noqa: F401
            import gradio  # noqa: F401
        except ImportError as e:
            raise ValueError(f"cm3leon serve needs gradio ({e}): pip install -e '.[serve]'") from None
        from cm3leon_jax.serve.app import serve
        from cm3leon_jax.serve.model_server import ServeConfig

        config = ServeConfig(model_dir=args.model_dir, vqgan_dir=args.vqgan_dir, text_tokenizer=args.text_tokenizer,
                             clip_dir=args.clip_dir, data_dir=args.data_dir, max_batch_rows=args.max_batch_rows,
                             max_queue=args.max_queue, batch_window_s=args.batch_window_ms / 1000.0,
                             quantize=args.quantize)
        return serve(config, args.host, args.port, warm_up=not args.no_warm_up)
    except (ValueError, OSError) as e:
        return input_error(e)
