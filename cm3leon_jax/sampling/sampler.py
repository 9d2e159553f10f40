"""Jitted sampling with a KV cache: prefill the prompt, then one token per
step inside `lax.while_loop`, batched, stopping early when every row has
emitted `<eos>` (PAPER.md, "Decoding").

Guidance runs the conditional and unconditional prompts as one doubled
batch (rows [0, B) conditional, [B, 2B) unconditional) through the same
cache; both streams are fed the token chosen from the guided logits.
Two-scale guidance (editing: InstructPix2Pix's image and text scales) adds
a third stream conditioned on the input image only (rows [2B, 3B)):
`uncond + s_I (image_only - uncond) + s_T (cond - image_only)`, with
s_I = `image_cfg_scale` and s_T = `cfg_scale`.

Token choice per row (`SamplingSettings.decoding`):
  "greedy"  argmax of the (guided) logits;
  "top_p"   temperature, then top-k (if > 0) and top-p, then a draw;
  "cd_k"    argmax of the CD-K scores (expert = conditional, amateur =
            unconditional stream), needs the unconditional prompt;
  "mixed"   the rows in `cd_rows` cd_k, the others top_p (the paper's best
            mix); `cm3leon generate` and the server give CD-K to one sample
            of each prompt (`mixed_sample_decoding`).

The modality constraint (`Constraint`) restricts the ids allowed at each step:
generating an image allows only image codes for exactly `image_tokens` steps
and then only `<eos>`; generating text never allows an image code.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax.models.decoding import (CACHE_AXES, DECODE_BUCKET, cache_length, cached_forward, grow_cache,
                                         init_cache, layer_params)
from cm3leon_jax.models.image_positions import image_cells
from cm3leon_jax.sampling import guidance

DECODINGS = ("greedy", "top_p", "cd_k", "mixed")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    decoding: str = "top_p"
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    cfg_scale: float = 1.0     # alpha_c; used when an unconditional prompt is given
    image_cfg_scale: float = 1.0  # s_I of two-scale guidance; used when an image-only prompt is given
    # Assumption: the paper gives neither alpha nor k for CD-K. Any k > 1
    # always admits the k most likely codes, however peaked the expert is, and
    # among them log p_EXP - log p_AMA prefers one the amateur is even surer
    # is wrong: on blank background (expert 99%+ sure) CD-K then paints codes
    # the expert gives < 1% (benchmarks/cdk_scores.py). Measured on the demo
    # decoder at 4,200 steps, 200 held-out captions, CFG 3, 2 retrieved:
    # alpha 0.1 / k 5 0.005 of captions right (count 0.04: noise everywhere),
    # alpha 0.1 / k 1 0.320, alpha 0.5 / k 1 0.250; top-p 0.330
    # (benchmarks/RESULTS.md, "CD-K at this scale").
    cd_alpha: float = 0.1
    cd_k: int = 1

    def __post_init__(self):
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {self.decoding!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


# Assumption (the paper mixes top-p and CD-K samples without a ratio): in
# decoding="mixed", sample 1 of each prompt is CD-K's, every other sample a
# top-p draw. CD-K is an argmax, so each further CD-K sample of a prompt would
# be a copy of the same image: the even/odd split this replaced gave 8
# samples only 5 distinct candidates (4 top-p + 4 copies of one CD-K image).
# On the 2026-12-07 EPYC fresh clone's `make demo` model (200 held-out
# captions, CFG 1.5, best of 8 by CLIP): 4 top-p + 4 copies 0.270, this mix
# 0.275 as drawn (0.275-0.310, mean 0.301, whichever top-p draw the CD-K
# sample replaces), 8 top-p 0.295, 7 top-p 0.285 (benchmarks/RESULTS.md,
# "Mixed decoding with one CD-K sample"). Sample 0 stays top-p: what
# `--num_samples=1` draws.
MIXED_CD_K_SAMPLE = 1


def mixed_sample_decoding(sample: int) -> str:
    """The decoding sample `sample` (0-based, per prompt) gets under
    decoding="mixed": "cd_k" for sample MIXED_CD_K_SAMPLE, else "top_p"."""
    return "cd_k" if sample == MIXED_CD_K_SAMPLE else "top_p"


@dataclasses.dataclass(frozen=True)
class Constraint:
    """Which ids each generated position may take.

    mode "image": `image_tokens` image codes, then `<eos>`; "text": anything
    but image codes; "none": no constraint. `allow_eos=False` (text and none)
    forbids `<eos>`, for fixed-length generation."""

    mode: str = "none"
    image_tokens: int = 0
    allow_eos: bool = True

    def __post_init__(self):
        if self.mode not in ("none", "image", "text"):
            raise ValueError(f"constraint mode must be none, image or text, got {self.mode!r}")
        if self.mode == "image" and self.image_tokens < 1:
            raise ValueError("an image constraint needs image_tokens >= 1")

    def masks(self, vocab: vocab_lib.UnifiedVocabulary, vocab_size: int):
        """(mask while generating, mask at the end) [V] booleans."""
        ids = np.arange(vocab_size)
        image = (ids >= vocab.image_start) & (ids < vocab.text_start)
        eos = ids == vocab.eos_id
        if self.mode == "image":
            return jnp.asarray(image), jnp.asarray(eos)
        allowed = ids != vocab.pad_id
        if self.mode == "text":
            allowed &= ~image
        if not self.allow_eos:
            allowed &= ~eos
        return jnp.asarray(allowed), jnp.asarray(allowed)


BOS_ID = vocab_lib.PAD_ID  # what training feeds at a sequence's first position


def left_pad(prompts, pad_id: int = vocab_lib.PAD_ID, length: Optional[int] = None):
    """Token lists -> (int32 [B, 1 + P] left-padded, starts [B]: first real slot).

    Each prompt is preceded by the BOS training sees: SeqIO's feature
    converters shift the targets right, so a training sequence's first
    input is 0 (<pad>) at position 0 and its first token is fed at position
    1. Without it a prompt's tokens would sit one position early (every image
    code one grid cell off). `length` is the longest prompt without the BOS
    (default: the longest given)."""
    n = max(len(p) for p in prompts) if length is None else length
    out = np.full((len(prompts), n + 1), pad_id, np.int32)
    starts = np.zeros(len(prompts), np.int32)
    for i, p in enumerate(prompts):
        if len(p) > n or not len(p):
            raise ValueError(f"prompt {i} has {len(p)} tokens; prompts need 1 to {n}")
        out[i, n - len(p) + 1:] = p
        out[i, n - len(p)] = BOS_ID
        starts[i] = n - len(p)
    return out, starts


def _choose(logits, cond, uncond, settings: SamplingSettings, rng, cd_rows):
    """Token [B]: greedy / top-p from the guided logits [B, V]; CD-K from the
    conditional (expert) and unconditional (amateur) streams' logits."""
    if settings.decoding == "greedy":
        return jnp.argmax(logits, axis=-1)
    filtered = guidance.temperature(logits, settings.temperature)
    if settings.top_k:
        filtered = guidance.top_k(filtered, settings.top_k)
    filtered = guidance.top_p(filtered, settings.top_p)
    if rng.ndim == 2:  # one key per row
        sampled = jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(rng, filtered)
    else:
        sampled = jax.random.categorical(rng, filtered, axis=-1)
    if settings.decoding == "top_p":
        return sampled
    cd = jnp.argmax(guidance.contrastive_scores(cond, uncond, settings.cd_alpha, settings.cd_k), axis=-1)
    if settings.decoding == "cd_k":
        return cd
    return jnp.where(cd_rows, cd, sampled)


