"""Logit processors for sampling, as pure jnp functions on [..., V] logits
(PAPER.md, "Decoding").

- `temperature`, `top_k`, `top_p`: the usual filters; a filtered-out token
  gets -inf, so `jax.random.categorical` never draws it.
- `classifier_free_guidance`: `uncond + alpha * (cond - uncond)` (alpha = 1
  is the conditional logits, 0 the unconditional ones).
- `two_scale_guidance`: InstructPix2Pix-style guidance with an image scale and
  a text scale over three streams (used by the SFT editing task).
- `contrastive_scores`: CM3Leon's CD-K. Expert = conditional stream, amateur =
  unconditional stream; allowed tokens are those with
  `p_EXP(t) >= alpha * kmax(p_EXP)` (the k-th largest expert probability),
  and among them the score is `log p_EXP - log p_AMA`; CD-K picks its argmax.
- `allowed_ids_mask`: the modality constraint (image codes only while an
  image is generated, no image codes in text).

Every function keeps the shape of its input and works under jit/vmap.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def temperature(logits, t: float):
    """logits / t; t must be > 0 (greedy decoding is the argmax, not t=0)."""
    if isinstance(t, (int, float)) and t <= 0:
        raise ValueError(f"temperature must be > 0, got {t}")
    return logits / t


def top_k(logits, k: int):
    """Keeps the k largest logits (ties at the k-th value are all kept)."""
    if k < 1:
        raise ValueError(f"top_k needs k >= 1, got {k}")
    k = min(int(k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


TOP_P_BISECTION_STEPS = 40


def top_p(logits, p: float):
    """Nucleus filter: keeps the smallest set of most likely tokens whose
    probabilities sum to >= p (at least the most likely token); the rest get
    -inf. p = 1 keeps everything.

    The set is {t : prob(t) >= tau}, tau the largest value whose upper set
    still holds mass >= p, found by bisection on the probability (40 halvings
    of [0, 1]) instead of sorting the vocabulary: a sort of 8,192 logits per
    row per step costs more than the rest of a small model's step on CPU.
    Tokens of exactly equal probability at the boundary are kept together."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p needs 0 < p <= 1, got {p}")
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.float32)      # mass(probs >= lo) >= p always
    hi = jnp.max(probs, axis=-1, keepdims=True) * (1 + 1e-6) + 1e-30  # mass(probs >= hi) = 0 < p

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        enough = jnp.sum(jnp.where(probs >= mid, probs, 0.0), axis=-1, keepdims=True) >= p
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, TOP_P_BISECTION_STEPS, halve, (lo, hi))
    keep = (probs >= lo) | (probs >= jnp.max(probs, axis=-1, keepdims=True))
    return jnp.where(keep, logits, NEG_INF)


def classifier_free_guidance(cond, uncond, alpha):
    """uncond + alpha * (cond - uncond)."""
    return uncond + alpha * (cond - uncond)


def two_scale_guidance(cond, image_only, uncond, image_scale, text_scale):
    """Two guidance scales (InstructPix2Pix, which CM3Leon's editing SFT
    follows: image 1.5, text 7.5): streams conditioned on image and text,
    on the image only, and on neither.

        uncond + s_I (image_only - uncond) + s_T (cond - image_only)
    """
    return uncond + image_scale * (image_only - uncond) + text_scale * (cond - image_only)


def contrastive_scores(expert_logits, amateur_logits, alpha: float, k: int):
    """CD-K scores: `log p_EXP - log p_AMA` on the allowed tokens
    (`p_EXP >= alpha * kmax(p_EXP)`), -inf elsewhere."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"CD-K alpha must lie in [0, 1], got {alpha}")
    if k < 1:
        raise ValueError(f"CD-K k must be >= 1, got {k}")
    log_exp = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
    log_ama = jax.nn.log_softmax(amateur_logits.astype(jnp.float32), axis=-1)
    k = min(int(k), expert_logits.shape[-1])
    kth = jax.lax.top_k(log_exp, k)[0][..., -1:]
    allowed = log_exp >= jnp.log(alpha) + kth if alpha > 0 else jnp.ones_like(log_exp, bool)
    allowed = allowed & jnp.isfinite(log_exp)
    return jnp.where(allowed, log_exp - log_ama, NEG_INF)


def allowed_ids_mask(vocab_size: int, lo: int, hi: int, extra=()):
    """Boolean [vocab_size]: ids in [lo, hi) plus `extra` ids."""
    ids = jnp.arange(vocab_size)
    m = (ids >= lo) & (ids < hi)
    for e in extra:
        m = m | (ids == e)
    return m


def restrict(logits, allowed):
    """-inf outside the boolean `allowed` mask (broadcast over the batch)."""
    return jnp.where(allowed, logits, NEG_INF)
