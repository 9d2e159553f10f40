"""CLIP embedding throughput: our Flax CLIP image tower vs transformers'
PyTorch `CLIPModel`, ViT-B/32 shape (the paper's retriever), the same random
weights, in one run.

The PyTorch model is built with random weights (LayerNorm scales drawn
around 1 so a swapped scale/bias would show), saved as safetensors and
imported through `cm3leon convert clip`'s converter, so both sides compute
the same function; their embeddings of the same batch are compared (max
abs difference, printed) before anything is timed.

Timed: `encode_image` (ours, jitted once for the batch shape) and
`get_image_features` (PyTorch, inference mode, `torch.set_num_threads(
os.cpu_count())`) on a batch of preprocessed 224x224 images, after warm-up,
in alternating rounds (jax, torch | torch, jax | ...) so both see the same
machine load; images/s is the median round. The last line printed is one
JSON object (images_per_sec_jax, images_per_sec_torch, ratio,
max_abs_diff, ...). Quick run: `--batch 4 --calls 1 --rounds 1`.
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
    p.add_argument("--batch", type=int, default=32, help="images per encode call")
    add_round_args(p)
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    apply_xla_flags(ARGS.xla_flags)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cm3leon_jax.models.clip import CLIP, vit_b32_config  # noqa: E402
from cm3leon_jax.models.clip_convert import load_hf_clip  # noqa: E402


def build_torch(cfg, out_dir: str, seed: int):
    """Random-weight transformers CLIPModel with `cfg`'s sizes, written as
    safetensors + config.json."""
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel

    torch = torch_all_cores()
    torch.manual_seed(seed)
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden_size,
                intermediate_size=cfg.text_intermediate_size, num_hidden_layers=cfg.text_num_layers,
                num_attention_heads=cfg.text_num_heads, max_position_embeddings=cfg.max_position_embeddings,
                bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                hidden_act=cfg.hidden_act, projection_dim=cfg.projection_dim)
    vision = dict(hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
                  num_hidden_layers=cfg.vision_num_layers, num_attention_heads=cfg.vision_num_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
                  projection_dim=cfg.projection_dim)
    hc = HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)
    # Built on the meta device and filled here: transformers' own init of a
    # ViT-B/32 would be overwritten anyway.
    with torch.device("meta"):
        model = CLIPModel(hc)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.02)
        for b in model.buffers():  # position_ids, left uninitialised by to_empty
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return save_hf_model(model, hc, out_dir)


def torch_encoder(model, pixels_nhwc) -> TorchCall:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))

    def features():
        out = model.get_image_features(pixel_values=x)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    return TorchCall(features)


def main(args):
    say_jax_banner()
    cfg = vit_b32_config()
    rng = np.random.default_rng(args.seed)
    # what preprocess_images returns: normalised NHWC floats
    pixels = rng.standard_normal((args.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        torch_model = build_torch(cfg, d, args.seed)
        cfg2, params, report = load_hf_clip(d)
    assert cfg2 == cfg, (cfg2, cfg)
    n_vision = sum(int(np.size(v)) for v in jax.tree.leaves(params["vision_model"]))
    say(f"config: ViT-B/32 image tower, {cfg.image_size}^2, patch {cfg.patch_size}, width "
        f"{cfg.vision_hidden_size}, {cfg.vision_num_layers} layers, projection {cfg.projection_dim}; "
        f"{n_vision / 1e6:.1f}M vision params; {report['tensors_used']} tensors imported; batch {args.batch}")
    runners = {"jax": JaxCall.flax_method(CLIP(cfg), CLIP.encode_image, params, pixels)}
    if not args.skip_torch:
        runners["torch"] = torch_encoder(torch_model, pixels)
    emb = {name: r.output() for name, r in runners.items()}  # also the warm-up / compile
    max_diff = float(np.abs(emb["jax"] - emb["torch"]).max()) if "torch" in emb else None
    if max_diff is not None:
        scale = float(np.abs(emb["torch"]).max())
        say(f"embeddings jax vs torch: max abs diff {max_diff:.3g} (max |embedding| {scale:.3g})")
    for r in runners.values():
        r.run(1)

    rates, med = alternating_rounds({name: r.run for name, r in runners.items()}, args.rounds, args.calls,
                                    args.batch, "img/s",
                                    line_format="{name} {rate:6.2f} {unit} (cpu {user:.1f}s / wall {wall:.1f}s)")
    for name, v in med.items():
        say(f"{name:5s}: median {v:.2f} images/s (rounds: {', '.join(f'{x:.1f}' for x in rates[name])})")
    ratio = report_ratio(med)
    result = {"images_per_sec_jax": med["jax"], "images_per_sec_torch": med.get("torch"), "ratio": ratio,
              "max_abs_diff": max_diff,
              "config": {"model": "ViT-B/32 image tower", "image_size": cfg.image_size,
                         "patch_size": cfg.patch_size, "width": cfg.vision_hidden_size,
                         "layers": cfg.vision_num_layers, "projection_dim": cfg.projection_dim,
                         "batch": args.batch, "calls_per_round": args.calls, "rounds": args.rounds,
                         "dtype": "float32", "cpu_count": os.cpu_count()},
              "load_average": os.getloadavg(),
              "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main(ARGS) else 1)
