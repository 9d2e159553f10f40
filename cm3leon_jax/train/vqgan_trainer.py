"""Training the VQ-GAN image tokenizer (`cm3leon tokenizer train-image`).

Losses: L1 + L2 reconstruction, VQ-VAE codebook and commitment terms
(straight-through estimator), and two optional terms switched on in gin as in
taming-transformers' VQ-GAN (which Make-A-Scene's tokenizer builds on): an
LPIPS perceptual loss (frozen VGG16 read from a safetensors file,
`models/lpips.py`) and a patch-GAN hinge loss. Codebook usage is monitored (fraction of codes used in a window and
perplexity); codes unused for a whole window are restarted from random
encoder outputs of the current batch (dead-code restarts). Checkpoints and
metrics reuse the decoder trainer's Orbax `Checkpointer` and clu writers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm3leon_jax import model_dir_lock
from cm3leon_jax.models import lpips as lpips_lib
from cm3leon_jax.models.pixels import from_model_range, to_model_range
from cm3leon_jax.models.vqgan import VQGAN, VQGANConfig
# The trainer writes the model dir that load_vqgan reads back.
from cm3leon_jax.models.vqgan_dir import load_vqgan, save_config  # noqa: F401
from cm3leon_jax.train import loop as loop_lib
from cm3leon_jax.train import metrics as metrics_lib


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): strided convs to a grid of real/fake logits."""

    base_channels: int = 32
    num_layers: int = 2

    @nn.compact
    def __call__(self, x):
        h = nn.leaky_relu(nn.Conv(self.base_channels, (4, 4), strides=2, padding=1)(x), 0.2)
        ch = self.base_channels
        for _ in range(1, self.num_layers + 1):
            ch = min(ch * 2, self.base_channels * 8)
            h = nn.Conv(ch, (4, 4), strides=2, padding=1, use_bias=False)(h)
            h = nn.leaky_relu(nn.GroupNorm(num_groups=min(32, ch // 4))(h), 0.2)
        return nn.Conv(1, (4, 4), padding=1)(h)


@flax.struct.dataclass
class VQTrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    disc_params: dict
    disc_opt_state: optax.OptState
    usage: jax.Array  # per-code counts in the current restart window
    # Exponential moving average of `params` (Polyak averaging), {} when off;
    # when on, evaluation and `load_vqgan` use it instead of `params`.
    ema_params: dict = dataclasses.field(default_factory=dict)


def shapes_batch(seed: int, start: int, batch_size: int, resolution: int) -> np.ndarray:
    """Images [start, start + batch) of the shapes stream `seed`, in [-1, 1]."""
    from cm3leon_jax.data import shapes

    imgs = [shapes.generate_example(seed, i, resolution).image for i in range(start, start + batch_size)]
    return to_model_range(np.stack(imgs))


def edge_weights(images, edge_weight: float):
    """Per-pixel weights 1 + edge_weight * |Sobel gradient of the target| / max,
    [B, H, W, 1]. A mean pixel loss under-weights thin structures (a small
    star's points are a few pixels of a mostly flat image), so a tokenizer
    trained on it blurs them away; weighting by the target's edge strength puts
    the loss where the detail is. edge_weight = 0 gives plain weights of 1."""
    if not edge_weight:
        return jnp.ones(images.shape[:-1] + (1,), images.dtype)
    grey = jnp.mean(images, axis=-1)
    p = jnp.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2])
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:])
    mag = jnp.sqrt(gx ** 2 + gy ** 2)
    mag = mag / jnp.maximum(jnp.max(mag, axis=(1, 2), keepdims=True), 1e-6)
    return (1.0 + edge_weight * mag)[..., None]


def pyramid_l1(recon, images, factors=(2, 4, 8)):
    """Multi-scale L1: sum over f in `factors` of the mean |avgpool_f(recon) -
    avgpool_f(images)| (f x f mean pooling, stride f). A mean pixel loss
    weighs a shape by its area, so a small shape's colour error is a small
    share of it; after pooling, the misplaced edges of larger shapes largely
    cancel and what remains is the colour of each region, small ones
    included. Factors must divide the image side."""
    b, h, w, c = images.shape
    total = jnp.zeros((), recon.dtype)
    for f in factors:
        if h % f or w % f:
            raise ValueError(f"train_vqgan.pyramid_factors: {f} does not divide the image side {h}x{w}")
        pool = lambda x: x.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))
        total = total + jnp.mean(jnp.abs(pool(recon) - pool(images)))
    return total


