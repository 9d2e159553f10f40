"""CLIP's objective and train step, for training a CLIP from scratch
(train/clip_trainer.py): the symmetric InfoNCE loss over a batch of N
(caption, image) pairs (cross entropy of each caption against the N images
and of each image against the N captions), logits = exp(t) x cosine
similarity with the log temperature t learned (the model's `logit_scale`)
and clipped at ln 100, as CLIP does, so the logits never exceed 100; AdamW
decays the matrices only, as CLIP does.

Initialisation: OpenAI CLIP's scales rather than transformers' 0.02
(`openai_scaled_init`); at width 64 the latter leaves a CLIP that, after the
same steps, retrieves a third as well.
"""
from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm3leon_jax.models.clip import CLIP, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPConfig, l2_normalize

MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clips exp(logit_scale) at 100


@flax.struct.dataclass
class CLIPTrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def contrastive_loss(text_emb, image_emb, logit_scale, max_logit_scale: float = MAX_LOGIT_SCALE):
    """CLIP's symmetric InfoNCE loss of N matching (text, image) pairs.

    text_emb, image_emb: [N, D] projections (normalised here); logit_scale:
    the log temperature, clipped to [0, max_logit_scale]. Row i of each is
    one pair. Returns (loss, metrics): loss = (CE over images for each text
    + CE over texts for each image) / 2, means over the batch; metrics hold
    the in-batch top-1 accuracies both ways and the temperature exp(scale).
    """
    scale = jnp.exp(jnp.clip(logit_scale, 0.0, max_logit_scale))
    logits = scale * l2_normalize(text_emb) @ l2_normalize(image_emb).T  # [text, image]
    labels = jnp.arange(logits.shape[0])
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    metrics = {"loss_text_to_image": t2i, "loss_image_to_text": i2t,
               "accuracy_text_to_image": jnp.mean(jnp.argmax(logits, axis=1) == labels),
               "accuracy_image_to_text": jnp.mean(jnp.argmax(logits, axis=0) == labels),
               "temperature_inverse": scale}
    return (t2i + i2t) / 2, metrics


def normalize_pixels(images):
    """uint8 NHWC at the model's size -> CLIP's normalised float32 pixels
    (what `preprocess_images` gives when no resize is needed), in jnp so it
    runs inside the jitted step."""
    mean = jnp.asarray(OPENAI_CLIP_MEAN, jnp.float32)
    std = jnp.asarray(OPENAI_CLIP_STD, jnp.float32)
    return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def _decay_mask(params):
    # AdamW's decay on matrices only (kernels, embeddings), not on biases,
    # LayerNorm gains or the temperature: CLIP's (and OpenCLIP's) choice.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def openai_scaled_init(params, cfg: CLIPConfig, rng, vision_position_std: Optional[float] = None):
    """Parameters redrawn at OpenAI CLIP's scales instead of the 0.02 that
    transformers uses everywhere (made for width 768; at width 64 it leaves
    every residual branch and attention map near zero, and a ViT trained
    from it is slow to learn where and what a shape is).

    OpenAI's clip/model.py: token embedding std 0.02, text positions 0.01,
    the vision class and position embeddings width^-0.5, projections
    width^-0.5; its text blocks attention width^-0.5, MLP (2 width)^-0.5 and
    residual outputs width^-0.5 (2 layers)^-0.5; its vision blocks keep
    torch's defaults, ~fan_in^-0.5. Here every Dense / patch kernel is
    fan_in^-0.5 and the residual outputs (out_proj, fc2) are further scaled
    by (2 layers)^-0.5, in both towers. Biases, LayerNorms and logit_scale
    are kept. `vision_position_std` replaces width^-0.5 for the vision
    position embeddings: larger, a patch's position is a larger share of its
    token from the start (shapes corpus: position and relations are learned
    sooner)."""
    layers = {"text_model": cfg.text_num_layers, "vision_model": cfg.vision_num_layers}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        names = [getattr(k, "key", str(k)) for k in path]
        std = None
        if names[-1] == "kernel":
            std = float(np.prod(leaf.shape[:-1])) ** -0.5
            if names[-2] in ("out_proj", "fc2"):
                std *= (2 * layers[names[0]]) ** -0.5
        elif names[-1] == "class_embedding" or names[:2] == ["vision_model", "embeddings"] and \
                names[-2] == "position_embedding":
            std = cfg.vision_hidden_size ** -0.5
            if vision_position_std is not None and names[-1] != "class_embedding":
                std = vision_position_std
        elif names[-2:] == ["token_embedding", "embedding"]:
            std = 0.02
        elif names[0] == "text_model" and names[-2] == "position_embedding":
            std = 0.01
        out.append(leaf if std is None else std * jax.random.normal(jax.random.fold_in(rng, i), leaf.shape,
                                                                    leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def make_optimizer(schedule, b1: float, b2: float, eps: float, weight_decay: float,
                   grad_clip_norm: float) -> optax.GradientTransformation:
    chain = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm and grad_clip_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask))
    return optax.chain(*chain)


def make_train_step(model: CLIP, tx, schedule, max_logit_scale: float = MAX_LOGIT_SCALE):
    """`step_fn(state, input_ids, attention_mask, images_uint8) -> (state, metrics)`."""

    def loss_fn(params, ids, mask, pixels):
        text, image, scale = model.apply({"params": params}, ids, pixels, mask)
        return contrastive_loss(text, image, scale, max_logit_scale)

    def step_fn(state: CLIPTrainState, ids, mask, images):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, ids, mask, normalize_pixels(images))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # CLIP clips the parameter itself after each step, not only its use.
        params = dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, max_logit_scale))
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                       learning_rate=schedule(state.step))
        return CLIPTrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn
