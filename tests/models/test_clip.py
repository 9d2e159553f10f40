"""Our Flax CLIP against transformers' PyTorch CLIPModel with the same random
weights, imported through `cm3leon convert clip` (safetensors -> model dir ->
load_clip); the caption tokenizer against transformers' CLIPTokenizer; the
retrieval key by hand."""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cm3leon_jax import cli
from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
from cm3leon_jax.models.clip import (CLIP, CLIPConfig, document_key, l2_normalize, preprocess_images, tiny_config,
                                     vit_b32_config)
from cm3leon_jax.models.clip_convert import convert_to_model_dir, load_clip, load_hf_clip


def hf_config(cfg: CLIPConfig, **text_overrides):
    """transformers' CLIPConfig with our config's sizes."""
    from transformers import CLIPConfig as HFCLIPConfig

    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden_size,
                intermediate_size=cfg.text_intermediate_size, num_hidden_layers=cfg.text_num_layers,
                num_attention_heads=cfg.text_num_heads, max_position_embeddings=cfg.max_position_embeddings,
                bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                hidden_act=cfg.hidden_act, projection_dim=cfg.projection_dim)
    text.update(text_overrides)
    vision = dict(hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
                  num_hidden_layers=cfg.vision_num_layers, num_attention_heads=cfg.vision_num_heads,
                  image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.hidden_act,
                  projection_dim=cfg.projection_dim)
    return HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)


def random_torch_clip(hc, std: float, seed: int = 0):
    """CLIPModel with every weight redrawn (the default init leaves LayerNorms
    at 1/0 and biases at 0, which would hide a swapped scale/bias)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    # Built on the meta device: transformers' own init (seconds at ViT-B/32
    # size) would be overwritten anyway.
    with torch.device("meta"):
        model = CLIPModel(hc)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
        buffers = dict(model.named_buffers())
        assert sorted(buffers) == ["text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"]
        for b in buffers.values():  # to_empty left them uninitialised
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return model


def save_hf(model, d, extra=None):
    os.makedirs(d, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors.update(extra or {})
    save_file(tensors, os.path.join(d, "model.safetensors"))
    model.config.save_pretrained(d)
    return str(d)


def torch_text(model, ids, mask=None):
    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long),
                                      attention_mask=None if mask is None else torch.tensor(mask))
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


def torch_image(model, pixels_nhwc):
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.tensor(pixels_nhwc.transpose(0, 3, 1, 2)))
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


@functools.lru_cache(maxsize=None)
def _jitted(cfg: CLIPConfig, method: str):
    # one XLA program per call instead of op-by-op dispatch (much faster on CPU)
    return jax.jit(lambda params, *args: CLIP(cfg).apply({"params": params}, *args, method=method))


def ours_text(cfg, params, ids, mask=None):
    args = (jnp.asarray(ids),) if mask is None else (jnp.asarray(ids), jnp.asarray(mask))
    return np.asarray(_jitted(cfg, "encode_text")(params, *args))


def ours_image(cfg, params, pixels):
    return np.asarray(_jitted(cfg, "encode_image")(params, jnp.asarray(pixels)))


# A tiny BPE in OpenAI CLIP's format: byte-level characters, "</w>" ends a
# word, BOS/EOS last (as in OpenAI's vocabulary); 19 ids.
_CHARS = list("acdgot")
_VOCAB = [*_CHARS, *[c + "</w>" for c in _CHARS], "ca", "cat</w>", "do", "dog</w>", "to",
          "<|startoftext|>", "<|endoftext|>"]
_MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "t o"]
TINY = tiny_config(vocab_size=len(_VOCAB), bos_token_id=len(_VOCAB) - 2, eos_token_id=len(_VOCAB) - 1,
                   pad_token_id=len(_VOCAB) - 1)


def write_hf_tokenizer(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(_VOCAB)}, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(torch model, HF dir with tokenizer files, converted model dir)."""
    base = tmp_path_factory.mktemp("clip_tiny")
    model = random_torch_clip(hf_config(TINY), std=0.15)
    src = save_hf(model, base / "hf")
    write_hf_tokenizer(src)
    out = str(base / "ours")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["convert", "clip", f"--input={src}", f"--out={out}"]) == 0
    report = json.loads(printed.getvalue().strip().splitlines()[-1])  # one JSON line
    assert report["tensors_used"] == len(model.state_dict()) and report["projection_dim"] == 64
    assert report["tokenizer_files"] == ["vocab.json", "merges.txt"]
    return model, src, out


