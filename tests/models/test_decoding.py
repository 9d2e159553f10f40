"""Decoding with the KV cache (models/decoder.py `cached_forward`,
sampling/sampler.py `generate`) against the full forward pass re-run at every
step, and the modality constraint."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.models.decoder import Decoder
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax.models.decoding import cached_forward, init_cache
from cm3leon_jax.sampling import sampler

VOCAB = vocab_lib.UnifiedVocabulary(num_special_tokens=64, num_mask_tokens=32, image_codebook_size=64,
                                    text_vocab_size=128)


def _model(scan_layers=True, seed=0, **overrides):
    cfg = DecoderConfig(vocab_size=VOCAB.size, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=64,
                        dtype="float32", param_dtype="float32", scan_layers=scan_layers, **overrides)
    params = Decoder(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda a: a, __import__("flax").linen.meta.unbox(params))
    # the output projection is zero-initialised: give it weights so logits differ
    w = jax.random.normal(jax.random.PRNGKey(seed + 1), params["output_projection"].shape) * 0.5
    return cfg, dict(params, output_projection=w)


def _full_greedy(cfg, params, prompt, n):
    # As in training: the decoder input is the sequence shifted right behind a
    # 0 (SeqIO's autoregressive inputs), so the prompt's first token is at
    # position 1.
    seq = [0] + list(prompt)
    model = Decoder(cfg)
    for _ in range(n):
        logits = model.apply({"params": params}, jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, -1])))
    return seq[len(prompt) + 1:]


def _smeared(scan_layers=True, seed=0):
    """A model with smeared keys whose gates differ per head and layer (init:
    all 0), and queries and keys large enough that attention is not uniform
    (at init std 0.006 it is, and no key matters)."""
    cfg, params = _model(scan_layers, seed, smeared_keys=True)
    for name in (["layers"] if scan_layers else [f"layer_{i}" for i in range(cfg.num_layers)]):
        att = dict(params[name]["attention"])
        att["key_smear"] = jnp.linspace(-2.0, 2.0, att["key_smear"].size).reshape(att["key_smear"].shape)
        att["query"], att["key"] = att["query"] * 50, att["key"] * 50
        params[name] = dict(params[name], attention=att)
    return cfg, params


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("smeared", [False, True])
def test_cached_forward_equals_the_full_pass(scan_layers, smeared, prefill_then_step):
    cfg, params = _smeared(scan_layers) if smeared else _model(scan_layers)
    toks = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 4, VOCAB.size)
    full = Decoder(cfg).apply({"params": params}, toks)
    cache = init_cache(cfg, 2, 16)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    got, cache = cached_forward(params, cfg, toks, pos, jnp.zeros(2, jnp.int32), cache, 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-5)
    # prefill 8 then 4 one at a time: the same logits
    np.testing.assert_allclose(np.asarray(prefill_then_step(params, cfg, toks, 8, 16)), np.asarray(full), atol=1e-5)


@pytest.mark.parametrize("smeared", [False, True])
def test_greedy_with_cache_equals_greedy_by_full_recompute(smeared):
    cfg, params = _smeared() if smeared else _model()
    prompts = [[10, 70, 80, 2, 90], [100, 101, 2, 65, 66, 67, 68, 69]]  # different lengths: left padding
    padded, starts = sampler.left_pad(prompts)
    out, lengths = sampler.generate(params, jnp.asarray(padded), jnp.asarray(starts), jax.random.PRNGKey(0),
                                    cfg=cfg, max_new_tokens=10, settings=sampler.SamplingSettings("greedy"),
                                    vocab=VOCAB)
    for row, prompt in enumerate(prompts):
        want = _full_greedy(cfg, params, prompt, 10)
        got = np.asarray(out[row]).tolist()
        n = int(lengths[row])
        assert got[:n] == want[:n]
        if n < 10:  # stopped at <eos>: padding after it
            assert got[n - 1] == VOCAB.eos_id and all(t == VOCAB.pad_id for t in got[n:])


ROWS_COLS = dict(image_positions="rows_cols", image_grid=3, image_id_range=(VOCAB.image_start, VOCAB.text_start),
                 position_init_std=0.5)  # big enough that a wrong cell changes the greedy picks


def test_image_cells_count_each_run_of_codes_from_zero_by_hand():
    from cm3leon_jax.models.image_positions import image_cells

    cfg, _ = _model(**ROWS_COLS)
    i, t = VOCAB.image_start, VOCAB.text_start  # an image code, a text id
    toks = jnp.asarray([[0, t, 2, i, i, i, i, 1, i, i, t, i] + [i] * 9])
    is_image, cell = image_cells(toks, cfg)
    assert np.asarray(is_image[0]).astype(int).tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0] + [1] * 10
    # runs restart at every non-image token; a run longer than 3 x 3 wraps to cell 0
    assert np.asarray(cell[0]).tolist() == [0, 0, 0, 0, 1, 2, 3, 0, 0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0]


def test_rows_cols_positions_cached_greedy_equals_full_recompute():
    cfg, params = _model(**ROWS_COLS)
    im = VOCAB.image_start
    # the second prompt ends inside an image: its first generated code continues that run
    prompts = [[VOCAB.text_start + 5, VOCAB.text_start + 9, 2], [VOCAB.text_start + 1, 2, im + 3, im + 7]]
    padded, starts = sampler.left_pad(prompts)
    out, _ = sampler.generate(params, jnp.asarray(padded), jnp.asarray(starts), jax.random.PRNGKey(0),
                              cfg=cfg, max_new_tokens=12, settings=sampler.SamplingSettings("greedy"),
                              constraint=sampler.Constraint("image", image_tokens=11), vocab=VOCAB)
    for row, prompt in enumerate(prompts):
        # the full pass with the image constraint: argmax over image codes, then <eos>
        seq, model = [0] + list(prompt), Decoder(cfg)
        for k in range(12):
            logits = np.asarray(model.apply({"params": params}, jnp.asarray([seq], jnp.int32))[0, -1])
            seq.append(int(np.argmax(logits[im:VOCAB.text_start]) + im) if k < 11 else VOCAB.eos_id)
        assert np.asarray(out[row]).tolist() == seq[len(prompt) + 1:]
    # and the embedding matters: without it the picks differ
    plain = dict(params)
    plain.pop("image_row_embedding"), plain.pop("image_col_embedding")
    cfg0 = DecoderConfig(**{**cfg.__dict__, "image_positions": "none"})
    out0, _ = sampler.generate(plain, jnp.asarray(padded), jnp.asarray(starts), jax.random.PRNGKey(0),
                               cfg=cfg0, max_new_tokens=12, settings=sampler.SamplingSettings("greedy"),
                               constraint=sampler.Constraint("image", image_tokens=11), vocab=VOCAB)
    assert np.asarray(out0).tolist() != np.asarray(out).tolist()


def test_cfg_scale_one_is_the_conditional_stream():
    cfg, params = _model()
    cond, cs = sampler.left_pad([[10, 70, 80, 2]])
    unc, us = sampler.left_pad([[4, 2]], length=4)
    kw = dict(cfg=cfg, max_new_tokens=6, vocab=VOCAB)
    plain, _ = sampler.generate(params, jnp.asarray(cond), jnp.asarray(cs), jax.random.PRNGKey(0),
                                settings=sampler.SamplingSettings("greedy"), **kw)
    guided, _ = sampler.generate(params, jnp.asarray(cond), jnp.asarray(cs), jax.random.PRNGKey(0),
                                 settings=sampler.SamplingSettings("greedy", cfg_scale=1.0),
                                 uncond_prompts=jnp.asarray(unc), uncond_starts=jnp.asarray(us), **kw)
    assert np.asarray(plain).tolist() == np.asarray(guided).tolist()


@pytest.mark.parametrize("decoding", ["top_p", "cd_k", "mixed"])
def test_images_have_exactly_the_code_count_and_text_has_no_codes(decoding):
    cfg, params = _model()
    cond, cs = sampler.left_pad([[100, 101, 102, 2], [110, 2]])
    unc, us = sampler.left_pad([[4, 2], [4, 2]], length=4)
    image = sampler.Constraint("image", image_tokens=9)
    for seed in range(4):
        settings = sampler.SamplingSettings(decoding, cfg_scale=3.0, temperature=1.5)
        rows = {"cd_rows": np.array([False, True])} if decoding == "mixed" else {}
        out, lengths = sampler.generate(params, jnp.asarray(cond), jnp.asarray(cs), jax.random.PRNGKey(seed),
                                        cfg=cfg, max_new_tokens=12, settings=settings, constraint=image,
                                        vocab=VOCAB, uncond_prompts=jnp.asarray(unc),
                                        uncond_starts=jnp.asarray(us), **rows)
        out = np.asarray(out)
        assert np.asarray(lengths).tolist() == [10, 10]
        assert VOCAB.is_image(out[:, :9]).all() and (out[:, 9] == VOCAB.eos_id).all()
        assert (out[:, 10:] == VOCAB.pad_id).all()
        text, _ = sampler.generate(params, jnp.asarray(cond), jnp.asarray(cs), jax.random.PRNGKey(seed),
                                   cfg=cfg, max_new_tokens=12, settings=settings,
                                   constraint=sampler.Constraint("text"), vocab=VOCAB,
                                   uncond_prompts=jnp.asarray(unc), uncond_starts=jnp.asarray(us), **rows)
        assert not VOCAB.is_image(np.asarray(text)).any()


def test_mixed_decoding_needs_the_cd_k_rows():
    """Which row is which prompt's sample only the caller knows: "mixed"
    without cd_rows is an error naming it, not a silent even/odd split."""
    cfg, params = _model()
    cond, cs = sampler.left_pad([[100, 101, 102, 2], [110, 2]])
    unc, us = sampler.left_pad([[4, 2], [4, 2]], length=4)
    with pytest.raises(ValueError, match="cd_rows"):
        sampler.generate(params, jnp.asarray(cond), jnp.asarray(cs), jax.random.PRNGKey(0), cfg=cfg,
                         max_new_tokens=4, settings=sampler.SamplingSettings("mixed", cfg_scale=3.0),
                         vocab=VOCAB, uncond_prompts=jnp.asarray(unc), uncond_starts=jnp.asarray(us))


def test_same_seed_same_tokens():
    cfg, params = _model()
    cond, cs = sampler.left_pad([[100, 101, 102, 2]])
    run = lambda s: np.asarray(sampler.generate(  # noqa: E731
        params, jnp.asarray(cond), jnp.asarray(cs), jax.random.PRNGKey(s), cfg=cfg, max_new_tokens=8,
        settings=sampler.SamplingSettings("top_p", temperature=2.0, top_p=1.0), vocab=VOCAB)[0]).tolist()
    assert run(1) == run(1) and run(1) != run(2)


SHARDED_PROBE = r"""
import json, jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from cm3leon_jax import partitioning, vocab as vocab_lib
from cm3leon_jax.models.decoder import Decoder
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax.sampling import sampler
V = vocab_lib.UnifiedVocabulary(64, 32, 64, 128)
cfg = DecoderConfig(vocab_size=V.size, num_layers=2, d_model=32, num_heads=4, d_ff=64, max_length=64,
                    dtype="float32", param_dtype="float32")  # bf16 sums in another order can flip a near tie
