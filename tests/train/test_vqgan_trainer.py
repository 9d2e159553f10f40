"""The VQ-GAN trainer: dead-code restarts worked by hand, exact resume, the
patch-GAN switch, the CLI, and the jitted batched tokenizer it produces."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cm3leon_jax.models.image_tokenizer import ImageTokenizer
from cm3leon_jax.models.vqgan import VQGAN, small_config
from cm3leon_jax.train import vqgan_trainer as vt
from tests.conftest import run_cli

# 32x32 -> 4x4 codes, a few thousand parameters: trains in seconds.
MICRO = dict(resolution=32, base_channels=8, channel_multiplier=(1, 2, 2, 2), num_res_blocks=1,
             latent_channels=16, embed_dim=8, num_embeddings=32, num_groups=4)


def _train(model_dir, steps, **kw):
    args = dict(model_dir=str(model_dir), train_steps=steps, config=small_config(**MICRO),
                batch_size=4, learning_rate=2e-3, warmup_steps=2, checkpoint_every=5,
                log_every=5, eval_images=8, quiet=True)
    args.update(kw)
    return vt.train_vqgan(**args)


def _step_fn(model, restart_every, gan_weight=0.0, gan_start_step=0):
    tx = optax.adam(1e-3)
    disc = vt.PatchDiscriminator(base_channels=8, num_layers=1) if gan_weight else None
    disc_tx = optax.adam(1e-3) if disc else None
    fn = vt.make_vq_train_step(model, tx, disc, disc_tx, l1_weight=1.0, l2_weight=1.0,
                               codebook_weight=1.0, commitment_weight=0.25, gan_weight=gan_weight,
                               gan_start_step=gan_start_step, restart_every=restart_every)
    return fn, tx, disc, disc_tx


def _state(model, tx, disc, disc_tx, images, codebook=None):
    params = model.init(jax.random.PRNGKey(0), images)["params"]
    if codebook is not None:
        params = dict(params, codebook=codebook)
    dparams = disc.init(jax.random.PRNGKey(1), images)["params"] if disc else {}
    return vt.VQTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           disc_params=dparams, disc_opt_state=disc_tx.init(dparams) if disc else (),
                           usage=jnp.zeros((model.config.num_embeddings,), jnp.int32))


def _one_live_code_step(restart_every):
    """One step from a codebook with code 0 at the origin and every other code
    far away: all latents pick code 0, codes 1..31 are unused."""
    cfg = small_config(**MICRO)
    model = VQGAN(cfg)
    images = jnp.asarray(vt.shapes_batch(0, 0, 4, cfg.resolution))
    codebook = jnp.concatenate([jnp.zeros((1, cfg.embed_dim)), jnp.full((31, cfg.embed_dim), 1e3)])
    fn, tx, disc, disc_tx = _step_fn(model, restart_every=restart_every)
    state = _state(model, tx, disc, disc_tx, images, codebook)
    latents = model.apply({"params": state.params}, images, method=VQGAN.latents)
    new_state, metrics = jax.jit(fn)(state, images, jax.random.PRNGKey(3))
    return cfg, latents, new_state, metrics


def test_dead_codes_are_restarted_from_encoder_outputs():
    # a one-step window: codes 1..31 are dead at its end
    cfg, latents, new_state, metrics = _one_live_code_step(restart_every=1)
    assert int(metrics["codes_restarted"]) == 31
    assert int(metrics["batch_codes_used"]) == 1
    new_cb = np.asarray(new_state.params["codebook"])
    z = np.asarray(latents).reshape(-1, cfg.embed_dim)
    # each restarted code lies within the small jitter of some encoder output
    dist = np.sqrt(((new_cb[1:, None, :] - z[None]) ** 2).sum(-1)).min(axis=1)
    assert dist.max() < 0.1 * np.abs(z).max() + 1e-3
    assert np.all(new_cb[1:] < 1e2)
    assert int(new_state.usage.sum()) == 0  # window reset after the restart


def test_error_weighted_restarts_pick_only_badly_served_latents():
    # k-means++-style draws: a latent with zero quantisation error (blank
    # background that a code already fits) is never a restart seed; the rest
    # are drawn in proportion to their squared error (1 : 3 here).
    err = jnp.asarray([0.0, 1.0, 0.0, 3.0, 0.0])
    picks = np.asarray(vt.restart_picks(jax.random.PRNGKey(0), err, 4000, "error"))
    assert set(picks.tolist()) == {1, 3}
    assert abs(np.mean(picks == 3) - 0.75) < 0.03
    uniform = np.asarray(vt.restart_picks(jax.random.PRNGKey(0), err, 4000, "uniform"))
    assert set(uniform.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="restart_sampling"):
        vt.restart_picks(jax.random.PRNGKey(0), err, 4, "kmeans")


def test_no_restart_inside_the_window():
    cfg, _, new_state, metrics = _one_live_code_step(restart_every=3)
    assert int(metrics["codes_restarted"]) == 0
    assert np.all(np.asarray(new_state.params["codebook"])[1:] > 9e2)
    assert int(new_state.usage.sum()) == 4 * cfg.codes_per_image


def test_ema_params_follow_the_worked_update_and_restarts():
    """ema' = d ema + (1 - d) params' with d = min(decay, (1 + t) / (10 + t)) at
    step t = 1, except restarted codes, which the average takes as they are."""
    cfg = small_config(**MICRO)
    model = VQGAN(cfg)
    images = jnp.asarray(vt.shapes_batch(0, 0, 4, cfg.resolution))
    codebook = jnp.concatenate([jnp.zeros((1, cfg.embed_dim)), jnp.full((31, cfg.embed_dim), 1e3)])
    tx = optax.adam(1e-3)
    fn = vt.make_vq_train_step(model, tx, None, None, l1_weight=1.0, l2_weight=1.0,
                               codebook_weight=1.0, commitment_weight=0.25, gan_weight=0.0,
                               gan_start_step=0, restart_every=1, ema_decay=0.99)
    state = _state(model, tx, None, None, images, codebook)
    old = state.params
    state = state.replace(ema_params=jax.tree.map(lambda a: a + 1.0, old))  # an average != params
    new_state, metrics = jax.jit(fn)(state, images, jax.random.PRNGKey(3))
    d = 2.0 / 11.0
    want = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state.ema_params, new_state.params)
    got = new_state.ema_params
    for path, w in jax.tree_util.tree_leaves_with_path(want):
        g = dict(jax.tree_util.tree_leaves_with_path(got))[path]
        if path[0].key == "codebook":
            np.testing.assert_allclose(np.asarray(g)[0], np.asarray(w)[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(np.asarray(g)[1:], np.asarray(new_state.params["codebook"])[1:])
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert int(metrics["codes_restarted"]) == 31


def test_gan_is_off_before_its_start_step_and_on_after():
    cfg = small_config(**MICRO)
    model = VQGAN(cfg)
    images = jnp.asarray(vt.shapes_batch(0, 0, 2, cfg.resolution))
    fn, tx, disc, disc_tx = _step_fn(model, restart_every=0, gan_weight=0.5, gan_start_step=1)
    state = _state(model, tx, disc, disc_tx, images)
    fn = jax.jit(fn)
    s1, m1 = fn(state, images, jax.random.PRNGKey(0))
    unchanged = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state.disc_params, s1.disc_params)
    assert all(jax.tree.leaves(unchanged))  # step 0 < gan_start_step
    s2, m2 = fn(s1, images, jax.random.PRNGKey(1))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), s1.disc_params, s2.disc_params)
    assert any(jax.tree.leaves(changed))
    assert np.isfinite(float(m2["gan_d_loss"])) and float(m2["gan_d_loss"]) > 0


def test_resume_is_exact_and_eval_is_written(tmp_path, monkeypatch):
    full = _train(tmp_path / "full", 10)
    # Interrupt the same run while it fetches step 7's batch (the last
    # checkpoint is step 5), then rerun the same call: it resumes from 5.
    real_batch = vt.shapes_batch

    def interrupted(seed, start, batch_size, resolution):
        if start == 7 * batch_size:
            raise KeyboardInterrupt
        return real_batch(seed, start, batch_size, resolution)

    monkeypatch.setattr(vt, "shapes_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "split", 10)
    monkeypatch.setattr(vt, "shapes_batch", real_batch)
    resumed = _train(tmp_path / "split", 10)
    assert resumed["train_steps"] == 10
    _, p_full = vt.load_vqgan(str(tmp_path / "full"))
    _, p_split = vt.load_vqgan(str(tmp_path / "split"))
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_split)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert full == resumed
    saved = json.load(open(tmp_path / "full" / "eval.json"))
    assert saved["eval_images"] == 8 and 0 < saved["codes_used"] <= 32
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [5, 10]
    assert {"loss", "codebook_usage", "codebook_perplexity", "codes_restarted"} <= set(rows[0])


def test_loss_falls(tmp_path):
    _train(tmp_path, 30, log_every=1, checkpoint_every=30)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = np.mean([r["l1"] for r in rows[:3]]), np.mean([r["l1"] for r in rows[-3:]])
    assert last < 0.7 * first, (first, last)


def test_cli_trains_and_names_missing_model_dir(tmp_path):
    proc = run_cli(["tokenizer", "train-image", "--gin_file=gin/vqgan_shapes.gin"], check=False)
    assert proc.returncode != 0 and "MODEL_DIR" in (proc.stderr + proc.stdout)
    micro = [f"--gin.VQGANConfig.{k}={v!r}" for k, v in MICRO.items()]
    proc = run_cli(["tokenizer", "train-image", "--gin_file=gin/vqgan_shapes.gin",
                    f"--model_dir={tmp_path}", "--gin.train_vqgan.train_steps=4",
                    "--gin.train_vqgan.batch_size=2", "--gin.train_vqgan.log_every=2",
                    "--gin.train_vqgan.eval_images=4", *micro])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["train_steps"] == 4 and report["eval_images"] == 4
    assert os.path.exists(tmp_path / "config.gin") and os.path.exists(tmp_path / "vqgan_config.json")


def test_tokenizer_batches_agree_with_one_call_and_reject_bad_input(tmp_path):
    cfg = small_config(**MICRO)
    model = VQGAN(cfg)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    images = np.stack([vt.shapes_batch(5, i, 1, 32)[0] for i in range(5)])
    uint8 = np.clip(np.round((images + 1) * 127.5), 0, 255).astype(np.uint8)
    one_call = np.asarray(model.apply({"params": params}, jnp.asarray(uint8 / 127.5 - 1.0, jnp.float32),
                                      method=VQGAN.encode))
    tok = ImageTokenizer(cfg, params, batch_size=2)  # 5 images: batches of 2, 2, 1 (+1 pad row)
    codes = tok.encode(uint8)
    np.testing.assert_array_equal(codes, one_call)
    np.testing.assert_array_equal(tok.encode(uint8[3]), one_call[3])
    pixels = tok.decode(codes)
    ref = np.asarray(model.apply({"params": params}, jnp.asarray(one_call), method=VQGAN.decode))
    ref = np.clip(np.round((ref + 1) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(pixels, ref)
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(uint8.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        tok.encode(uint8[:, :16])
    with pytest.raises(ValueError, match="id_to_image_code"):
        tok.decode(codes + 1000)


def test_perceptual_term_is_lpips_of_the_reconstruction():
    from cm3leon_jax.models import lpips

    cfg = small_config(**MICRO)
    model = VQGAN(cfg)
    images = jnp.asarray(vt.shapes_batch(0, 0, 2, cfg.resolution))
    module = lpips.LPIPS()
    lp_params = module.init(jax.random.PRNGKey(2), images, images)["params"]
    tx = optax.adam(1e-3)
    kw = dict(l1_weight=1.0, l2_weight=1.0, codebook_weight=1.0, commitment_weight=0.25,
              gan_weight=0.0, gan_start_step=0, restart_every=0)
    with_p = vt.make_vq_train_step(model, tx, None, None, perceptual=module, perceptual_weight=0.5, **kw)
    without = vt.make_vq_train_step(model, tx, None, None, **kw)
    state = _state(model, tx, None, None, images)
    _, m1 = jax.jit(with_p)(state, images, jax.random.PRNGKey(0), lp_params)
    _, m0 = jax.jit(without)(state, images, jax.random.PRNGKey(0))
    recon, _, _ = model.apply({"params": state.params}, images)
    expected = float(jnp.mean(module.apply({"params": lp_params}, recon, images)))
    assert expected > 0
    np.testing.assert_allclose(float(m1["perceptual_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]) + 0.5 * expected, rtol=1e-5)
    assert float(m0["perceptual_loss"]) == 0.0


def test_perceptual_weight_without_weights_file_names_the_binding(tmp_path):
    with pytest.raises(ValueError, match="train_vqgan.perceptual_weights"):
        _train(tmp_path, 2, perceptual_weight=0.1)


def test_edge_weights_by_hand():
    # a vertical edge between columns 2 and 3: the Sobel response is 4 (of a
    # maximum 4) in columns 2 and 3, 0 elsewhere
    x = np.zeros((1, 5, 5, 3), np.float32)
    x[0, :, 3:] = 1.0
    w = np.asarray(vt.edge_weights(jnp.asarray(x), 2.0))[0, :, :, 0]
    np.testing.assert_allclose(w, np.tile([1.0, 1.0, 3.0, 3.0, 1.0], (5, 1)))
    flat = np.asarray(vt.edge_weights(jnp.zeros((2, 4, 4, 3)), 5.0))
    np.testing.assert_array_equal(flat, 1.0)  # no edges, no division by zero
    np.testing.assert_array_equal(np.asarray(vt.edge_weights(jnp.asarray(x), 0.0)), 1.0)


def test_pyramid_l1_by_hand():
    target = np.zeros((1, 4, 4, 3), np.float32)
    recon = target.copy()
    recon[0, :2, :2] = 1.0  # a wrong 2x2 patch: 1 of 4 cells at f=2, a quarter of the image at f=4
    np.testing.assert_allclose(float(vt.pyramid_l1(jnp.asarray(recon), jnp.asarray(target), (2,))), 0.25)
    np.testing.assert_allclose(float(vt.pyramid_l1(jnp.asarray(recon), jnp.asarray(target), (2, 4))), 0.5)
    # an edge one pixel off inside a pooling window costs nothing after pooling
    shifted_t, shifted_r = target.copy(), target.copy()
    shifted_t[0, :, 0] = 1.0
    shifted_r[0, :, 1] = 1.0
    assert float(vt.pyramid_l1(jnp.asarray(shifted_r), jnp.asarray(shifted_t), (2,))) == 0.0
    with pytest.raises(ValueError, match="pyramid_factors"):
        vt.pyramid_l1(jnp.asarray(recon), jnp.asarray(target), (3,))
