"""The FID InceptionV3 (pool3, 2,048 features) in Flax, loading the weights
file pytorch-fid and clean-fid use (`pt_inception-2015-12-05-*.pth`, the
TensorFlow FID graph's weights ported to torchvision's Inception3 layout).

Architecture: torchvision's Inception3 trunk (Conv2d_1a_3x3 ... Mixed_7c,
then global average pooling) with the four changes that make it compute the
original TensorFlow FID network's features:

- the average pools in Mixed_5b/5c/5d (InceptionA), Mixed_6b-6e
  (InceptionC) and Mixed_7b (InceptionE) do not count the padding;
- Mixed_7c's pooling branch uses a 3x3 max pool (stride 1, pad 1) instead
  of the average pool.

Every convolution is bias-free and followed by BatchNorm (eps 1e-3, the
running statistics; inference only) and ReLU. Inputs: uint8 [N, H, W, 3]
images, resized bilinearly to 299 x 299 (no antialiasing, as
`F.interpolate(..., mode="bilinear", align_corners=False)`) and scaled to
[-1, 1].

No weights ship with this project and none can be downloaded here: pass the
file with `--inception_weights`. `load_torch_weights` reads the torch state
dict (keys `Mixed_5b.branch1x1.conv.weight`, `....bn.running_mean`, ...);
the tests check it against an independent PyTorch build of the same network
with random weights.
"""
from __future__ import annotations

import os
from typing import Dict, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3

Pad = Union[int, Tuple[int, int]]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running stats) -> ReLU; torch layout names
    `conv` / `bn` so the state dict maps one to one."""
    features: int
    kernel: Pad
    stride: Pad = 1
    padding: Pad = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, momentum=0.9, name="bn")(x)
        return jax.nn.relu(x)


def _avg_pool_3x3(x):
    # stride 1, pad 1, the padding not counted (the FID network's pooling)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, 1, name="branch1x1")(x)
        b5 = BasicConv(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        b1 = BasicConv(192, 1, name="branch1x1")(x)
        b7 = BasicConv(c, 1, name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    pool: str  # "avg" (Mixed_7b) or "max" (Mixed_7c)

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, 1, name="branch1x1")(x)
        b3 = BasicConv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """[N, 299, 299, 3] in [-1, 1] -> pool3 features [N, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def preprocess(images_uint8) -> jax.Array:
    """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in [-1, 1]."""
    x = jnp.asarray(images_uint8, jnp.float32) / 255.0
    n, h, w, c = x.shape
    if c != 3:
        raise ValueError(f"Inception features need RGB images [N, H, W, 3], got shape {x.shape}")
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, 3), method="bilinear", antialias=False)
    return 2.0 * x - 1.0


def _variables_template():
    return jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.PRNGKey(0),
                                                       jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))


def from_torch_state_dict(state: Dict[str, np.ndarray]) -> dict:
    """Flax variables ({"params", "batch_stats"}) from the torch state dict
    (arrays). KeyError / ValueError name a missing key or a shape mismatch."""
    template = _variables_template()
    out = {"params": {}, "batch_stats": {}}

    def put(tree, path, value):
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value

    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_flatten_with_path(template[collection])[0]:
            names = [k.key for k in path]
            module, leafname = ".".join(names[:-1]), names[-1]
            torch_name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                          "var": "running_var"}[leafname]
            key = f"{module}.{torch_name}"
            if key not in state:
                raise KeyError(f"Inception weights: {key!r} is missing (is this pytorch-fid's "
                               "pt_inception-2015-12-05 file?)")
            value = np.asarray(state[key], np.float32)
            if leafname == "kernel":  # torch [O, I, kh, kw] -> flax [kh, kw, I, O]
                value = value.transpose(2, 3, 1, 0)
            if value.shape != tuple(leaf.shape):
                raise ValueError(f"Inception weights: {key!r} has shape {value.shape}, expected {leaf.shape}")
            put(out[collection], names, value)
    return out


def load_torch_weights(path: str) -> dict:
    """Flax variables from a pytorch-fid weights file (a torch state dict)."""
    if not os.path.isfile(path):
        raise ValueError(f"Inception weights file {path!r} does not exist: download pytorch-fid's "
                         "pt_inception-2015-12-05-6726825d.pth elsewhere and pass its path")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one clear error
        raise ValueError(f"Inception weights file {path!r} could not be read as a torch state dict: "
                         f"{type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return from_torch_state_dict({k: v.detach().cpu().numpy() for k, v in state.items()
                                  if hasattr(v, "detach")})


class InceptionFeatures:
    """pool3 features of uint8 images, batched under one jit."""

    name = "inception"
    resolution = INPUT_SIZE
    dim = FEATURE_DIM

    def __init__(self, weights: Union[str, dict], batch_size: int = 32):
        self.variables = load_torch_weights(weights) if isinstance(weights, str) else weights
        self.batch_size = int(batch_size)
        model = FIDInceptionV3()
        # resizing apart from the network: the network compiles once, whatever the image size
        self._preprocess = jax.jit(preprocess)
        self._apply = jax.jit(model.apply)

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        images = np.asarray(images, np.uint8)
        out = []
        for s in range(0, len(images), self.batch_size):
            chunk = images[s:s + self.batch_size]
            m = len(chunk)
            if m < self.batch_size:  # one compiled shape; the padding rows are dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - m, axis=0)])
            out.append(np.asarray(self._apply(self.variables, self._preprocess(chunk)))[:m])
        return np.concatenate(out).astype(np.float64)
