"""LPIPS perceptual distance (Flax linen) for the VQ-GAN tokenizer's loss.

LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as
a Perceptual Metric") compares two images through a frozen ImageNet VGG16:
at five ReLU taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) each feature
vector is unit-normalised over channels, the squared difference is weighted
per channel by a learnt non-negative 1x1 "lin" layer, averaged over space and
summed over the taps. Taming-transformers' VQ-GAN (Esser et al. 2021), which
Make-A-Scene's tokenizer (the one CM3Leon uses) builds on, adds it to the L1
reconstruction loss: pixel losses alone give blurry reconstructions.

Weights are read from one **safetensors** file (never a pickle), holding:
    features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}  torchvision VGG16
    lin{0..4}.model.1.weight   [1, C, 1, 1]   (optional) the `lpips` package's lin layers
Any other key (e.g. `classifier.*`) is ignored. Without the lin keys the
"baseline" variant is used: every channel weight 1, i.e. the plain channel
sum of the squared normalised differences (the `lpips` package's
`LPIPS(lpips=False)`: still a perceptual loss, without the lin layers'
calibration on human judgements).

Write such a file on a machine with torchvision and `lpips` installed:

    import lpips, torchvision, safetensors.torch
    vgg = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()
    t = {f"features.{k}": v.contiguous() for k, v in vgg.items()}
    lp = lpips.LPIPS(net="vgg"); t.update({f"lin{i}.model.1.weight": getattr(lp, f"lin{i}").model[1].weight.detach().contiguous() for i in range(5)})
    safetensors.torch.save_file(t, "lpips_vgg.safetensors")

Parameter names mirror torchvision's: `features.{i}.weight` ([out, in, kh, kw])
is `vgg/features_{i}/kernel` ([kh, kw, in, out]), `features.{i}.bias` is
`vgg/features_{i}/bias`, and `lin{i}.model.1.weight` ([1, C, 1, 1]) is
`lin{i}/kernel` ([1, 1, C, 1]).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

# torchvision's vgg16().features: (index in the nn.Sequential, out channels) of
# each 3x3 conv; "M" is a 2x2/2 max-pool. ReLUs sit at conv index + 1.
_VGG16_LAYOUT: Tuple[Any, ...] = (
    (0, 64), (2, 64), "M",
    (5, 128), (7, 128), "M",
    (10, 256), (12, 256), (14, 256), "M",
    (17, 512), (19, 512), (21, 512), "M",
    (24, 512), (26, 512), (28, 512),
)
# Convs whose ReLU output LPIPS taps: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (2, 7, 14, 21, 28)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# relu5_3 is behind 4 pools: anything under 16 px would pool a side to zero.
MIN_SIZE = 16

# LPIPS's ScalingLayer: maps [-1, 1] images to the ImageNet normalisation
# VGG was trained with ((x+1)/2 - mean) / std, written as (x - shift) / scale.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision VGG16 `features` up to relu5_3, NHWC. Returns the 5 ReLU
    activations LPIPS taps, [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3].
    The final pool (features.30) is not needed by LPIPS and not applied."""

    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> List[jnp.ndarray]:
        taps = []
        for layer in _VGG16_LAYOUT:
            if layer == "M":
                # torch MaxPool2d(2, 2) floors odd sizes, as VALID padding does.
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
                continue
            idx, ch = layer
            x = nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), precision=self.precision,
                        name=f"features_{idx}")(x)
            x = nn.relu(x)
            if idx in _TAPS:
                taps.append(x)
        return taps


