"""LPIPS against a plain-PyTorch reference written here (torchvision's VGG16
`features` index layout + LPIPS's scaling, normalisation, lin weighting and
spatial mean, Zhang et al. 2018), with random weights passed through a
safetensors file and `load_lpips`. The reference runs in float64, so the
comparison bounds our float32 error, not just agreement of two float32 runs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cm3leon_jax.models.lpips import _unit_normalise, load_lpips, perceptual_loss

# torchvision vgg16().features, by nn.Sequential index: convs, ReLUs, pools.
_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_TAP_RELUS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CH = (64, 128, 256, 512, 512)


def _torch_vgg_features() -> torch.nn.Sequential:
    layers, cin = [], 3
    for v in _CFG:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [torch.nn.Conv2d(cin, v, kernel_size=3, padding=1), torch.nn.ReLU(inplace=False)]
            cin = v
    seq = torch.nn.Sequential(*layers)
    conv_idx = [i for i, m in enumerate(seq) if isinstance(m, torch.nn.Conv2d)]
    assert conv_idx == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28], conv_idx
    assert all(isinstance(seq[i], torch.nn.ReLU) for i in _TAP_RELUS)
    return seq


def _torch_lpips(features, lins, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """LPIPS in torch, float64. x, y: NHWC in [-1, 1]. lins: list of [1, C, 1, 1]
    weights, or None for the baseline (channel sum)."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img):
        h = (torch.from_numpy(img).double().permute(0, 3, 1, 2) - shift) / scale
        out = []
        for i, layer in enumerate(features):
            h = layer(h)
            if i in _TAP_RELUS:
                out.append(h)
            if i == _TAP_RELUS[-1]:
                break
        return out

    def normalise(f):
        return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)

    total = 0
    with torch.no_grad():
        for k, (a, b) in enumerate(zip(taps(x), taps(y))):
            d = (normalise(a) - normalise(b)) ** 2
            d = torch.nn.functional.conv2d(d, lins[k]) if lins is not None else d.sum(dim=1, keepdim=True)
            total = total + d.mean(dim=(2, 3), keepdim=True)
    return total.view(-1).numpy()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    torch.manual_seed(0)
    features = _torch_vgg_features()
    with torch.no_grad():
        for m in features:
            if isinstance(m, torch.nn.Conv2d):
                # He init keeps ReLU activations O(1) through all 13 convs.
                m.weight.normal_(0, (2.0 / (m.in_channels * 9)) ** 0.5)
                m.bias.normal_(0, 0.05)
    lins = [torch.rand(1, c, 1, 1) * 0.2 for c in _TAP_CH]  # non-negative, as LPIPS's
    d = tmp_path_factory.mktemp("lpips")
    sd = {f"features.{k}": v.contiguous() for k, v in features.state_dict().items()}
    extra = {"classifier.0.weight": torch.zeros(8, 4), "classifier.0.bias": torch.zeros(8)}
    with_lin = dict(sd, **extra, **{f"lin{i}.model.1.weight": w for i, w in enumerate(lins)})
    save_file(with_lin, str(d / "lpips_vgg.safetensors"))
    save_file(sd, str(d / "vgg_only.safetensors"))
    features = features.double()
    return dict(features=features, lins=[w.double() for w in lins], sd=sd, lin_state=with_lin,
                lin_path=str(d / "lpips_vgg.safetensors"), base_path=str(d / "vgg_only.safetensors"))


@pytest.fixture(scope="module")
def lp(ref):
    """(module, params, load report, jitted fn -> (distances [B], perceptual_loss)).
    One jitted function shared by the tests: XLA compiles VGG16 once per shape
    instead of once per call site, which keeps this file fast on CPU."""
    report = {}
    module, params = load_lpips(ref["lin_path"], report=report)
    both = jax.jit(lambda p, x, y: (module.apply({"params": p}, x, y), perceptual_loss(module, p, x, y)))
    return module, params, report, both


def _images(seed, n, size):
    r = np.random.default_rng(seed)
    return [r.uniform(-1, 1, (n, size, size, 3)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("size,n", [(64, 2), (32, 3)])
def test_matches_torch_reference(ref, lp, size, n):
    module, params, report, both = lp
    assert report["use_lin"] and report["used"] == 31 and report["ignored"] == 2  # classifier.*
    x, y = _images(size, n, size)
    ours, loss = both(params, x, y)
    want = _torch_lpips(ref["features"], ref["lins"], x, y)
    assert ours.shape == (n,)
    assert np.all(want > 0.05), want  # a meaningful, non-degenerate distance
    np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4)
    # perceptual_loss is the batch mean of the same distances.
    np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-4)