def decoding_shardings(cfg: DecoderConfig, mesh, rules=None):
    """(param NamedShardings, KV-cache NamedSharding) from the training
    partitioning rules (partitioning.py): the params as the trainer shards
    them, each layer's cache entry [batch, heads, length, head_dim] like the
    attention activations (batch over data/fsdp, heads over model)."""
    import flax.linen as nn

    from cm3leon_jax import partitioning
    from cm3leon_jax.models.decoder import Decoder

    rules = partitioning.logical_axis_rules() if rules is None else rules
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = partitioning.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
    cache = partitioning.logical_to_shardings(jax.sharding.PartitionSpec(*CACHE_AXES), mesh, rules)
    return params, cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "settings", "constraint", "vocab",
                                             "cache_sharding"))
def generate(params, prompts, starts, rng, *, cfg: DecoderConfig, max_new_tokens: int,
             settings: SamplingSettings = SamplingSettings(), constraint: Constraint = Constraint(),
             vocab: vocab_lib.UnifiedVocabulary = vocab_lib.UnifiedVocabulary(),
             uncond_prompts=None, uncond_starts=None, cache_sharding=None, cd_rows=None,
             image_only_prompts=None, image_only_starts=None):
    """Samples `max_new_tokens` tokens after each prompt.

    Args:
      prompts, starts: `left_pad` output, [B, P] and [B].
      rng: one PRNG key (uint32 [2]), or one per row ([B, 2]): then a row's
        samples depend on its own key only, not on the other rows of the
        batch (so batching prompts together changes nothing).
      uncond_prompts, uncond_starts: the unconditional stream (same P), for
        classifier-free guidance and CD-K; None runs unguided.
      image_only_prompts, image_only_starts: with the unconditional stream,
        the stream conditioned on the input image alone (same P): two-scale
        guidance with `settings.image_cfg_scale` and `settings.cfg_scale`.
      cd_rows: for decoding="mixed" (required there), bool [B]: the rows that
        use CD-K, the rest top-p. Only the caller knows which row is which
        prompt's sample: `cm3leon generate` and the server pass the rows of
        each prompt's sample MIXED_CD_K_SAMPLE (`mixed_sample_decoding`).
      cache_sharding: the KV cache's NamedSharding (`decoding_shardings`);
        with params placed by the same function, decoding runs sharded over
        the training mesh.

    Returns (tokens [B, N] int32, padded with <pad> after <eos>; lengths [B]:
    tokens up to and including <eos>, N where none).
    """
    b, p = prompts.shape
    guided = uncond_prompts is not None
    if rng.ndim == 2 and rng.shape[0] != b:
        raise ValueError(f"per-row PRNG keys: got {rng.shape[0]} keys for {b} prompts")
    if settings.decoding in ("cd_k", "mixed") and not guided:
        raise ValueError(f"decoding={settings.decoding!r} needs the unconditional prompt (the amateur)")
    if settings.decoding == "mixed" and cd_rows is None:
        raise ValueError("decoding='mixed' needs cd_rows, bool [B]: the rows that use CD-K (e.g. "
                         "mixed_sample_decoding(sample) == 'cd_k' for each row's sample index)")
    if p + max_new_tokens > cfg.max_length:
        raise ValueError(f"prompt ({p}) + new tokens ({max_new_tokens}) exceed DecoderConfig.max_length="
                         f"{cfg.max_length}")
    two_scale = image_only_prompts is not None
    if two_scale and not guided:
        raise ValueError("two-scale guidance (image_only_prompts) also needs the unconditional prompt")
    streams = ([prompts, uncond_prompts] + ([image_only_prompts] if two_scale else [])) if guided else [prompts]
    stream_starts = ([starts, uncond_starts] + ([image_only_starts] if two_scale else [])) if guided else [starts]
    toks = jnp.concatenate(streams)
    st = jnp.concatenate(stream_starts)
    rows = toks.shape[0]
    layers = layer_params(params, cfg)  # once per call, outside the loops
    total = cache_length(p + max_new_tokens)

    def constrain(c):
        if cache_sharding is None:
            return c
        return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, cache_sharding), c)

    # The cache starts with the prompt's slots rounded up to a bucket and
    # grows by DECODE_BUCKET slots between decoding loops (one while_loop per
    # size), so a step's attention reads about the filled part of it.
    cache = constrain(init_cache(cfg, rows, cache_length(p + 1)))
    positions = jnp.maximum(jnp.arange(p)[None, :] - st[:, None], 0)
    logits, cache = cached_forward(params, cfg, toks, positions, st, cache, 0, layers=layers)
    cache = constrain(cache)
    last = logits[:, -1].astype(jnp.float32)
    # image codes at the end of the prompt (2-D image positions): the first
    # generated token continues their run
    if cfg.image_positions != "none":
        is_image, cell = image_cells(toks, cfg)
        run = jnp.where(is_image[:, -1], cell[:, -1] + 1, 0).astype(jnp.int32)
    else:
        run = jnp.zeros((rows,), jnp.int32)
    gen_mask, end_mask = constraint.masks(vocab, cfg.vocab_size)
    cd_rows = jnp.zeros((b,), bool) if cd_rows is None else jnp.asarray(cd_rows, bool)
    image_steps = constraint.image_tokens if constraint.mode == "image" else max_new_tokens + 1

    def guided_logits(last):
        """(guided, conditional, unconditional) logits [B, V]."""
        if not guided:
            return last, last, last
        cond, uncond = last[:b], last[b:2 * b]
        if two_scale:
            mixed = guidance.two_scale_guidance(cond, last[2 * b:], uncond, settings.image_cfg_scale,
                                                settings.cfg_scale)
            return mixed, cond, uncond
        return guidance.classifier_free_guidance(cond, uncond, settings.cfg_scale), cond, uncond

    def make_loop(attend):
        # steps i feed slot p + i, so this loop (a cache of `attend` slots)
        # runs them while p + i < attend
        stop = min(max_new_tokens, attend - p)

        def cond_fn(state):
            i, _, _, _, _, done, _ = state
            return (i < stop) & ~jnp.all(done)

        def body(state):
            i, cache, last, rng, out, done, run = state
            if rng.ndim == 2:  # per-row keys: each row's draws depend on its own key only
                pair = jax.vmap(jax.random.split)(rng)
                rng, step_rng = pair[:, 0], pair[:, 1]
            else:
                rng, step_rng = jax.random.split(rng)
            lg, cond, uncond = guided_logits(last)
            allowed = jnp.where(i < image_steps, gen_mask, end_mask)
            tok = _choose(guidance.restrict(lg, allowed), guidance.restrict(cond, allowed),
                          guidance.restrict(uncond, allowed), settings, step_rng, cd_rows).astype(jnp.int32)
            tok = jnp.where(done, vocab.pad_id, tok)
            out = out.at[:, i].set(tok)
            done = done | (tok == vocab.eos_id)
            feed = jnp.concatenate([tok] * len(streams))
            pos = (p - st + i)[:, None]
            lo, hi = cfg.image_id_range
            fed_image = (feed >= lo) & (feed < hi)
            cells = (fed_image[:, None], jnp.where(fed_image, run % max(cfg.image_grid ** 2, 1), 0)[:, None])
            run = jnp.where(fed_image, run + 1, 0)
            new_logits, cache = cached_forward(params, cfg, feed[:, None], pos, st, cache, p + i, layers=layers,
                                               cells=cells)
            cache = constrain(cache)
            return i + 1, cache, new_logits[:, -1].astype(jnp.float32), rng, out, done, run

        return lambda state: jax.lax.while_loop(cond_fn, body, state)

    out = jnp.full((b, max_new_tokens), vocab.pad_id, jnp.int32)
    state = (jnp.int32(0), cache, last, rng, out, jnp.zeros((b,), bool), run)
    attend = cache_length(p + 1)
    while True:
        state = make_loop(attend)(state)
        if attend >= total:
            break
        attend += DECODE_BUCKET
        state = state[:1] + (constrain(grow_cache(state[1], attend)),) + state[2:]
    out = state[4]
    is_eos = out == vocab.eos_id
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new_tokens)
    return out, lengths
