"""Training a small CLIP on the shapes corpus (`cm3leon clip train`).

The paper's retriever is a frozen, pretrained CLIP ViT-B/32 (Sec. 2.1). The
embedded demo has no such checkpoint, so this trains one of our `CLIP`
bi-encoders from scratch on the shapes corpus with CLIP's objective and
OpenAI CLIP's initial scales (train/clip_objective.py), on batches that pair
every scene with a one-edit hard negative (train/clip_data.py), and ends
with a held-out retrieval eval (train/clip_eval.py).

The model dir is what `clip_convert.load_clip` and
`CLIPTextTokenizer.from_model_dir` read: clip_config.json, checkpoints/ (the
train state, whose "params" entry is the CLIP's params) and the project's
byte-level BPE under text_tokenizer/ (trained on the training captions unless
gin names one). Checkpoints and metrics reuse the decoder trainer's Orbax
`Checkpointer` and clu writers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from typing import Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax import model_dir_lock
from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
from cm3leon_jax.models import clip_convert
from cm3leon_jax.models.clip import CLIP, TEXT_TOKENIZER_SUBDIR, CLIPConfig, tiny_config
from cm3leon_jax.train import loop as loop_lib
from cm3leon_jax.train import metrics as metrics_lib
from cm3leon_jax.train import optimizer as optimizer_lib
from cm3leon_jax.train.clip_data import batch_indices, mirror_caption, shapes_examples, shapes_examples_with_siblings
from cm3leon_jax.train.clip_eval import evaluate_retrieval
from cm3leon_jax.train.clip_objective import (MAX_LOGIT_SCALE, CLIPTrainState, make_optimizer, make_train_step,
                                              openai_scaled_init)


def prepare_text_tokenizer(model_dir: str, captions: Sequence[str], max_length: int,
                           text_tokenizer: Optional[str], bpe_vocab_size: int) -> CLIPTextTokenizer:
    """The BPE in `model_dir/text_tokenizer/`: kept when there (a resumed
    run), else copied from `text_tokenizer` (a dir or tokenizer.json), else
    trained on `captions` (a byte-level BPE of `bpe_vocab_size` ids)."""
    from cm3leon_jax.data import bpe_training
    from cm3leon_jax.data import tokenizers as tok_lib

    out = os.path.join(model_dir, TEXT_TOKENIZER_SUBDIR)
    file = os.path.join(out, tok_lib.TOKENIZER_FILE)
    if not os.path.isfile(file):
        os.makedirs(out, exist_ok=True)
        if text_tokenizer:
            src = tok_lib._tokenizer_file(text_tokenizer)
            if not os.path.isfile(src):
                raise ValueError(f"train_clip.text_tokenizer={text_tokenizer!r}: no {tok_lib.TOKENIZER_FILE} "
                                 "there (train one with `cm3leon tokenizer train-text`, or leave it unset "
                                 "to train one on the shapes captions)")
            shutil.copyfile(src, file)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                corpus = os.path.join(tmp, "captions.txt")
                with open(corpus, "w", encoding="utf-8") as f:
                    f.writelines(c + "\n" for c in captions)
                with warnings.catch_warnings():
                    # a vocab_size above what the tiny grammar supports leaves
                    # unreachable padding ids: expected here
                    warnings.simplefilter("ignore")
                    bpe_training.train_text_tokenizer([corpus], bpe_vocab_size, out)
    return CLIPTextTokenizer.from_text_tokenizer(out, max_length)


def load_clip_model_dir(model_dir: str):
    """(CLIPConfig, params, CLIPTextTokenizer) of a trained (or converted) model dir."""
    cfg, params = clip_convert.load_clip(model_dir)
    return cfg, params, CLIPTextTokenizer.from_model_dir(model_dir)


@gin.configurable
@model_dir_lock.writes_model_dir
def train_clip(*,
               model_dir: str = gin.REQUIRED,
               train_steps: int = gin.REQUIRED,
               config: Optional[CLIPConfig] = None,
               text_tokenizer: Optional[str] = None,
               bpe_vocab_size: int = 384,
               train_examples: int = 20000,
               sibling_edits: Sequence[str] = ("spatial", "attribute"),
               first_sibling_only_until: float = 0.3,
               mirror_prob: float = 0.5,
               batch_size: int = 128,
               learning_rate: float = 1e-3,
               warmup_steps: int = 100,
               end_learning_rate_ratio: float = 0.0,
               b1: float = 0.9,
               b2: float = 0.98,
               eps: float = 1e-6,
               weight_decay: float = 0.1,
               grad_clip_norm: float = 1.0,
               max_logit_scale: float = MAX_LOGIT_SCALE,
               openai_init: bool = True,
               vision_position_init_std: Optional[float] = None,
               seed: int = 0,
               data_seed: int = 0,
               checkpoint_every: int = 500,
               keep_checkpoints: int = 2,
               log_every: int = 20,
               eval_pool: int = 1000,
               eval_queries: int = 200,
               eval_seed: int = 12345,
               quiet: bool = False) -> dict:
    """Trains a CLIP on the shapes corpus; returns the held-out retrieval eval.

    The batch at step s is `batch_indices(data_seed, s, ...)` of the fixed
    training set, so a resumed run (rerun the same command) continues from
    the latest good checkpoint exactly. Writes clip_config.json,
    text_tokenizer/, checkpoints/, metrics.jsonl (+ TensorBoard) and
    eval.json (`evaluate_retrieval`) into `model_dir`.
    """
    if data_seed == eval_seed:
        raise ValueError(f"train_clip.data_seed={data_seed} equals eval_seed: the held-out stream must "
                         "never be trained on")
    if batch_size > train_examples:
        raise ValueError(f"train_clip.batch_size={batch_size} exceeds train_examples={train_examples}")
    group = 1 + len(sibling_edits)
    if group > 1 and (batch_size % 2 or train_examples % group):
        raise ValueError(f"train_clip.batch_size={batch_size} must be even (pairs of a scene and a sibling) "
                         f"and train_examples={train_examples} a multiple of {group} (a scene and its "
                         f"{len(sibling_edits)} sibling(s), train_clip.sibling_edits)")
    cfg = config or tiny_config()
    say = (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    say(f"rendering {train_examples} training examples of shapes stream {data_seed}"
        + (f" ({train_examples // group} scenes, each with {group - 1} sibling(s))" if group > 1 else ""))
    if group > 1:
        images, captions = shapes_examples_with_siblings(data_seed, train_examples // group, cfg.image_size,
                                                         tuple(sibling_edits))
    else:
        images, captions = shapes_examples(data_seed, 0, train_examples, cfg.image_size)
    tok = prepare_text_tokenizer(model_dir, captions, cfg.max_position_embeddings, text_tokenizer,
                                 bpe_vocab_size)
    cfg = dataclasses.replace(cfg, **tok.config_overrides())
    clip_convert.save_config(model_dir, cfg)
    # Both views of every caption, tokenised once.
    ids, mask = tok(captions)
    ids_m, mask_m = tok([mirror_caption(c) for c in captions])
    too_long = int(np.sum(mask[:, -1] & (ids[:, -1] == tok.eos_id)))
    if too_long:
        say(f"note: {too_long} captions fill all {cfg.max_position_embeddings} positions (some may be "
            "truncated); raise CLIPConfig.max_position_embeddings")

    model = CLIP(cfg)
    schedule = optimizer_lib.learning_rate_schedule(
        peak_learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=train_steps,
        decay="cosine", end_learning_rate_ratio=end_learning_rate_ratio)
    tx = make_optimizer(schedule, b1, b2, eps, weight_decay, grad_clip_norm)
    key = jax.random.PRNGKey(seed)

    def init():
        params = model.init(key, jnp.zeros((1, cfg.max_position_embeddings), jnp.int32),
                            jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels)))["params"]
        if openai_init:
            params = openai_scaled_init(params, cfg, jax.random.fold_in(key, 1), vision_position_init_std)
        return CLIPTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    ckpt, state, start = loop_lib.restore_or_init(init, model_dir, checkpoint_every, keep_checkpoints, quiet)

    step_fn = jax.jit(make_train_step(model, tx, schedule, max_logit_scale), donate_argnums=(0,))

    def make_batch(step):
        # the first sibling block alone until first_sibling_only_until, then all of them
        blocks = range(1, 2 if step < first_sibling_only_until * train_steps else group)
        idx, flip = batch_indices(data_seed, step, batch_size, len(images), mirror_prob, group - 1, blocks)
        batch_images = images[idx]
        batch_images[flip] = batch_images[flip, :, ::-1]
        return (np.where(flip[:, None], ids_m[idx], ids[idx]), np.where(flip[:, None], mask_m[idx], mask[idx]),
                batch_images)

    state, step = loop_lib.run_steps(
        state=state, start_step=start, train_steps=train_steps, make_batch=make_batch, step_fn=step_fn,
        ckpt=ckpt, writer=metrics_lib.create_writer(model_dir), examples_per_step=batch_size,
        log_every=log_every, checkpoint_every=checkpoint_every, quiet=quiet, what="CLIP",
        lr_binding="train_clip.learning_rate")
    say(f"evaluating: {eval_queries} held-out captions against a pool of {eval_pool} images")
    result = evaluate_retrieval(cfg, state.params, tok, eval_pool, eval_queries, eval_seed)
    result["train_steps"] = step
    with open(os.path.join(model_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