def test_baseline_variant_without_lin_keys(ref):
    report = {}
    module, params = load_lpips(ref["base_path"], report=report)
    assert not module.use_lin and not report["use_lin"] and report["used"] == 26
    assert not any(k.startswith("lin") for k in params)
    x, y = _images(1, 2, 64)
    want = _torch_lpips(ref["features"], None, x, y)
    np.testing.assert_allclose(np.asarray(jax.jit(module.apply)({"params": params}, x, y)), want, rtol=1e-4)


def test_identity_and_symmetry(lp):
    module, params, _, both = lp
    x, y = _images(2, 3, 32)  # the shape test_matches_torch_reference compiled
    same, _ = both(params, x, x)
    assert np.all(np.abs(np.asarray(same)) < 1e-7), same
    xy, _ = both(params, x, y)
    yx, _ = both(params, y, x)
    assert np.all(np.asarray(xy) > 0.05)
    np.testing.assert_allclose(np.asarray(xy), np.asarray(yx), rtol=1e-6)


def test_gradient_wrt_reconstruction_only(lp):
    module, params, _, _ = lp
    x, y = _images(3, 2, 32)
    # d loss / d x: finite and non-zero, as the VQ-GAN trainer needs it;
    # d loss / d params: zero (LPIPS is frozen via stop_gradient).
    vg = jax.jit(jax.value_and_grad(lambda xx, pp: perceptual_loss(module, pp, xx, y), argnums=(0, 1)))
    loss, (gx, gp) = vg(x, params)
    gx = np.asarray(gx)
    assert np.all(np.isfinite(gx)) and np.abs(gx).max() > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gp))
    # A small step against the gradient lowers the loss: the gradient is the
    # loss's, not just some finite array.
    loss2, _ = vg(x - 1e-2 * gx / np.abs(gx).max(), params)
    assert float(loss2) < float(loss)


def test_normalisation_gradient_finite_at_dead_pixels():
    # All-zero features (every ReLU dead at a pixel) must not give NaN grads:
    # a plain sqrt would, and one NaN poisons the whole VQ-GAN update.
    f = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0].set(jnp.arange(8.0))
    g = jax.grad(lambda t: jnp.sum(jnp.square(_unit_normalise(t) - 0.1)))(f)
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(_unit_normalise(f))[0, 1, 1], 0.0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(_unit_normalise(f))[0, 0, 0]), 1.0, rtol=1e-6)


def test_rejects_pickle_paths(tmp_path):
    p = tmp_path / "vgg.pth"
    p.write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors") as e:
        load_lpips(str(p))
    assert "save_file" in str(e.value)  # shows how to convert


def test_missing_and_misshaped_keys(ref, tmp_path):
    missing = {k: v for k, v in ref["lin_state"].items() if k != "features.28.weight"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"features\.28\.weight") as e:
        load_lpips(str(tmp_path / "missing.safetensors"))
    assert "missing.safetensors" in str(e.value)

    bad = dict(ref["lin_state"])
    bad["features.10.weight"] = torch.zeros(256, 64, 3, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"features\.10\.weight.*\(256, 64, 3, 3\)"):
        load_lpips(str(tmp_path / "bad.safetensors"))

    partial = {k: v for k, v in ref["lin_state"].items() if k != "lin3.model.1.weight"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight"):
        load_lpips(str(tmp_path / "partial.safetensors"))

    neg = dict(ref["lin_state"])
    neg["lin0.model.1.weight"] = -neg["lin0.model.1.weight"] - 0.1
    save_file(neg, str(tmp_path / "neg.safetensors"))
    with pytest.raises(ValueError, match=r"lin0\.model\.1\.weight.*negative"):
        load_lpips(str(tmp_path / "neg.safetensors"))


def test_rejects_small_or_mismatched_images(lp):
    module, params, _, _ = lp
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="8x8"):
        perceptual_loss(module, params, x, x)
    with pytest.raises(ValueError, match="same shape"):
        perceptual_loss(module, params, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="RGB"):
        perceptual_loss(module, params, jnp.zeros((1, 16, 16, 1)), jnp.zeros((1, 16, 16, 1)))