def _unit_normalise(f: jnp.ndarray, eps: float = 1e-10) -> jnp.ndarray:
    """f / (||f||_channels + eps) as LPIPS's normalize_tensor. The norm is a
    "safe" sqrt: where a pixel's features are all zero (dead ReLUs, common at
    relu5_3) d sqrt/ds is infinite and 0 * inf would turn the whole gradient
    into NaN; the value is unchanged (sqrt(0) = 0)."""
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    pos = sq > 0
    norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS distance between two NHWC image batches in [-1, 1] -> [B].

    use_lin=True: the learnt per-channel lin weights (params `lin{i}/kernel`,
    [1, 1, C, 1], must be non-negative; `load_lpips` checks). use_lin=False:
    the "baseline" variant, every channel weighted 1 (channel sum).
    """

    use_lin: bool = True
    precision: Optional[jax.lax.Precision] = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
        check_images(x, y)
        shift = jnp.asarray(_SHIFT, x.dtype)
        scale = jnp.asarray(_SCALE, x.dtype)
        vgg = VGG16Features(precision=self.precision, name="vgg")
        # One VGG pass over both batches: half the dispatches, same numbers.
        b = x.shape[0]
        feats = vgg((jnp.concatenate([x, y], axis=0) - shift) / scale)
        total = jnp.zeros((b,), x.dtype)
        for i, (f, ch) in enumerate(zip(feats, TAP_CHANNELS)):
            d = jnp.square(_unit_normalise(f[:b]) - _unit_normalise(f[b:]))  # [B, h, w, C]
            if self.use_lin:
                # The lpips package's 1x1 conv, no bias; ones at init = baseline.
                d = nn.Conv(1, (1, 1), use_bias=False, kernel_init=nn.initializers.ones,
                            precision=self.precision, name=f"lin{i}")(d)[..., 0]
            else:
                d = jnp.sum(d, axis=-1)
            total = total + jnp.mean(d, axis=(1, 2))
        return total


def check_images(x: jnp.ndarray, y: jnp.ndarray) -> None:
    """Raise ValueError on inputs LPIPS cannot compare (shapes are static, so
    this also fires while tracing under jit)."""
    if x.shape != y.shape:
        raise ValueError(f"LPIPS: images must have the same shape, got {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"LPIPS: expected NHWC RGB images [B, H, W, 3] in [-1, 1], got shape {x.shape}")
    h, w = x.shape[1], x.shape[2]
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"LPIPS: images are {h}x{w}, VGG16's 4 pools before relu5_3 need at least "
                         f"{MIN_SIZE}x{MIN_SIZE}; upsample them or drop the perceptual loss")


def expected_shapes(use_lin: bool = True) -> Dict[str, Tuple[int, ...]]:
    """torch key -> torch shape for every tensor `load_lpips` needs."""
    out: Dict[str, Tuple[int, ...]] = {}
    cin = 3
    for layer in _VGG16_LAYOUT:
        if layer == "M":
            continue
        idx, ch = layer
        out[f"features.{idx}.weight"] = (ch, cin, 3, 3)
        out[f"features.{idx}.bias"] = (ch,)
        cin = ch
    if use_lin:
        for i, ch in enumerate(TAP_CHANNELS):
            out[f"lin{i}.model.1.weight"] = (1, ch, 1, 1)
    return out


def load_lpips(path: str, precision: Optional[jax.lax.Precision] = None,
               report: Optional[dict] = None) -> Tuple[LPIPS, dict]:
    """(LPIPS module, params) from a safetensors file of torchvision VGG16
    `features.*` tensors and optionally the `lpips` package's `lin*` weights
    (see the module docstring for how to write one). Apply with
    `module.apply({"params": params}, x, y)` or use `perceptual_loss`.

    Without any `lin*` key the baseline (unweighted) variant is returned; a
    file with only some of them is an error, since silently mixing the two
    variants would give neither metric. Keys not needed (e.g. `classifier.*`)
    are ignored and counted: logged, and put in `report` (used, ignored,
    use_lin) when a dict is passed."""
    from safetensors.numpy import load_file

    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt", ".bin", ".ckpt", ".pkl"):
        raise ValueError(
            f"{path}: pickled torch checkpoints are not read (loading them can run arbitrary code); "
            "convert to safetensors elsewhere, e.g.\n"
            "    import torch, safetensors.torch\n"
            f"    sd = torch.load({path!r}, map_location='cpu', weights_only=True)\n"
            "    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "
            "'lpips_vgg.safetensors')\n"
            "(the VGG keys must be named features.N.weight/bias: see cm3leon_jax/models/lpips.py)")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such LPIPS weights file (a .safetensors file; "
                         "see cm3leon_jax/models/lpips.py for how to write one)")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({e}); see "
                         "cm3leon_jax/models/lpips.py for how to write one") from e

    lin_keys = [k for k in expected_shapes(True) if k.startswith("lin")]
    present = [k for k in lin_keys if k in tensors]
    use_lin = bool(present)
    expected = expected_shapes(use_lin)
    for key, shape in expected.items():
        if key not in tensors:
            what = ("the lpips lin weights are all-or-none" if key.startswith("lin")
                    else "torchvision VGG16 features weights expected")
            raise ValueError(f"{path}: missing tensor {key!r} ({what}; "
                             "see cm3leon_jax/models/lpips.py for how to write the file)")
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"expected {shape} (VGG16 features / LPIPS vgg lin layout)")
    for key in present:
        if np.any(tensors[key] < 0):
            # LPIPS clamps lin weights to >= 0 in training; a negative one
            # lets the distance go negative, which a loss minimiser exploits.
            raise ValueError(f"{path}: tensor {key!r} has negative entries; LPIPS lin weights "
                             "must be non-negative")

    def f32(a):
        return jnp.asarray(np.asarray(a, dtype=np.float32))

    vgg: Dict[str, Any] = {}
    for layer in _VGG16_LAYOUT:
        if layer == "M":
            continue
        idx, _ = layer
        vgg[f"features_{idx}"] = {
            "kernel": f32(np.transpose(tensors[f"features.{idx}.weight"], (2, 3, 1, 0))),  # OIHW -> HWIO
            "bias": f32(tensors[f"features.{idx}.bias"]),
        }
    params: Dict[str, Any] = {"vgg": vgg}
    if use_lin:
        for i in range(len(TAP_CHANNELS)):
            params[f"lin{i}"] = {"kernel": f32(np.transpose(tensors[f"lin{i}.model.1.weight"], (2, 3, 1, 0)))}
    ignored = sorted(set(tensors) - set(expected))
    # Extra keys are normal (classifier.* from a whole vgg16 state dict) but
    # are counted, not silently dropped, so a wrong file shows up in the log.
    log.info("LPIPS: %s: %d tensors used (%s), %d ignored%s", path, len(expected),
             "learnt lin weights" if use_lin else "baseline, no lin weights", len(ignored),
             f" (e.g. {ignored[:3]})" if ignored else "")
    if report is not None:
        report.update(path=path, used=len(expected), ignored=len(ignored), use_lin=use_lin)
    return LPIPS(use_lin=use_lin, precision=precision), params


def perceptual_loss(module: LPIPS, params: dict, x: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Mean LPIPS distance over the batch, a scalar differentiable w.r.t. `x`
    (the VQ-GAN reconstruction; `y` is the input image). LPIPS is a fixed
    metric, never trained with the tokenizer: stop_gradient keeps its params
    out of the gradient even if a caller differentiates w.r.t. a tree holding
    them. `params` is the tree `load_lpips` returns (or {"params": tree})."""
    if set(params) == {"params"}:
        params = params["params"]
    params = jax.lax.stop_gradient(params)
    return jnp.mean(module.apply({"params": params}, x, y))