def test_tiny_matches_transformers_through_cli(tiny):
    model, src, out = tiny
    cfg, params = load_clip(out)
    assert cfg == TINY
    assert sorted(os.listdir(os.path.join(out, "tokenizer"))) == ["merges.txt", "vocab.json"]
    eos, bos = TINY.eos_token_id, TINY.bos_token_id
    # different lengths, right padding (with EOS as OpenAI's tokenizer pads),
    # left padding, a full row, a row whose largest id is not its EOS
    ids = np.array([[bos, 3, 5, eos] + [eos] * 12,
                    [bos, 7, eos] + [1] * 13,
                    [1] * 10 + [bos, 4, 2, 9, 8, eos],
                    [bos, *range(14), eos],
                    [bos, 1, eos - 2, 0, eos] + [eos] * 11])
    mask = np.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 3:] = 0
    mask[2, :10] = 0
    mask[4, 5:] = 0
    want = torch_text(model, ids, mask)
    got = ours_text(cfg, params, ids, mask)
    assert np.abs(want).std() > 0.05
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # shorter than max_position_embeddings, no mask
    np.testing.assert_allclose(ours_text(cfg, params, ids[:2, :6]), torch_text(model, ids[:2, :6]),
                               atol=1e-4, rtol=0)
    pixels = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    want_i = torch_image(model, pixels)
    assert np.abs(want_i).std() > 0.05
    np.testing.assert_allclose(ours_image(cfg, params, pixels), want_i, atol=1e-4, rtol=0)
    # __call__ and logit_scale
    t, i, scale = _jitted(cfg, "__call__")(params, jnp.asarray(ids), jnp.asarray(pixels[:1].repeat(5, 0)),
                                          jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(t), want, atol=1e-4, rtol=0)
    assert i.shape == (5, cfg.projection_dim)
    assert float(scale) == pytest.approx(model.logit_scale.item())


@pytest.mark.parametrize("eos", [2, 9])
def test_pooling_rule_legacy_argmax_and_first_eos_like_transformers(tiny, tmp_path, eos):
    """Configs saved before transformers PR #24773 say eos_token_id=2 and pool
    at argmax(ids); others pool at the first EOS. On these rows the two rules
    pick different positions, for EOS 2 as for EOS 9 (not the largest id)."""
    from transformers import CLIPModel

    model, src, _ = tiny
    other = CLIPModel(hf_config(TINY, eos_token_id=eos)).eval()
    other.load_state_dict(model.state_dict())
    d = save_hf(other, tmp_path / f"eos{eos}")
    cfg, params, _ = load_hf_clip(d)
    assert cfg.legacy_argmax_pooling == (eos == 2)
    ids = np.array([[TINY.bos_token_id, 3, 2, 5, 9, 1],
                    [TINY.bos_token_id, 4, TINY.eos_token_id, 9, 2, 2]])
    assert (np.argmax(ids, -1) != np.argmax(ids == eos, -1)).all()
    want = torch_text(other, ids)
    np.testing.assert_allclose(ours_text(cfg, params, ids), want, atol=1e-4, rtol=0)


