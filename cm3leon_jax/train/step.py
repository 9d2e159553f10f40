"""The train step: weighted cross-entropy (+ optional z-loss), gradient
accumulation over microbatches, AdamW update. Pure; jitted by the trainer."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cm3leon_jax.train.state import TrainState

FEATURES = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
            "decoder_segment_ids", "decoder_positions")


def cross_entropy_sums(logits, targets, weights, z_loss: float = 0.0):
    """Sums over the batch of weighted token losses (fp32).

    Returns (sum of weighted CE + z_loss * log(Z)^2, sum of weighted CE,
    sum of weights). Dividing by the total weight is left to the caller so
    that microbatches add up exactly to the full batch.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_z - target_logit
    weights = weights.astype(jnp.float32)
    ce_sum = jnp.sum(ce * weights)
    total = ce_sum + z_loss * jnp.sum(jnp.square(log_z) * weights) if z_loss else ce_sum
    return total, ce_sum, jnp.sum(weights)


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation, schedule: Callable,
                    num_microbatches: int = 1, z_loss: float = 0.0):
    """Returns `train_step(state, batch) -> (state, metrics)`.

    The gradient is that of sum(weighted loss) / sum(weights) over the *whole*
    batch, however it is split: microbatch gradients of the unnormalised sums
    are added, then divided once.
    """

    def sums(params, mb):
        logits = apply_fn({"params": params}, mb["decoder_input_tokens"],
                          mb.get("decoder_segment_ids"), mb.get("decoder_positions"))
        total, ce, w = cross_entropy_sums(logits, mb["decoder_target_tokens"],
                                          mb["decoder_loss_weights"], z_loss)
        return total, (ce, w)

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def train_step(state: TrainState, batch):
        batch = {k: v for k, v in batch.items() if k in FEATURES}
        if num_microbatches == 1:
            (total, (ce, w)), grads = grad_fn(state.params, batch)
        else:
            b = batch["decoder_input_tokens"].shape[0]
            if b % num_microbatches:
                raise ValueError(f"batch size {b} is not divisible by num_microbatches={num_microbatches}")
            micro = jax.tree.map(
                lambda x: x.reshape((num_microbatches, b // num_microbatches) + x.shape[1:]), batch)

            def body(carry, mb):
                g_acc, t_acc, ce_acc, w_acc = carry
                (t, (c, wt)), g = grad_fn(state.params, mb)
                return (jax.tree.map(jnp.add, g_acc, g), t_acc + t, ce_acc + c, w_acc + wt), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
            (grads, total, ce, w), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(w, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": ce / denom,
            "total_loss": total / denom,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            "num_loss_tokens": w,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