RESTART_SAMPLING = ("uniform", "error")


def restart_picks(key, quant_error, n: int, sampling: str):
    """Indices of the `n` latents (of a batch's flattened latents, with their
    squared quantisation errors `quant_error` [M]) that dead codes restart
    from. "uniform": any latent alike. "error": drawn with probability
    proportional to the error, as k-means++ seeds its centres, so that codes
    restart where the codebook serves the batch worst. On shapes images most
    latents are blank background that one code already fits (error ~0):
    uniform picks mostly land there and die again in the next window."""
    if sampling == "uniform":
        return jax.random.randint(key, (n,), 0, quant_error.shape[0])
    if sampling == "error":
        return jax.random.categorical(key, jnp.log(quant_error + 1e-12), shape=(n,))
    raise ValueError(f"restart_sampling must be one of {RESTART_SAMPLING}, got {sampling!r}")


def make_vq_train_step(model: VQGAN, tx, disc: Optional[PatchDiscriminator], disc_tx, *,
                       l1_weight: float, l2_weight: float, codebook_weight: float,
                       commitment_weight: float, gan_weight: float, gan_start_step: int,
                       restart_every: int, restart_sampling: str = "uniform",
                       perceptual=None, perceptual_weight: float = 0.0,
                       edge_weight: float = 0.0, ema_decay: float = 0.0, pyramid_weight: float = 0.0,
                       pyramid_factors=(2, 4, 8)) -> Callable:
    """`step_fn(state, images, rng, perceptual_params=None)`. `perceptual`: None
    or the LPIPS module; its frozen params are an argument of the step (not
    closed over, which would bake ~60 MB of VGG16 into the program).
    ema_decay > 0 keeps `state.ema_params`, an EMA of the params whose decay
    ramps up as min(ema_decay, (1 + step) / (10 + step))."""
    n_codes = model.config.num_embeddings

    def loss_fn(params, disc_params, images, step, perceptual_params):
        recon, codes, aux = model.apply({"params": params}, images)
        w = edge_weights(images, edge_weight)
        l1 = jnp.mean(w * jnp.abs(recon - images))
        l2 = jnp.mean(w * jnp.square(recon - images))
        loss = (l1_weight * l1 + l2_weight * l2 + codebook_weight * aux["codebook_loss"]
                + commitment_weight * aux["commitment_loss"])
        pyr = pyramid_l1(recon, images, tuple(pyramid_factors)) if pyramid_weight else jnp.zeros(())
        loss = loss + pyramid_weight * pyr
        p_loss = jnp.zeros(())
        if perceptual is not None:
            p_loss = lpips_lib.perceptual_loss(perceptual, perceptual_params, recon, images)
            loss = loss + perceptual_weight * p_loss
        g_loss = jnp.zeros(())
        if disc is not None:
            g_loss = -jnp.mean(disc.apply({"params": disc_params}, recon))
            loss = loss + jnp.where(step >= gan_start_step, gan_weight, 0.0) * g_loss
        return loss, (recon, codes, aux, l1, l2, p_loss, g_loss, pyr)

    def step_fn(state: VQTrainState, images, rng, perceptual_params=None):
        (loss, (recon, codes, aux, l1, l2, p_loss, g_loss, pyr)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.disc_params, images, state.step, perceptual_params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        disc_params, disc_opt_state, d_loss = state.disc_params, state.disc_opt_state, jnp.zeros(())
        if disc is not None:
            def d_loss_fn(dp):
                real = disc.apply({"params": dp}, images)
                fake = disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
                return jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake))
            d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
            active = state.step >= gan_start_step
            d_updates, new_d_opt = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
            disc_params = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                                       optax.apply_updates(state.disc_params, d_updates), state.disc_params)
            disc_opt_state = jax.tree.map(lambda new, old: jnp.where(active, new, old),
                                          new_d_opt, state.disc_opt_state)
        batch_counts = jnp.bincount(codes.reshape(-1), length=n_codes)
        usage = state.usage + batch_counts
        # Dead-code restart at the end of each window: unused codes take
        # encoder outputs of this batch (plus a little noise), drawn as
        # `restart_sampling` says (`restart_picks`).
        step1 = state.step + 1
        do_restart = (restart_every > 0) & (step1 % max(restart_every, 1) == 0)
        z = aux["latents"].reshape(-1, aux["latents"].shape[-1])
        k1, k2 = jax.random.split(rng)
        picks = z[restart_picks(k1, aux["quant_error"].reshape(-1), n_codes, restart_sampling)]
        picks = picks + 0.01 * jnp.std(z) * jax.random.normal(k2, picks.shape)
        dead = (usage == 0) & do_restart
        params = dict(params)
        params["codebook"] = jnp.where(dead[:, None], jax.lax.stop_gradient(picks), params["codebook"])
        ema_params = state.ema_params
        if ema_decay > 0:
            t = step1.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
            ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
            # a restarted code starts afresh in the average too
            ema_params = dict(ema_params)
            ema_params["codebook"] = jnp.where(dead[:, None], params["codebook"], ema_params["codebook"])
        window_used = jnp.mean((usage > 0).astype(jnp.float32))
        probs = usage / jnp.maximum(jnp.sum(usage), 1)
        perplexity = jnp.exp(-jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0)))
        metrics = {"loss": loss, "l1": l1, "l2": l2, "pyramid_l1": pyr, "codebook_loss": aux["codebook_loss"],
                   "commitment_loss": aux["commitment_loss"], "perceptual_loss": p_loss,
                   "gan_g_loss": g_loss, "gan_d_loss": d_loss,
                   "codebook_usage": window_used, "codebook_perplexity": perplexity,
                   "codes_restarted": jnp.sum(dead), "batch_codes_used": jnp.sum(batch_counts > 0)}
        usage = jnp.where(do_restart, jnp.zeros_like(usage), usage)
        new_state = VQTrainState(step=step1, params=params, opt_state=opt_state, disc_params=disc_params,
                                 disc_opt_state=disc_opt_state, usage=usage, ema_params=ema_params)
        return new_state, metrics

    return step_fn


