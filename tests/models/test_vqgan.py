"""VQGAN against transformers' PyTorch JanusVQVAE with the same random
weights, imported through the safetensors converter."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cm3leon_jax.models.vqgan import VQGAN, VQGANConfig, nearest_codes, small_config
from cm3leon_jax import cli
from cm3leon_jax.models.vqgan_convert import load_hf_vqgan
from cm3leon_jax.models.vqgan_dir import load_vqgan


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    from transformers.models.janus.configuration_janus import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    torch.manual_seed(0)
    hc = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, num_patches=4)
    model = JanusVQVAE(hc).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    d = tmp_path_factory.mktemp("janus")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    hc.save_pretrained(str(d))
    return model, str(d)


def test_encoder_codes_and_decoder_pixels_match_janus(janus, tmp_path, capsys):
    torch_model, ckpt = janus
    # through the CLI: safetensors -> our model dir -> load
    assert cli.main(["convert", "vqgan", f"--input={ckpt}", f"--out={tmp_path / 'vq'}"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["skipped"] == 0 and report["codes_per_image"] == 16
    cfg, params = load_vqgan(str(tmp_path / "vq"))
    assert cfg.resolution == 32 and cfg.latent_size == 4 and cfg.l2_normalize_codes_on_decode
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = torch_model.encode(x)
        codes_ref = out.image_tokens.view(4, -1).numpy()
        pixels_ref = torch_model.decode(out.image_tokens.view(4, -1)).numpy()
    ours = VQGAN(cfg)
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    # the converted tree has exactly the structure our module creates
    init = ours.init(jax.random.PRNGKey(0), xj)["params"]
    assert jax.tree.structure(init) == jax.tree.structure(params)
    codes = np.asarray(ours.apply({"params": params}, xj, method=VQGAN.encode))
    assert (codes == codes_ref).mean() >= 0.999
    assert len(np.unique(codes_ref)) > 3  # a non-degenerate comparison
    pixels = np.asarray(ours.apply({"params": params}, jnp.asarray(codes_ref), method=VQGAN.decode))
    np.testing.assert_allclose(pixels.transpose(0, 3, 1, 2), pixels_ref, atol=1e-4, rtol=0)


def test_nearest_codes_by_hand():
    codebook = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    z = jnp.array([[0.9, 0.1], [0.1, 1.2], [-0.2, 0.1]])
    assert nearest_codes(z, codebook).tolist() == [1, 2, 0]


def test_shapes_and_bad_inputs():
    cfg = small_config()
    assert cfg.latent_size == 8 and cfg.codes_per_image == 64
    paper = VQGANConfig()
    assert paper.downsample_factor == 8 and paper.codes_per_image == 1024 and paper.num_embeddings == 8192
    model = VQGAN(cfg)
    x = jnp.zeros((2, 64, 64, 3))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    codes = model.apply({"params": params}, x, method=VQGAN.encode)
    assert codes.shape == (2, 64)
    assert model.apply({"params": params}, codes, method=VQGAN.decode).shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="expects images"):
        model.apply({"params": params}, jnp.zeros((2, 32, 32, 3)), method=VQGAN.encode)
    with pytest.raises(ValueError, match="expects codes"):
        model.apply({"params": params}, codes[:, :10], method=VQGAN.decode)
    with pytest.raises(ValueError, match="num_groups"):
        VQGANConfig(base_channels=20, num_groups=32)


def test_convert_rejects_pickles_and_mismatches(tmp_path, janus):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="no .safetensors"):
        load_hf_vqgan(str(tmp_path))
    _, ckpt = janus
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    cfg["base_channels"] = 64  # config no longer describes the weights
    bad = tmp_path / "bad"
    bad.mkdir()
    json.dump(cfg, open(bad / "config.json", "w"))
    os.symlink(os.path.join(ckpt, "model.safetensors"), bad / "model.safetensors")
    from cm3leon_jax.models.vqgan_convert import convert_to_model_dir
    with pytest.raises(ValueError, match="does not match"):
        convert_to_model_dir(str(bad), str(tmp_path / "out"))


def test_l2_normalized_codes_are_cosine_nearest_and_decode_unit_vectors():
    cfg = small_config(base_channels=16, num_embeddings=32, embed_dim=4, l2_normalize_codes=True)
    model = VQGAN(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1, maxval=1)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    # a codebook with norms far from 1: cosine and Euclidean nearest codes differ
    book = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (32, 4))) * np.linspace(0.1, 5, 32)[:, None]
    params = dict(params, codebook=jnp.asarray(book))
    raw = np.asarray(model.apply({"params": params}, x, method=lambda m, im: m.quant_conv(m.encoder(im))))
    raw = raw.reshape(-1, 4)
    cosine = (raw / np.linalg.norm(raw, axis=-1, keepdims=True)) @ (book / np.linalg.norm(book, axis=-1,
                                                                                         keepdims=True)).T
    codes = np.asarray(model.apply({"params": params}, x, method=VQGAN.encode)).reshape(-1)
    np.testing.assert_array_equal(codes, cosine.argmax(-1))
    assert (codes != nearest_codes(jnp.asarray(raw), jnp.asarray(book))).any()  # the option matters
    vecs = np.asarray(model.apply({"params": params}, codes.reshape(2, -1), method=VQGAN.code_vectors))
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=-1), 1.0, rtol=1e-5)
    # training forward: the straight-through vectors are the unit code vectors too
    recon, train_codes, aux = model.apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(train_codes).reshape(-1), codes)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(aux["latents"]), axis=-1), 1.0, rtol=1e-5)


def test_patch_encoder_codes_depend_on_their_own_patch_only():
    cfg = small_config(encoder="patch", patch_encoder_width=32)
    model = VQGAN(cfg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    z = np.asarray(model.apply({"params": params}, x, method=VQGAN.latents))[0]  # [8, 8, D]
    # the latent of cell (2, 5) is the MLP of pixels [16:24, 40:48] alone, worked here by hand
    enc = params["encoder"]
    swish = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    patch = np.asarray(x)[0, 16:24, 40:48].reshape(-1)
    h = swish(patch @ np.asarray(enc["fc_in"]["kernel"]) + np.asarray(enc["fc_in"]["bias"]))
    h = swish(h @ np.asarray(enc["fc_mid"]["kernel"]) + np.asarray(enc["fc_mid"]["bias"]))
    h = h @ np.asarray(enc["fc_out"]["kernel"]) + np.asarray(enc["fc_out"]["bias"])
    q = params["quant_conv"]
    want = h @ np.asarray(q["kernel"]).reshape(q["kernel"].shape[-2:]) + np.asarray(q["bias"])
    np.testing.assert_allclose(z[2, 5], want, rtol=1e-4, atol=1e-5)
    # changing one patch changes that cell's latent and no other
    y = x.at[0, 16:24, 40:48].set(0.5)
    dz = np.abs(np.asarray(model.apply({"params": params}, y, method=VQGAN.latents))[0] - z).sum(-1)
    assert dz[2, 5] > 0 and np.count_nonzero(dz) == 1
    with pytest.raises(ValueError, match="encoder must be"):
        small_config(encoder="vit")