params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
params["output_projection"] = jax.random.normal(jax.random.PRNGKey(1), params["output_projection"].shape)
prompts, starts = sampler.left_pad([[10, 70, 2], [100, 101, 2, 65], [90, 2], [80, 81, 82, 2, 70]])
kw = dict(cfg=cfg, max_new_tokens=8, settings=sampler.SamplingSettings("greedy"), vocab=V)
plain = np.asarray(sampler.generate(params, jnp.asarray(prompts), jnp.asarray(starts), jax.random.PRNGKey(0), **kw)[0])
mesh = partitioning.create_mesh(data=2, fsdp=2, model=2)
ps, cs = sampler.decoding_shardings(cfg, mesh)
sharded_params = jax.device_put(params, ps)
with jax.set_mesh(mesh):
    out = sampler.generate(sharded_params, jnp.asarray(prompts), jnp.asarray(starts), jax.random.PRNGKey(0),
                           cache_sharding=cs, **kw)[0]
wq = sharded_params["layers"]["attention"]["query"]
print(json.dumps({"devices": jax.device_count(), "equal": np.asarray(out).tolist() == plain.tolist(),
                  "query_shards": len({str(s.index) for s in wq.addressable_shards}),
                  "cache_spec": str(cs.spec)}))
"""


def test_sharded_decoding_over_the_training_mesh_matches_one_device():
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED_PROBE], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["equal"]
    assert out["query_shards"] > 1                       # the params really are split
    assert "model" in out["cache_spec"]                  # heads over the model axis


def test_cd_k_uses_the_raw_streams_not_the_guided_logits():
    # CD-K's expert is the conditional stream itself: the CFG scale (which
    # only shapes the top-p samples) must not change what CD-K picks
    cfg, params = _model()
    cond, cs = sampler.left_pad([[100, 101, 102, 2], [110, 2]])
    unc, us = sampler.left_pad([[4, 2], [4, 2]], length=4)
    run = lambda scale: np.asarray(sampler.generate(  # noqa: E731
        params, jnp.asarray(cond), jnp.asarray(cs), jax.random.PRNGKey(0), cfg=cfg, max_new_tokens=6,
        settings=sampler.SamplingSettings("cd_k", cfg_scale=scale), vocab=VOCAB,
        uncond_prompts=jnp.asarray(unc), uncond_starts=jnp.asarray(us))[0]).tolist()
    assert run(1.0) == run(7.0)


def test_per_row_keys_make_rows_independent_of_the_batch():
    """With one key per row, a row's samples are the same alone or batched
    with other prompts (in any order); mixed decoding follows cd_rows."""
    cfg, params = _model()
    prompts = [[100, 101, 102, 2], [70, 71, 2], [90, 2]]
    settings = sampler.SamplingSettings("mixed", temperature=2.0, top_p=1.0, cfg_scale=2.0)
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(7), i) for i in range(3)])

    def run(rows):
        cond, cs = sampler.left_pad([prompts[r] for r in rows], length=6)
        unc, us = sampler.left_pad([[VOCAB.mask_id(0), 2]] * len(rows), length=6)
        return np.asarray(sampler.generate(
            params, jnp.asarray(cond), jnp.asarray(cs), keys[np.asarray(rows)], cfg=cfg, max_new_tokens=10,
            settings=settings, vocab=VOCAB, uncond_prompts=jnp.asarray(unc), uncond_starts=jnp.asarray(us),
            cd_rows=np.array([r == 1 for r in rows]))[0])

    together = run([0, 1, 2])
    assert (run([2, 0, 1]) == together[[2, 0, 1]]).all()
    for r in range(3):
        assert (run([r]) == together[r]).all()
    assert not (together[0] == together[2]).all()


def test_smear_keys_by_hand():
    from cm3leon_jax.models.decoder_math import smear_keys

    # one row, 3 tokens, 2 heads of size 1; the third token starts a new segment
    k = jnp.asarray([[[[1.0], [10.0]], [[2.0], [20.0]], [[3.0], [30.0]]]])  # [B=1, T=3, H=2, K=1]
    gate = jnp.asarray([0.0, jnp.log(3.0)])  # sigmoid: 1/2 and 3/4
    has_prev = jnp.asarray([[False, True, False]])
    got = np.asarray(smear_keys(k, gate, has_prev, time_axis=1))[0, :, :, 0]
    want = [[0.5 * 1, 0.75 * 10],            # first of its segment: nothing mixed in
            [0.5 * 2 + 0.5 * 1, 0.75 * 20 + 0.25 * 10],
            [0.5 * 3, 0.75 * 30]]            # new segment: token 2's key is not mixed in
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the cache layout [B, H, S, K] gives the same numbers
    cached = np.asarray(smear_keys(jnp.swapaxes(k, 1, 2), gate, has_prev, time_axis=2))
    np.testing.assert_allclose(np.swapaxes(cached, 1, 2)[0, :, :, 0], want, rtol=1e-6)


def test_smeared_keys_stay_inside_a_packed_segment():
    # two documents packed in one row give the logits each gets alone
    cfg, params = _smeared(scan_layers=False)
    a = jax.random.randint(jax.random.PRNGKey(5), (1, 7), 4, VOCAB.size)
    b = jax.random.randint(jax.random.PRNGKey(6), (1, 5), 4, VOCAB.size)
    model = Decoder(cfg)
    packed = model.apply({"params": params}, jnp.concatenate([a, b], 1),
                         decoder_segment_ids=jnp.asarray([[1] * 7 + [2] * 5]),
                         decoder_positions=jnp.asarray([list(range(7)) + list(range(5))]))
    np.testing.assert_allclose(np.asarray(packed[:, 7:]), np.asarray(model.apply({"params": params}, b)), atol=1e-5)
    # and the gates matter: the same weights with them off give other logits
    plain = Decoder(DecoderConfig(**{**cfg.__dict__, "smeared_keys": False})).apply({"params": params}, b)
    assert not np.allclose(np.asarray(plain), np.asarray(model.apply({"params": params}, b)), atol=1e-3)


def _left_padded_row(seed: int, n_junk: int, n_real: int):
    """One row of `n_junk` junk slots then `n_real` real tokens: (real
    tokens, the row, its start [1], its positions counted from the start)."""
    real = jax.random.randint(jax.random.PRNGKey(seed), (1, n_real), 4, VOCAB.size)
    junk = jax.random.randint(jax.random.PRNGKey(seed + 1), (1, n_junk), 4, VOCAB.size)
    start = jnp.asarray([n_junk], jnp.int32)
    pos = jnp.maximum(jnp.arange(n_junk + n_real)[None, :] - start[:, None], 0)
    return real, jnp.concatenate([junk, real], 1), start, pos


def test_smeared_keys_never_mix_in_a_left_padding_slot():
    # row 0: 3 junk slots before its first real slot; its logits must be those
    # of its real tokens alone (positions count from the first real slot)
    cfg, params = _smeared(scan_layers=False)
    real, toks, start, pos = _left_padded_row(7, 3, 6)
    got, _ = cached_forward(params, cfg, toks, pos, start, init_cache(cfg, 1, 16), 0)
    want = Decoder(cfg).apply({"params": params}, real)
    np.testing.assert_allclose(np.asarray(got[:, 3:]), np.asarray(want), atol=1e-5)


def test_smear_gates_start_at_key_smear_init():
    for init in (0.0, 2.0):
        _, params = _model(scan_layers=False, smeared_keys=True, key_smear_init=init)
        gates = [np.asarray(params[f"layer_{i}"]["attention"]["key_smear"]) for i in range(2)]
        assert all(g.shape == (4,) and np.all(g == init) for g in gates)


def test_smeared_cache_holds_smeared_keys_and_grows_with_its_last_raw_key():
    # left-padded row: prefill into an 8-slot cache, grow it to 16 (the
    # sampler's bucket growth), then step one token at a time; each step
    # smears its own key with the raw key of the slot before, which the cache
    # keeps ("prev_key"), so the logits are the full pass's
    from cm3leon_jax.models.decoding import grow_cache

    cfg, params = _smeared(scan_layers=False)
    real, toks, start, pos = _left_padded_row(9, 2, 10)
    cache = init_cache(cfg, 1, 8)
    assert cache[0]["prev_key"].shape == (1, cfg.kv_heads, 1, cfg.head_dim)
    first, cache = cached_forward(params, cfg, toks[:, :7], pos[:, :7], start, cache, 0)
    cache = grow_cache(cache, 16)
    assert cache[0]["key"].shape[2] == 16 and cache[0]["prev_key"].shape[2] == 1
    steps = [first]
    for i in range(7, 12):
        s, cache = cached_forward(params, cfg, toks[:, i:i + 1], pos[:, i:i + 1], start, cache, i)
        steps.append(s)
    want = Decoder(cfg).apply({"params": params}, real)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)[:, 2:]), np.asarray(want), atol=1e-5)
    # the cached keys are smeared: a step that re-smeared them would read
    # other keys (the raw ones differ from the cached ones)
    raw_prev = cache[0]["prev_key"][:, :, 0]
    assert not np.allclose(np.asarray(cache[0]["key"][:, :, 11]), np.asarray(raw_prev), atol=1e-3)