@gin.configurable
@model_dir_lock.writes_model_dir
def train_vqgan(*,
                model_dir: str = gin.REQUIRED,
                train_steps: int = gin.REQUIRED,
                config: Optional[VQGANConfig] = None,
                batch_size: int = 32,
                learning_rate: float = 1e-3,
                warmup_steps: int = 100,
                b1: float = 0.5,
                b2: float = 0.9,
                seed: int = 0,
                data_seed: int = 0,
                l1_weight: float = 1.0,
                l2_weight: float = 1.0,
                edge_weight: float = 0.0,
                pyramid_weight: float = 0.0,
                pyramid_factors=(2, 4, 8),
                codebook_weight: float = 1.0,
                commitment_weight: Optional[float] = None,
                restart_every: int = 100,
                restart_sampling: str = "uniform",
                ema_decay: float = 0.0,
                perceptual_weight: float = 0.0,
                perceptual_weights: Optional[str] = None,
                gan_weight: float = 0.0,
                gan_start_step: int = 0,
                checkpoint_every: int = 500,
                keep_checkpoints: int = 2,
                log_every: int = 20,
                eval_images: int = 200,
                eval_seed: int = 12345,
                quiet: bool = False) -> dict:
    """Trains the VQ-GAN on the embedded shapes corpus; returns the held-out eval.

    The batch at step s holds shapes examples [s*B, (s+1)*B) of `data_seed`, so
    resuming needs no iterator beyond the step. Held-out images come from
    `eval_seed`, a stream training never sees.
    """
    cfg = config or VQGANConfig()
    if restart_sampling not in RESTART_SAMPLING:
        raise ValueError(f"train_vqgan.restart_sampling must be one of {RESTART_SAMPLING}, "
                         f"got {restart_sampling!r}")
    perceptual, perceptual_params = None, None
    if perceptual_weight > 0:
        if not perceptual_weights:
            raise ValueError("train_vqgan.perceptual_weight > 0 needs train_vqgan.perceptual_weights: "
                             "a safetensors file with VGG16 (+ LPIPS lin) weights, see "
                             "cm3leon_jax/models/lpips.py for how to write one")
        perceptual, perceptual_params = lpips_lib.load_lpips(perceptual_weights)
    commitment_weight = cfg.beta if commitment_weight is None else commitment_weight
    save_config(model_dir, cfg)
    model = VQGAN(cfg)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
         optax.cosine_decay_schedule(learning_rate, max(train_steps - warmup_steps, 1), alpha=0.1)],
        [max(warmup_steps, 1)])
    tx = optax.adam(schedule, b1=b1, b2=b2)
    disc = PatchDiscriminator() if gan_weight > 0 else None
    disc_tx = optax.adam(learning_rate, b1=b1, b2=b2) if disc is not None else None
    res = cfg.resolution
    key = jax.random.PRNGKey(seed)

    def init():
        dummy = jnp.zeros((1, res, res, cfg.in_channels))
        params = model.init(key, dummy)["params"]
        dparams = disc.init(jax.random.fold_in(key, 1), dummy)["params"] if disc else {}
        return VQTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                            disc_params=dparams, disc_opt_state=disc_tx.init(dparams) if disc else (),
                            usage=jnp.zeros((cfg.num_embeddings,), jnp.int32),
                            ema_params=params if ema_decay > 0 else {})

    ckpt, state, start = loop_lib.restore_or_init(init, model_dir, checkpoint_every, keep_checkpoints, quiet)

    step_fn = jax.jit(make_vq_train_step(
        model, tx, disc, disc_tx, l1_weight=l1_weight, l2_weight=l2_weight,
        codebook_weight=codebook_weight, commitment_weight=commitment_weight,
        gan_weight=gan_weight, gan_start_step=gan_start_step, restart_every=restart_every,
        restart_sampling=restart_sampling, perceptual=perceptual, perceptual_weight=perceptual_weight,
        edge_weight=edge_weight,
        pyramid_weight=pyramid_weight, pyramid_factors=tuple(pyramid_factors),
        ema_decay=ema_decay),
        donate_argnums=(0,))

    def make_batch(step):
        images = shapes_batch(data_seed, step * batch_size, batch_size, res)
        return jnp.asarray(images), jax.random.fold_in(key, step + 7), perceptual_params

    state, step = loop_lib.run_steps(
        state=state, start_step=start, train_steps=train_steps, make_batch=make_batch, step_fn=step_fn,
        ckpt=ckpt, writer=metrics_lib.create_writer(model_dir), examples_per_step=batch_size,
        log_every=log_every, checkpoint_every=checkpoint_every, quiet=quiet, what="VQ-GAN",
        lr_binding="train_vqgan.learning_rate", speed_key="images_per_sec")
    result = evaluate_reconstructions(cfg, state.ema_params or state.params, eval_images, eval_seed)
    result["train_steps"] = step
    with open(os.path.join(model_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def evaluate_reconstructions(cfg: VQGANConfig, params, num_images: int, seed: int,
                             batch_size: int = 50) -> dict:
    """Held-out shapes: checker accuracy on reconstructions, codebook usage."""
    from cm3leon_jax.data import shapes
    from cm3leon_jax.data import shapes_check
    from cm3leon_jax.models.image_tokenizer import ImageTokenizer

    tok = ImageTokenizer(cfg, params, batch_size=min(batch_size, max(num_images, 1)))
    correct, used, l1 = 0, np.zeros(cfg.num_embeddings, bool), []
    for start in range(0, num_images, batch_size):
        examples = [shapes.generate_example(seed, i, cfg.resolution)
                    for i in range(start, min(start + batch_size, num_images))]
        images = np.stack([e.image for e in examples])
        codes = tok.encode(images)
        recon = tok.decode(codes, as_uint8=False)
        used[codes.reshape(-1)] = True
        l1.append(float(np.mean(np.abs(recon - to_model_range(images)))) * len(examples))
        for e, r in zip(examples, from_model_range(recon)):
            correct += bool(shapes_check.score(r, e.caption)["all_correct"])
    return {"eval_images": num_images, "checker_accuracy": correct / max(num_images, 1),
            "codebook_usage": float(used.mean()), "codes_used": int(used.sum()),
            "recon_l1": float(np.sum(l1) / max(num_images, 1))}