def test_vit_b32_shapes_match_transformers(tmp_path):
    cfg = vit_b32_config()
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.text_hidden_size, cfg.text_num_layers,
            cfg.text_num_heads, cfg.image_size, cfg.patch_size, cfg.vision_hidden_size, cfg.vision_num_layers,
            cfg.vision_num_heads, cfg.projection_dim) == (49408, 77, 512, 12, 8, 224, 32, 768, 12, 12, 512)
    model = random_torch_clip(hf_config(cfg), std=0.02)
    src = save_hf(model, tmp_path / "hf")
    out = str(tmp_path / "ours")
    assert cli.main(["convert", "clip", f"--input={src}", f"--out={out}"]) == 0
    got_cfg, params = load_clip(out)
    assert got_cfg == cfg
    ids = np.full((2, 77), cfg.eos_token_id)
    ids[0, :5] = [cfg.bos_token_id, 320, 1125, 539, cfg.eos_token_id]  # "a photo of"
    ids[1, :3] = [cfg.bos_token_id, 49000, cfg.eos_token_id]
    mask = (np.arange(77)[None] < np.array([[5], [3]])).astype(np.int64)
    want = torch_text(model, ids, mask)
    assert np.abs(want).std() > 0.05
    np.testing.assert_allclose(ours_text(cfg, params, ids, mask), want, atol=1e-4, rtol=0)
    pixels = np.random.default_rng(1).normal(size=(1, 224, 224, 3)).astype(np.float32)
    want_i = torch_image(model, pixels)
    assert np.abs(want_i).std() > 0.05
    np.testing.assert_allclose(ours_image(cfg, params, pixels), want_i, atol=1e-4, rtol=0)
    shutil.rmtree(tmp_path)  # 2 x 600 MB that pytest would otherwise keep around


# -- tokenizer -------------------------------------------------------------------------

