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

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--base-channels", type=int, default=128)
    p.add_argument("--channel-multiplier", default="1,2,2,4", help="comma-separated; f = 2^(n-1)")
    p.add_argument("--num-res-blocks", type=int, default=2)
    p.add_argument("--num-embeddings", type=int, default=8192)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="images per encode call")
    p.add_argument("--calls", type=int, default=2, help="timed encode calls per round and framework")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS (appended)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cm3leon_jax.models.vqgan import VQGAN  # noqa: E402
from cm3leon_jax.models.vqgan_convert import load_hf_vqgan  # noqa: E402


def say(*a):
    print(*a, flush=True)


def build_torch(args, out_dir: str):
    """Random-weight JanusVQVAE written as safetensors + config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count())
    mult = [int(m) for m in args.channel_multiplier.split(",")]
    hc = JanusVQVAEConfig(embed_dim=args.embed_dim, num_embeddings=args.num_embeddings,
                          latent_channels=256, base_channels=args.base_channels,
                          channel_multiplier=mult, num_res_blocks=args.num_res_blocks,
                          num_patches=args.resolution // 2 ** (len(mult) - 1))
    model = JanusVQVAE(hc).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out_dir, "model.safetensors"))
    hc.save_pretrained(out_dir)
    return model


class JaxEncoder:
    def __init__(self, cfg, params, images):
        model = VQGAN(cfg)
        self.params = jax.tree.map(jnp.asarray, params)
        self.fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode))
        self.x = jnp.asarray(images.transpose(0, 2, 3, 1))  # NCHW -> NHWC

    def codes(self):
        return np.asarray(self.fn(self.params, self.x))

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            out = self.fn(self.params, self.x)
        out.block_until_ready()
        return time.perf_counter() - t0


class TorchEncoder:
    def __init__(self, model, images):
        import torch

        self.torch, self.model = torch, model
        self.x = torch.from_numpy(images)

    def codes(self):
        with self.torch.inference_mode():
            return self.model.encode(self.x).image_tokens.view(self.x.shape[0], -1).numpy()

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        with self.torch.inference_mode():
            for _ in range(n):
                self.model.encode(self.x)
        return time.perf_counter() - t0


def main(args):
    say(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    rng = np.random.default_rng(args.seed)
    images = rng.uniform(-1, 1, (args.batch, 3, args.resolution, args.resolution)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        torch_model = build_torch(args, d)
        cfg, params, report = load_hf_vqgan(d)
    say(f"config: {args.resolution}^2 -> {cfg.latent_size}x{cfg.latent_size} codes of "
        f"{cfg.num_embeddings}, base {cfg.base_channels}, mult {cfg.channel_multiplier}, "
        f"{cfg.num_res_blocks} res blocks; {report['tensors_used']} tensors imported")
    runners = {"jax": JaxEncoder(cfg, params, images)}
    if not args.skip_torch:
        runners["torch"] = TorchEncoder(torch_model, images)
    codes = {name: r.codes() for name, r in runners.items()}  # also the warm-up / compile
    agreement = float((codes["jax"] == codes["torch"]).mean()) if "torch" in codes else None
    if agreement is not None:
        say(f"code agreement jax vs torch: {100 * agreement:.2f}% of {codes['jax'].size} positions")
    for r in runners.values():
        r.run(1)

    rates = {name: [] for name in runners}
    for rnd in range(args.rounds):
        order = list(runners) if rnd % 2 == 0 else list(reversed(runners))
        line = []
        for name in order:
            dt = runners[name].run(args.calls)
            rates[name].append(args.calls * args.batch / dt)
            line.append(f"{name} {rates[name][-1]:6.2f} img/s")
        say(f"round {rnd + 1}/{args.rounds}: " + " | ".join(line))
    med = {name: statistics.median(v) for name, v in rates.items()}
    ratio = med["jax"] / med["torch"] if "torch" in med else None
    for name, v in med.items():
        say(f"{name:5s}: median {v:.2f} images/s")
    if ratio is not None:
        say(f"ratio jax/torch: {ratio:.3f}")
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
