"""`cm3leon convert chameleon` against transformers' PyTorch Chameleon.

A tiny random `ChameleonForConditionalGeneration` (GQA, QK-norm with random
gains and biases, random RMSNorm gains, SwiGLU, rotary; swin_norm on and off)
is saved with `save_pretrained` (safetensors), converted through the CLI,
loaded with `sampling.generate.load_model`, and our decoder's logits (fp32)
must equal transformers' (fp32, eager attention) to 1e-4 once the ids are
mapped (vocab_mapping.json). The options are also checked on the KV-cache
path (`cached_forward`, greedy sampling) and for bad inputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.models import chameleon_convert
from cm3leon_jax.models.decoder import Decoder
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax.models.decoding import init_cache, layer_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ATOL = 1e-4
NUM_CODES = 16
VOCAB = 112


def _image_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def _vocabulary_map() -> dict:
    """Chameleon-7B's layout in small: <s> <pad> </s> <unk>, image tokens
    from id 4 (shuffled, so the mapping is not the identity on them), then
    <eoss> <racm3:break>, sentinels, <image>, and text."""
    vmap = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    codes = np.random.RandomState(0).permutation(NUM_CODES)
    for slot, code in enumerate(codes):
        vmap[_image_name(int(code))] = 4 + slot
    vmap.update({"<eoss>": 20, "<racm3:break>": 21, "<image>": 30})
    for i in range(5):
        vmap[f"<sentinel:{i}>"] = 40 + i
    for i in range(VOCAB):
        if i not in vmap.values():
            vmap[f"tok{i}"] = i
    return vmap


def _make_hf(path: str, swin_norm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.ChameleonConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, swin_norm=swin_norm,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0}, bos_token_id=0, eos_token_id=2,
        vocabulary_map=_vocabulary_map(),
        vq_config=dict(embed_dim=8, num_embeddings=NUM_CODES, latent_channels=8, resolution=32, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    cfg._attn_implementation = "eager"
    model = transformers.ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norm gains start at 1 and biases at 0: make every tensor matter
        for name, p in model.named_parameters():
            if "vqmodel" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("norm.bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    assert any(f.endswith(".safetensors") for f in os.listdir(path))
    return model


def _cli(*args, timeout=180):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "cm3leon_jax.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _load(out_dir: str):
    import gin

    from cm3leon_jax.sampling import generate

    try:
        bundle = generate.load_model(out_dir)
    finally:
        gin.clear_config()  # config.gin's bindings must not leak into other tests
    return bundle


@pytest.fixture(scope="module", params=[False, True], ids=["pre_norm", "swin_norm"])
def converted(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("swin" if request.param else "pre")
    hf_dir, out = str(base / "hf"), str(base / "out")
    model = _make_hf(hf_dir, swin_norm=request.param)
    proc = _cli("convert", "chameleon", f"--hf_dir={hf_dir}", f"--out={out}", "--dtype=float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return model, out, report


def _hf_logits(model, hf_ids):
    """transformers' logits [B, T, V] over the HF vocabulary, image-token
    columns included (its forward sets those to -inf: recomputed from its
    final hidden states with its lm_head)."""
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(hf_ids), dtype=torch.long)
        out = model(input_ids=ids)
        hidden = model.model(input_ids=ids).last_hidden_state
        full = model.lm_head(hidden).numpy()
    img = model.model.vocabulary_mapping.image_tokens
    text_cols = np.setdiff1d(np.arange(VOCAB), img)
    np.testing.assert_allclose(out.logits.numpy()[..., text_cols], full[..., text_cols], atol=1e-5)
    return full


def test_report_and_mapping(converted):
    model, out, report = converted
    mapping = chameleon_convert.load_mapping(out)
    assert report["num_kv_heads"] == 2 and report["rope_theta"] == 500.0
    layout = mapping["layout"]
    assert layout == {"num_special_tokens": 9, "num_mask_tokens": 5, "image_codebook_size": NUM_CODES,
                      "text_vocab_size": VOCAB - 9 - NUM_CODES}
    ours_to_hf, hf_to_ours = np.asarray(mapping["ours_to_hf"]), np.asarray(mapping["hf_to_ours"])
    assert sorted(ours_to_hf.tolist()) == list(range(VOCAB))            # a permutation
    assert (hf_to_ours[ours_to_hf] == np.arange(VOCAB)).all()
    vmap = _vocabulary_map()
    v = vocab_lib.UnifiedVocabulary(**layout)
    assert ours_to_hf[v.pad_id] == vmap["<s>"] and ours_to_hf[v.eos_id] == vmap["</s>"]
    assert ours_to_hf[v.break_id] == vmap["<racm3:break>"] and ours_to_hf[v.infill_id] == vmap["<eoss>"]
    assert ours_to_hf[v.mask_id(3)] == vmap["<sentinel:3>"]
    # image code i sits at S + i, as transformers' own bpe2img says
    bpe2img = model.model.vocabulary_mapping.bpe2img
    for hf_id, code in bpe2img.items():
        assert hf_to_ours[hf_id] == v.image_code_to_id(code)
    # text keeps its order
    text = ours_to_hf[v.text_start:]
    assert (np.diff(text) > 0).all() and vmap["tok50"] in text.tolist()


def test_logits_equal_transformers(converted):
    model, out, _ = converted
    bundle = _load(out)
    cfg, mapping = bundle.cfg, chameleon_convert.load_mapping(out)
    assert cfg.positions == "rotary" and cfg.norm == "rmsnorm" and cfg.qk_norm and cfg.mlp_type == "gated"
    assert cfg.swin_norm == model.config.swin_norm and "position_embedding" not in bundle.params
    rng = np.random.RandomState(1)
    hf_ids = rng.randint(0, VOCAB, size=(3, 24))
    hf_ids[:, 0] = 0  # <s>
    hf_ids[0, 5:21] = rng.permutation(np.arange(4, 4 + NUM_CODES))  # an image's tokens
    want = _hf_logits(model, hf_ids)
    ours_ids = chameleon_convert.to_ours(hf_ids, mapping)
    params = jax.tree.map(jnp.asarray, bundle.params)
    got = np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(ours_ids, jnp.int32)))
    # our column j is Chameleon's id ours_to_hf[j]
    np.testing.assert_allclose(got, want[..., np.asarray(mapping["ours_to_hf"])], atol=ATOL, rtol=0)
    assert np.abs(want).max() > 1.0  # the comparison is not between near-zero numbers
    # unscanned layers: the same numbers
    import dataclasses

    cfg_u = dataclasses.replace(cfg, scan_layers=False)
    unscanned = dict({k: v for k, v in params.items() if k != "layers"},
                     **{f"layer_{i}": p for i, p in enumerate(layer_params(params, cfg))})
    got_u = np.asarray(jax.jit(Decoder(cfg_u).apply)({"params": unscanned}, jnp.asarray(ours_ids, jnp.int32)))
    np.testing.assert_allclose(got_u, got, atol=1e-5)


def test_cached_decoding_equals_full_forward(converted, prefill_then_step):
    """cached_forward (rotary at the absolute positions passed in, GQA cache
    of kv_heads) and greedy sampling match the full forward pass."""
    from cm3leon_jax.sampling import sampler

    _, out, _ = converted
    bundle = _load(out)
    cfg, vocab = bundle.cfg, bundle.vocab
    params = jax.tree.map(jnp.asarray, bundle.params)
    toks = jnp.asarray(np.random.RandomState(2).randint(1, cfg.vocab_size, (2, 12)), jnp.int32)
    full = Decoder(cfg).apply({"params": params}, toks)
    cache = init_cache(cfg, 2, 16)
    assert cache[0]["key"].shape == (2, cfg.kv_heads, 16, cfg.head_dim) and cfg.kv_heads == 2
    np.testing.assert_allclose(np.asarray(prefill_then_step(params, cfg, toks, 7, 16)), np.asarray(full), atol=1e-5)

    prompts = [[30, 70, 80, vocab.break_id, 90], [100, 101, vocab.break_id, 65, 66, 67, 68, 69]]
    padded, starts = sampler.left_pad(prompts)
    n = 6
    got, _ = sampler.generate(params, jnp.asarray(padded), jnp.asarray(starts), jax.random.PRNGKey(0), cfg=cfg,
                              max_new_tokens=n, settings=sampler.SamplingSettings("greedy"),
                              constraint=sampler.Constraint("text", allow_eos=False), vocab=vocab)
    # the full forward re-run at each step, on a fixed-length buffer (causal:
    # the unfilled tail does not change earlier logits; one compilation)
    model = jax.jit(Decoder(cfg).apply)
    for row, prompt in enumerate(prompts):
        seq = [sampler.BOS_ID] + prompt
        for _ in range(n):
            buf = np.zeros((1, 16), np.int32)
            buf[0, :len(seq)] = seq
            lg = np.array(model({"params": params}, jnp.asarray(buf))[0, len(seq) - 1])
            lg[vocab.pad_id] = lg[vocab.eos_id] = -np.inf
            lg[vocab.image_start:vocab.text_start] = -np.inf
            seq.append(int(np.argmax(lg)))
        assert np.asarray(got[row]).tolist() == seq[len(prompt) + 1:]


def test_decoder_options_validate():
    with pytest.raises(ValueError, match="norm="):
        DecoderConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="positions="):
        DecoderConfig(positions="alibi")


def test_param_counts_and_flops_follow_the_options():
    base = dict(vocab_size=1000, num_layers=3, d_model=64, num_heads=8, d_ff=96, max_length=32, dtype="float32")
    cfg = DecoderConfig(**base, norm="rmsnorm", positions="rotary", qk_norm=True, mlp_type="gated",
                        activation="silu", num_kv_heads=2)
    params = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    import flax.linen as nn

    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)["params"])
    total = sum(int(np.prod(x.shape)) for _, x in leaves)
    c = cfg.param_counts()
    assert c["total"] == total and c["position_embedding"] == 0
    k = 64 // 8
    matmul = 3 * (2 * 64 * 64 + 2 * 64 * 2 * k + 3 * 64 * 96)
    assert c["layer_matmul"] == matmul
    assert c["non_embedding"] == matmul + c["norm"]
    assert c["norm"] == 3 * (2 * 64 + 2 * (8 + 2) * k) + 64
    assert cfg.train_flops_per_token(16) == 6.0 * (matmul + 1000 * 64) + 12 * 3 * 16 * 64
    # every new parameter has logical axes (sharding rules apply to it)
    specs = nn.get_partition_spec(params)["params"]
    for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: hasattr(x, "index")):
        assert spec is not None and len(spec) >= 1, jax.tree_util.keystr(path)


def test_chameleon_options_train_with_remat_and_no_scan():
    """Gradients of the Chameleon-style decoder agree between scan + remat
    (save_qkv_proj: the names sit on q/k after QK-norm and rotary) and an
    unrolled stack without remat."""
    import dataclasses

    import flax.linen as nn

    base = DecoderConfig(vocab_size=50, num_layers=2, d_model=32, num_heads=4, d_ff=48, max_length=16,
                         dtype="float32", norm="rmsnorm", positions="rotary", qk_norm=True, mlp_type="gated",
                         activation="silu", num_kv_heads=2, swin_norm=True, remat_policy="save_qkv_proj")
    toks = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 8)), jnp.int32)
    params = nn.meta.unbox(jax.jit(Decoder(base).init)(jax.random.PRNGKey(0), toks)["params"])
    params["output_projection"] = jax.random.normal(jax.random.PRNGKey(1), params["output_projection"].shape)

    def loss(cfg, p):
        return jnp.mean(jax.nn.log_softmax(Decoder(cfg).apply({"params": p}, toks))[..., 0])

    g_scan = jax.jit(jax.grad(lambda p: loss(base, p)))(params)
    flat = dataclasses.replace(base, scan_layers=False, remat_policy="none")
    unrolled = dict({k: v for k, v in params.items() if k != "layers"},
                    **{f"layer_{i}": p for i, p in enumerate(layer_params(params, base))})
    g_flat = jax.jit(jax.grad(lambda p: loss(flat, p)))(unrolled)
    for i in range(2):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), atol=1e-5),
                     g_scan["layers"], g_flat[f"layer_{i}"])


# ---------------------------------------------------------------------------- bad input
def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for n in needles:
        assert n in last, last


def test_bad_inputs_give_one_line_errors(tmp_path):
    # missing dir
    _one_line_error(_cli("convert", "chameleon", f"--hf_dir={tmp_path / 'nope'}", f"--out={tmp_path / 'o1'}"),
                    "does not exist")
    # no safetensors (a pickle is never read)
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    (pk / "config.json").write_text("{}")
    _one_line_error(_cli("convert", "chameleon", f"--hf_dir={pk}", f"--out={tmp_path / 'o2'}"),
                    "no .safetensors", "pytorch_model.bin")


def test_unsupported_config_fields_are_named(tmp_path):
    hf_dir = tmp_path / "hf"
    _make_hf(str(hf_dir))
    cfg_path = hf_dir / "config.json"
    original = json.loads(cfg_path.read_text())
    for field, value, needle in (("attention_bias", True, "attention_bias"),
                                 ("hidden_act", "gelu", "hidden_act"),
                                 ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                                  "rope_type"),
                                 ("num_key_value_heads", 3, "num_key_value_heads"),
                                 ("vocabulary_map", None, "vocabulary_map")):
        cfg_path.write_text(json.dumps(dict(original, **{field: value})))
        # in-process first (fast), then one of them through the CLI
        with pytest.raises(chameleon_convert.ConversionError, match=needle):
            chameleon_convert.convert_to_model_dir(str(hf_dir), str(tmp_path / "o"))
    cfg_path.write_text(json.dumps(dict(original, attention_bias=True)))
    _one_line_error(_cli("convert", "chameleon", f"--hf_dir={hf_dir}", f"--out={tmp_path / 'o3'}"),
                    "attention_bias")
    assert not (tmp_path / "o3").exists()