def test_hf_tokenizer_ids_truncation_padding_and_end_to_end(tiny):
    from transformers import CLIPTokenizer

    model, src, out = tiny
    tok = CLIPTextTokenizer.from_model_dir(out)
    v = {t: i for i, t in enumerate(_VOCAB)}
    bos, eos = v["<|startoftext|>"], v["<|endoftext|>"]
    assert tok.max_length == 16 and (tok.bos_id, tok.eos_id, tok.pad_id) == (bos, eos, eos)
    captions = ["a cat", "Dog  DOG", "", "a cat " * 20]
    ids, mask = tok(captions)
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (4, 16)
    assert ids[0, :5].tolist() == [bos, v["a</w>"], v["cat</w>"], eos, eos]
    assert ids[1, :4].tolist() == [bos, v["dog</w>"], v["dog</w>"], eos]  # lowercased, whitespace folded
    assert ids[2, :3].tolist() == [bos, eos, eos] and mask[2].sum() == 2  # empty caption: BOS, EOS
    assert mask[3].sum() == 16 and ids[3, -1] == eos and ids[3, 0] == bos  # truncated, EOS kept last
    assert mask[:2].sum(1).tolist() == [4, 4]
    # the same as transformers' own truncation and padding
    ref = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"), local_files_only=True)(
        captions, padding="max_length", truncation=True, max_length=16)
    np.testing.assert_array_equal(ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(mask, np.array(ref["attention_mask"]))
    # tokenizer -> our model == tokenizer -> transformers
    cfg, params = load_clip(out)
    np.testing.assert_allclose(ours_text(cfg, params, ids, mask), torch_text(model, ids, mask),
                               atol=1e-4, rtol=0)


def test_fallback_to_project_bpe(tmp_path):
    from cm3leon_jax.data import tokenizers as tok_lib
    from cm3leon_jax.data.bpe_training import train_text_tokenizer

    (tmp_path / "corpus.txt").write_text("\n".join(["a cat sits on the mat", "two dogs run at night",
                                                    "a photo of a red barn"] * 20) + "\n")
    bpe_dir = train_text_tokenizer([str(tmp_path / "corpus.txt")], 280, str(tmp_path / "bpe"))
    with pytest.raises(ValueError, match="text_tokenizer"):
        CLIPTextTokenizer.from_model_dir(str(tmp_path), max_length=8)
    tok = CLIPTextTokenizer.from_model_dir(str(tmp_path), text_tokenizer=bpe_dir, max_length=8)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (282, 280, 281, 281)
    bpe = tok_lib.TextTokenizer(bpe_dir, tok.bpe.vocabulary)
    ids, mask = tok(["a cat", "", "a photo of a red barn at night " * 3])
    content = bpe.encode("a cat") - bpe.vocabulary.text_start
    n = len(content)
    assert 0 < n < 5 and bpe.decode(content + bpe.vocabulary.text_start) == "a cat"
    assert ids[0, :n + 2].tolist() == [280, *content.tolist(), 281] and mask[0].sum() == n + 2
    assert (ids[0, n + 2:] == 281).all() and (mask[0, n + 2:] == 0).all()
    assert ids[1, :2].tolist() == [280, 281] and mask[1].sum() == 2
    assert mask[2].sum() == 8 and ids[2, -1] == 281 and (ids[2, 1:-1] < 280).all()
    # a model built for these ids reads them
    cfg = tiny_config(**tok.config_overrides())
    tok.check_config(cfg)
    with pytest.raises(ValueError, match="pools"):
        tok.check_config(tiny_config(vocab_size=400, max_position_embeddings=8, bos_token_id=398,
                                     eos_token_id=399))


# -- bad inputs --------------------------------------------------------------------------

def test_rejects_pickles_missing_and_misshaped(tiny, tmp_path):
    model, src, _ = tiny
    pick = tmp_path / "pickled"
    pick.mkdir()
    torch.save({"logit_scale": torch.zeros(())}, pick / "pytorch_model.bin")
    model.config.save_pretrained(str(pick))
    with pytest.raises(ValueError, match=r"safetensors is required.*|pytorch_model\.bin"):
        load_hf_clip(str(pick))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}

    def write(name, tensors):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        model.config.save_pretrained(str(d))
        return str(d)

    missing = dict(state)
    del missing["text_model.encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"missing.*text_model\.encoder\.layers\.1\.mlp\.fc1\.weight"):
        convert_to_model_dir(write("missing", missing), str(tmp_path / "out1"))
    wrong = dict(state)
    wrong["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(64, 3, 4, 4)
    with pytest.raises(ValueError, match=r"patch_embedding\.weight .*model\.safetensors.*\(64, 3, 4, 4\), "
                                         r"expected \(64, 3, 8, 8\)"):
        convert_to_model_dir(write("wrong", wrong), str(tmp_path / "out2"))
    extra = dict(state, **{"text_model.pooler.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected.*text_model\.pooler\.weight"):
        load_hf_clip(write("extra", extra))
    # position_ids buffers (older checkpoints persist them) are ignored; a single file works
    with_ids = dict(state, **{"text_model.embeddings.position_ids": torch.arange(16)[None]})
    d = write("with_ids", with_ids)
    cfg, params, report = load_hf_clip(os.path.join(d, "model.safetensors"))
    assert report["ignored"] == ["text_model.embeddings.position_ids"] and cfg == TINY


def test_encode_image_and_text_reject_bad_shapes(tiny):
    _, _, out = tiny
    cfg, params = load_clip(out)
    with pytest.raises(ValueError, match=r"\[batch, 64, 64, 3\], got shape \(1, 32, 32, 3\)"):
        ours_image(cfg, params, np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="NCHW"):
        ours_image(cfg, params, np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours_text(cfg, params, np.zeros((1, 17), np.int32))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        tiny_config(image_size=60)


# -- keys and preprocessing ------------------------------------------------------------

def test_document_key_by_hand():
    t, i = np.array([3.0, 4.0]), np.array([0.0, 2.0])
    # normalised: (0.6, 0.8) and (0, 1); the paper's key is their mean, not re-normalised
    np.testing.assert_allclose(document_key(t, i), [0.3, 0.9], atol=1e-7)
    np.testing.assert_allclose(document_key(text_emb=t), [0.6, 0.8], atol=1e-7)
    np.testing.assert_allclose(document_key(image_emb=i), [0.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(document_key(np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [-1.0, 0.0]])),
                               [[0.3, 0.9], [0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(l2_normalize(np.zeros(2)), [0.0, 0.0])
    with pytest.raises(ValueError, match="both are None"):
        document_key()


def test_preprocess_images_matches_transformers_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    for shape in ((50, 91, 3), (123, 64, 3), (64, 64, 3)):
        img = rng.integers(0, 256, shape).astype(np.uint8)
        got = preprocess_images(img, TINY)
        want = proc([img], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        assert got.dtype == np.float32 and got.shape == (1, 64, 64, 3)
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images(np.zeros((1, 8, 8, 3), np.float32), TINY)
