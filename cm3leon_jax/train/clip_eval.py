"""Held-out text-to-image retrieval of a CLIP on the shapes corpus, scored by
the shapes checker: the acceptance figure of `cm3leon clip train`
(`evaluate_retrieval`), on a stream the trainer never trains on."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
from cm3leon_jax.models.clip import CLIP, CLIPConfig, l2_normalize
from cm3leon_jax.train.clip_data import shapes_examples
from cm3leon_jax.train.clip_objective import normalize_pixels


def retrieval_top1(query_emb, query_captions: Sequence[str], image_emb, images,
                   own_index: Optional[Sequence[int]] = None) -> dict:
    """Text-to-image top-1 retrieval scored by the shapes checker.

    query_emb [Q, D] (caption embeddings), image_emb [M, D] (the pool), images
    uint8 [M, H, W, 3]. Each query's top-1 image is the argmax of the inner
    product of L2-normalised embeddings; the query is correct when
    `shapes_check.score(top1_image, caption)["all_correct"]`: the image shows
    every fact the caption states (count, colours, kinds, sizes, position,
    relations), whether or not it is the caption's own image. `own_index`
    (the pool index of each caption's own image) adds how often that exact
    image is top-1.
    """
    from cm3leon_jax.data import shapes_check

    sims = np.asarray(l2_normalize(jnp.asarray(query_emb))) @ np.asarray(l2_normalize(jnp.asarray(image_emb))).T
    top1 = np.argmax(sims, axis=1)
    correct = np.array([bool(shapes_check.score(images[j], c)["all_correct"])
                        for j, c in zip(top1, query_captions)])
    out = {"top1_accuracy": float(correct.mean()) if len(correct) else 0.0,
           "correct": correct.tolist(), "top1": top1.tolist()}
    if own_index is not None:
        out["own_image_top1"] = float(np.mean(top1 == np.asarray(own_index)))
    return out


def embed_texts(model: CLIP, params, tokenizer: CLIPTextTokenizer, captions, batch_size: int = 256):
    fn = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask, method=CLIP.encode_text))
    out = []
    for s in range(0, len(captions), batch_size):
        ids, mask = tokenizer(captions[s:s + batch_size])
        out.append(np.asarray(fn(params, ids, mask)))
    return np.concatenate(out)


def embed_images(model: CLIP, params, images, batch_size: int = 256):
    """uint8 images at the model's size -> projections [N, D]."""
    fn = jax.jit(lambda p, x: model.apply({"params": p}, normalize_pixels(x), method=CLIP.encode_image))
    return np.concatenate([np.asarray(fn(params, images[s:s + batch_size]))
                           for s in range(0, len(images), batch_size)])


def evaluate_retrieval(cfg: CLIPConfig, params, tokenizer: CLIPTextTokenizer, pool_size: int,
                       num_queries: int, seed: int) -> dict:
    """Held-out text-to-image retrieval on the shapes corpus (the acceptance
    figure of `cm3leon clip train`).

    Design: a pool of M = `pool_size` images, examples [0, M) of the stream
    `seed` (the trainer uses 12345, never trained on); the queries are the
    captions of its first Q = `num_queries` examples. Each caption and every
    pool image are embedded; the caption's top-1 image is the one with the
    largest inner product of L2-normalised embeddings among all M, and the
    query counts as correct when the shapes checker finds every fact of the
    caption in that image (`retrieval_top1`), so a different image showing
    the same facts is right too. Reported: top-1 accuracy, the same by number
    of shapes in the caption, how often the caption's own image is top-1, and
    the checker's accuracy on the own images (the ceiling, ~1.0).
    """
    from cm3leon_jax.data import shapes
    from cm3leon_jax.data import shapes_check

    if not 0 < num_queries <= pool_size:
        raise ValueError(f"train_clip.eval_queries={num_queries} must be in [1, eval_pool={pool_size}]: "
                         "the queries are captions of the pool's own examples")
    model = CLIP(cfg)
    images, captions = shapes_examples(seed, 0, pool_size, cfg.image_size)
    queries = captions[:num_queries]
    result = retrieval_top1(embed_texts(model, params, tokenizer, queries), queries,
                            embed_images(model, params, images), images, own_index=np.arange(num_queries))
    correct = np.asarray(result["correct"])
    n_shapes = np.array([len(shapes.caption_facts(c).shapes) for c in queries])
    by_count = {f"top1_accuracy_{k}_shapes": float(correct[n_shapes == k].mean())
                for k in sorted(set(n_shapes.tolist()))}
    oracle = np.mean([shapes_check.score(images[i], c)["all_correct"] for i, c in enumerate(queries)])
    return {"eval_pool": pool_size, "eval_queries": num_queries, "eval_seed": seed,
            "top1_accuracy": result["top1_accuracy"], **by_count,
            "own_image_top1": result["own_image_top1"], "checker_accuracy_own_images": float(oracle)}
