"""AdamW with linear warmup and cosine/linear decay, gradient clipping (gin).

The paper gives peak LR and 1,500 warmup steps; betas, eps, weight decay,
the decay shape and its floor (10% of peak) are OPT's, marked as assumptions
in the gin files.
"""
from __future__ import annotations

import gin
import optax


@gin.configurable
def learning_rate_schedule(peak_learning_rate: float = gin.REQUIRED,
                           warmup_steps: int = 1500,
                           total_steps: int = gin.REQUIRED,
                           decay: str = "cosine",
                           end_learning_rate_ratio: float = 0.1):
    """Linear warmup from 0 to the peak, then `decay` to ratio x peak at total_steps."""
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"learning_rate_schedule.decay={decay!r}; use cosine, linear or constant")
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps)))
    end = peak_learning_rate * end_learning_rate_ratio
    decay_steps = max(1, int(total_steps) - warmup_steps)
    if decay == "cosine":
        after = optax.cosine_decay_schedule(peak_learning_rate, decay_steps, alpha=end_learning_rate_ratio)
    elif decay == "linear":
        after = optax.linear_schedule(peak_learning_rate, end, decay_steps)
    else:
        after = optax.constant_schedule(peak_learning_rate)
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, peak_learning_rate, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])


@gin.configurable
def adamw(schedule,
          b1: float = 0.9,
          b2: float = 0.95,
          eps: float = 1e-8,
          weight_decay: float = 0.1,
          grad_clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW. Every parameter is a matrix (no
    biases, no LayerNorm gains), so weight decay applies to all of them."""
    chain = []
    if grad_clip_norm and grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(grad_clip_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*chain)
