"""Image tokenizer throughput: our Flax VQ-GAN encoder vs transformers' PyTorch
JanusVQVAE encoder, same config and the same random weights, in one run.

The config is the paper's layout (Make-A-Scene f=8: 256x256 -> 32x32 = 1,024
codes of 8,192, codebook dim 256; channel plan (1, 2, 2, 4), 2 res blocks, base
128 channels). The PyTorch model is built with random weights, saved as
safetensors and imported through `cm3leon convert vqgan`'s converter, so both
sides compute the same function; the codes they produce are compared (agreement
is printed) before anything is timed.

Both are warmed up, then timed in alternating rounds (jax, torch | torch,
jax | ...) so both see the same machine load; images/s is the median round.
The last line printed is one JSON object (images_per_sec_jax,
images_per_sec_torch, ratio, code_agreement, config, ...).
Quick run: `--base-channels 32 --batch 2 --rounds 1`.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from common import (JaxCall, TorchCall, add_round_args, alternating_rounds, apply_xla_flags, make_parser,
                    report_ratio, save_hf_model, say, say_jax_banner, torch_all_cores)


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--base-channels", type=int, default=128)
    p.add_argument("--channel-multiplier", default="1,2,2,4", help="comma-separated; f = 2^(n-1)")
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--num-embeddings", type=int, default=8192)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="images per encode call")
    add_round_args(p)
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    apply_xla_flags(ARGS.xla_flags)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cm3leon_jax.models.vqgan import VQGAN  # noqa: E402
from cm3leon_jax.models.vqgan_convert import load_hf_vqgan  # noqa: E402


def build_torch(args, out_dir: str):
    """Random-weight JanusVQVAE written as safetensors + config.json."""
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    torch = torch_all_cores()
    torch.manual_seed(args.seed)
    mult = [int(m) for m in args.channel_multiplier.split(",")]
    hc = JanusVQVAEConfig(embed_dim=args.embed_dim, num_embeddings=args.num_embeddings,
                          latent_channels=256, base_channels=args.base_channels,
                          channel_multiplier=mult, num_res_blocks=args.num_res_blocks,
                          num_patches=args.resolution // 2 ** (len(mult) - 1))
    return save_hf_model(JanusVQVAE(hc).eval(), hc, out_dir)


def torch_encoder(model, images) -> TorchCall:
    import torch

    x = torch.from_numpy(images)
    return TorchCall(lambda: model.encode(x), post=lambda out: out.image_tokens.view(x.shape[0], -1))


def main(args):
    say_jax_banner()
    rng = np.random.default_rng(args.seed)
    images = rng.uniform(-1, 1, (args.batch, 3, args.resolution, args.resolution)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        torch_model = build_torch(args, d)
        cfg, params, report = load_hf_vqgan(d)
    say(f"config: {args.resolution}^2 -> {cfg.latent_size}x{cfg.latent_size} codes of "
        f"{cfg.num_embeddings}, base {cfg.base_channels}, mult {cfg.channel_multiplier}, "
        f"{cfg.num_res_blocks} res blocks; {report['tensors_used']} tensors imported")
    runners = {"jax": JaxCall.flax_method(VQGAN(cfg), VQGAN.encode, params,
                                          images.transpose(0, 2, 3, 1))}  # NCHW -> NHWC
    if not args.skip_torch:
        runners["torch"] = torch_encoder(torch_model, images)
    codes = {name: r.output() for name, r in runners.items()}  # also the warm-up / compile
    agreement = float((codes["jax"] == codes["torch"]).mean()) if "torch" in codes else None
    if agreement is not None:
        say(f"code agreement jax vs torch: {100 * agreement:.2f}% of {codes['jax'].size} positions")
    for r in runners.values():
        r.run(1)

    _, med = alternating_rounds({name: r.run for name, r in runners.items()}, args.rounds, args.calls,
                                args.batch, "img/s", line_format="{name} {rate:6.2f} {unit}")
    for name, v in med.items():
        say(f"{name:5s}: median {v:.2f} images/s")
    ratio = report_ratio(med)
    result = {"images_per_sec_jax": med["jax"], "images_per_sec_torch": med.get("torch"),
              "ratio": ratio, "code_agreement": agreement,
              "config": {"resolution": args.resolution, "codes_per_image": cfg.codes_per_image,
                         "num_embeddings": cfg.num_embeddings, "embed_dim": cfg.embed_dim,
                         "base_channels": cfg.base_channels,
                         "channel_multiplier": list(cfg.channel_multiplier),
                         "num_res_blocks": cfg.num_res_blocks, "batch": args.batch,
                         "calls_per_round": args.calls, "rounds": args.rounds,
                         "dtype": "float32", "cpu_count": os.cpu_count()},
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main(ARGS) else 1)
