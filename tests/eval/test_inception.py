"""The FID InceptionV3 (eval/inception.py) against an independent PyTorch
build of the same network (torchvision's Inception3 trunk with pytorch-fid's
FID blocks, written out here), with the same random weights saved as a torch
state dict in the pytorch-fid file's key layout."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn, F = torch.nn, torch.nn.functional


class TConv(tnn.Module):
    def __init__(self, i, o, **kw):
        super().__init__()
        self.conv = tnn.Conv2d(i, o, bias=False, **kw)
        self.bn = tnn.BatchNorm2d(o, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class TA(tnn.Module):
    def __init__(self, i, pool_features):
        super().__init__()
        self.branch1x1 = TConv(i, 64, kernel_size=1)
        self.branch5x5_1 = TConv(i, 48, kernel_size=1)
        self.branch5x5_2 = TConv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = TConv(i, 64, kernel_size=1)
        self.branch3x3dbl_2 = TConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = TConv(i, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg(x))], 1)


class TB(tnn.Module):
    def __init__(self, i):
        super().__init__()
        self.branch3x3 = TConv(i, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = TConv(i, 64, kernel_size=1)
        self.branch3x3dbl_2 = TConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = TConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), bd, F.max_pool2d(x, 3, stride=2)], 1)


class TC(tnn.Module):
    def __init__(self, i, c):
        super().__init__()
        self.branch1x1 = TConv(i, 192, kernel_size=1)
        self.branch7x7_1 = TConv(i, c, kernel_size=1)
        self.branch7x7_2 = TConv(c, c, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = TConv(c, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = TConv(i, c, kernel_size=1)
        self.branch7x7dbl_2 = TConv(c, c, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = TConv(c, c, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = TConv(c, c, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = TConv(c, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = TConv(i, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for k in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{k}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class TD(tnn.Module):
    def __init__(self, i):
        super().__init__()
        self.branch3x3_1 = TConv(i, 192, kernel_size=1)
        self.branch3x3_2 = TConv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = TConv(i, 192, kernel_size=1)
        self.branch7x7x3_2 = TConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = TConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = TConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = x
        for k in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{k}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class TE(tnn.Module):
    def __init__(self, i, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = TConv(i, 320, kernel_size=1)
        self.branch3x3_1 = TConv(i, 384, kernel_size=1)
        self.branch3x3_2a = TConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = TConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = TConv(i, 448, kernel_size=1)
        self.branch3x3dbl_2 = TConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = TConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = TConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = TConv(i, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(tnn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = TConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = TConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = TConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = TConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = TConv(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = TA(192, 32), TA(256, 64), TA(288, 64)
        self.Mixed_6a = TB(288)
        self.Mixed_6b, self.Mixed_6c = TC(768, 128), TC(768, 160)
        self.Mixed_6d, self.Mixed_6e = TC(768, 160), TC(768, 192)
        self.Mixed_7a = TD(768)
        self.Mixed_7b, self.Mixed_7c = TE(1280, False), TE(2048, True)
        self.fc = tnn.Linear(2048, 1008)  # in the real file; unused for pool3

    def forward(self, images_uint8):
        x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def _random_model(images):
    torch.manual_seed(0)
    model = TorchFIDInception()
    # BatchNorm running statistics from a batch (momentum 1), then random
    # affine terms: every layer sees well-scaled inputs, and the statistics
    # are not the trivial (0, 1)
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(images)
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.slow
def test_features_match_the_pytorch_build_with_the_same_weights(tmp_path):
    from cm3leon_jax.data import shapes
    from cm3leon_jax.eval import inception

    rng = np.random.default_rng(0)
    images = np.stack([e.image for e in shapes.generate(seed=3, num=3)]
                      + [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)])
    big = rng.integers(0, 256, (2, 320, 320, 3), dtype=np.uint8)  # downsampled to 299
    model = _random_model(np.concatenate([images, np.stack([e.image for e in shapes.generate(seed=4, num=4)])]))
    path = tmp_path / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)

    feats = inception.InceptionFeatures(str(path), batch_size=4)
    with torch.no_grad():
        want = model(images).numpy()
        want_big = model(big).numpy()
    got = feats(images)
    assert got.shape == (4, inception.FEATURE_DIM)
    assert float(np.std(want)) > 1e-3  # not a degenerate (all-zero) network
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
    np.testing.assert_allclose(feats(big), want_big, rtol=1e-3, atol=1e-3 * float(np.abs(want_big).max()))


def test_bad_weight_files_are_named(tmp_path):
    from cm3leon_jax.eval import inception

    with pytest.raises(ValueError, match="does not exist"):
        inception.load_torch_weights(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        inception.load_torch_weights(str(tmp_path / "junk.pth"))
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(KeyError, match="Conv2d_1a_3x3.bn"):
        inception.load_torch_weights(str(tmp_path / "partial.pth"))
