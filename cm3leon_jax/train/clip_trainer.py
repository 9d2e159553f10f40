"""Training a small CLIP on the shapes corpus (`cm3leon clip train`).

The paper's retriever is a frozen, pretrained CLIP ViT-B/32 (Sec. 2.1). The
embedded demo has no such checkpoint, so this trains one of our `CLIP`
bi-encoders from scratch on the shapes corpus with CLIP's objective: the
symmetric InfoNCE loss over a batch of N (caption, image) pairs (cross
entropy of each caption against the N images and of each image against the
N captions), logits = exp(t) x cosine similarity with the log temperature t
learned (the model's `logit_scale`) and clipped at ln 100, as CLIP does, so
the logits never exceed 100.

Data: a fixed training set rendered once at start from the shapes stream
`data_seed` (rendering on the fly would cost about as much as a train step
on a 2-core CPU): S scenes and, for each, one-edit "siblings"
(`sibling_scene`: the same scene with a shape moved or the layout flipped,
or with one kind changed, ...). A batch is B/2 pairs of a scene and one of
its siblings, so every example meets a hard negative that differs from it in
one stated fact; random batches almost never do, and a CLIP trained on them
learns colours and sizes but not where shapes are (benchmarks/RESULTS.md,
"CLIP on shapes"). Batches are a pure function of the step (resuming needs
nothing but the step), and each pair is mirrored left-right with probability
`mirror_prob`: every shape kind is left-right symmetric, so the mirrored
image is exactly the render of the mirrored scene, whose caption swaps
"left" and "right" (`mirror_caption`). Held-out evaluation uses another
stream (`eval_seed`), never trained on.

Initialisation: OpenAI CLIP's scales rather than transformers' 0.02
(`openai_scaled_init`); at width 64 the latter leaves a CLIP that, after the
same steps, retrieves a third as well.

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

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm3leon_jax import model_dir_lock
from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
from cm3leon_jax.models import clip_convert
from cm3leon_jax.models.clip import (CLIP, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, TEXT_TOKENIZER_SUBDIR, CLIPConfig,
                                     l2_normalize, tiny_config)
from cm3leon_jax.train import loop as loop_lib
from cm3leon_jax.train import metrics as metrics_lib
from cm3leon_jax.train import optimizer as optimizer_lib

MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clips exp(logit_scale) at 100


@flax.struct.dataclass
class CLIPTrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


# -- the objective -----------------------------------------------------------------

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


# -- data ----------------------------------------------------------------------------

_LEFT_RIGHT = {"left": "right", "right": "left"}


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored scene: "left" and "right" swap
    in positions ("in the top left" -> "in the top right") and relations
    ("to the left of" -> "to the right of"); read and rebuilt through the
    corpus grammar (`shapes.caption_facts` / `make_caption`)."""
    from cm3leon_jax.data import shapes

    def swap(phrase):
        return None if phrase is None else " ".join(_LEFT_RIGHT.get(w, w) for w in phrase.split())

    facts = shapes.caption_facts(caption)
    return shapes.make_caption(shapes.CaptionFacts(
        shapes=tuple(dataclasses.replace(s, position=swap(s.position)) for s in facts.shapes),
        relations=tuple(dataclasses.replace(r, relation=swap(r.relation)) for r in facts.relations)))


# Minimal edits that make a hard negative of a scene (`sibling_scene`).
ATTRIBUTE_EDITS = ("kind", "color", "shrink", "swap_colors", "swap_kinds")
SPATIAL_EDITS = ("move", "flip_vertical", "transpose")
KIND_EDITS = ("kind", "swap_kinds")
EDIT_GROUPS = {"spatial": SPATIAL_EDITS, "attribute": ATTRIBUTE_EDITS, "kind": KIND_EDITS}
_FLIP_VERTICAL = {"above": "below", "below": "above", "left of": "left of", "right of": "right of"}
_TRANSPOSE = {"above": "left of", "below": "right of", "left of": "above", "right of": "below"}


def sibling_scene(specs, relations, rng: np.random.Generator, first: str = "spatial"):
    """(specs, relations) of a scene one edit away from the given one, whose
    caption differs, or None when no edit changes it.

    The edits keep the scene valid by construction (bounding boxes stay
    inside the image, apart, and relation margins hold). Attribute edits:
    change one shape's kind (every kind fills the same box) or colour; shrink
    a large shape to small about its centre; swap the colours or kinds of two
    shapes (the binding of attributes to shapes). Spatial edits: move a lone
    shape to another grid cell (placed as the generator places it); mirror
    the scene top-bottom (y -> 1 - y) or transpose it (x <-> y), re-rendered,
    so shapes stay upright while positions and relations change. The group
    `first` ("spatial", "attribute" or "kind": the kind edits alone) is tried
    first, then the others, each in random order, until the caption changes. A scene and its sibling in one batch
    are a hard negative both ways: they differ in one stated fact or binding.
    Random batches almost never hold two lone shapes alike but for their
    cell, so without spatial siblings a CLIP learns to ignore where shapes are.
    """
    from cm3leon_jax.data import shapes

    def caption(sp, rel):
        return shapes.make_caption(shapes.ShapesExample(None, "", tuple(sp), tuple(rel)).facts)

    def other(choices, current):
        return str(rng.choice([c for c in choices if c != current]))

    specs, relations = list(specs), list(relations)
    original = caption(specs, relations)
    n = len(specs)
    if first not in EDIT_GROUPS:
        raise ValueError(f"sibling edit group {first!r}; expected one of {tuple(EDIT_GROUPS)}")
    groups = [EDIT_GROUPS[first]] + [g for g in (ATTRIBUTE_EDITS, SPATIAL_EDITS) if g is not EDIT_GROUPS[first]]
    for edit in [e for group in groups for e in rng.permutation(group)]:
        new_specs, new_relations = list(specs), list(relations)
        i = int(rng.integers(n))
        j = (i + 1 + int(rng.integers(n - 1))) % n if n > 1 else i
        if edit == "kind":
            new_specs[i] = dataclasses.replace(specs[i], kind=other(shapes.KINDS, specs[i].kind))
        elif edit == "color":
            new_specs[i] = dataclasses.replace(specs[i], color=other(tuple(shapes.COLORS), specs[i].color))
        elif edit == "shrink":
            large = [k for k, sp in enumerate(specs) if sp.size != "small"]
            if not large:
                continue
            k = int(rng.choice(large))
            new_specs[k] = dataclasses.replace(specs[k], size="small",
                                               extent=float(rng.uniform(*shapes.SIZES["small"])))
        elif edit == "move":
            if n != 1:
                continue  # only a lone shape's position is stated
            grid = len(shapes.POSITIONS)
            cells = [(r, c) for r in range(grid) for c in range(grid)
                     if shapes.POSITIONS[r][c] != specs[0].position]
            row, col = cells[int(rng.integers(len(cells)))]
            reach = specs[0].extent / 2 + shapes.EDGE_MARGIN
            bounds = [(max(cell / grid + shapes.POSITION_MARGIN, reach),
                       min((cell + 1) / grid - shapes.POSITION_MARGIN, 1 - reach)) for cell in (col, row)]
            if any(lo > hi for lo, hi in bounds):
                continue
            new_specs[0] = dataclasses.replace(
                specs[0], center=tuple(float(rng.uniform(lo, hi)) for lo, hi in bounds))
        elif edit in ("swap_colors", "swap_kinds"):
            field = "color" if edit == "swap_colors" else "kind"
            new_specs[i] = dataclasses.replace(specs[i], **{field: getattr(specs[j], field)})
            new_specs[j] = dataclasses.replace(specs[j], **{field: getattr(specs[i], field)})
        else:
            table = _FLIP_VERTICAL if edit == "flip_vertical" else _TRANSPOSE
            new_specs = [dataclasses.replace(sp, center=((sp.center[0], 1.0 - sp.center[1])
                                                          if edit == "flip_vertical" else sp.center[::-1]))
                         for sp in specs]
            new_relations = [dataclasses.replace(r, relation=table[r.relation]) for r in relations]
        if caption(new_specs, new_relations) != original:
            return new_specs, new_relations
    return None


def shapes_examples_with_siblings(seed: int, num_scenes: int, resolution: int,
                                  sibling_edits: Sequence[str] = ("spatial", "attribute")):
    """(images [G S, R, R, 3], captions), G = 1 + len(sibling_edits), S =
    num_scenes: examples [0, S) of the shapes stream `seed`, then for each
    entry k of `sibling_edits` a sibling of every scene whose edit is drawn
    from that group first (`sibling_scene`, its own generator per scene and
    k). Example i + k S is scene i's k-th sibling (k >= 1): a group of G is
    one scene and its one-edit variants. A scene no edit changes is its own
    sibling (never: a kind change always changes the caption)."""
    from cm3leon_jax.data import shapes

    scenes = [shapes.generate_example(seed, i, resolution) for i in range(num_scenes)]
    images, captions = [e.image for e in scenes], [e.caption for e in scenes]
    for k, first in enumerate(sibling_edits):
        for i, e in enumerate(scenes):
            sib = sibling_scene(e.shapes, e.relations, np.random.default_rng([int(seed), i, 1 + k]), first)
            if sib is None:
                images.append(e.image)
                captions.append(e.caption)
                continue
            images.append(shapes.render(sib[0], resolution))
            captions.append(shapes.make_caption(shapes.ShapesExample(None, "", tuple(sib[0]),
                                                                     tuple(sib[1])).facts))
    return np.stack(images), captions


def shapes_examples(seed: int, start: int, num: int, resolution: int):
    """(uint8 images [num, R, R, 3], captions) of examples [start, start + num)
    of the shapes stream `seed`."""
    from cm3leon_jax.data import shapes

    examples = [shapes.generate_example(seed, i, resolution) for i in range(start, start + num)]
    return np.stack([e.image for e in examples]), [e.caption for e in examples]


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int, mirror_prob: float,
                  num_sibling_blocks: int = 0, blocks: Sequence[int] = (1,)):
    """(example indices [B], mirror flags [B]) of the batch at `step`: a pure
    function of (seed, step), distinct examples within a batch.

    With siblings (`num_sibling_blocks` K > 0) the examples are laid out as
    `shapes_examples_with_siblings` writes them (S = num_examples / (1 + K)
    scenes, then K blocks of siblings) and the batch is B / 2 pairs: a scene
    and one of its siblings, from a block drawn uniformly from `blocks`
    (1-based), each pair mirrored or not as one."""
    rng = np.random.default_rng([int(seed), int(step)])
    if num_sibling_blocks == 0:
        idx = rng.choice(num_examples, size=batch_size, replace=False)
        return idx, rng.random(batch_size) < mirror_prob
    scenes = num_examples // (1 + num_sibling_blocks)
    first = rng.choice(scenes, size=batch_size // 2, replace=False)
    block = np.asarray(blocks)[rng.integers(len(blocks), size=batch_size // 2)]
    flip = rng.random(batch_size // 2) < mirror_prob
    return np.concatenate([first, first + block * scenes]), np.concatenate([flip, flip])


def prepare_text_tokenizer(model_dir: str, captions: Sequence[str], max_length: int,
                           text_tokenizer: Optional[str], bpe_vocab_size: int) -> CLIPTextTokenizer:
    """The BPE in `model_dir/text_tokenizer/`: kept when there (a resumed
    run), else copied from `text_tokenizer` (a dir or tokenizer.json), else
    trained on `captions` (a byte-level BPE of `bpe_vocab_size` ids)."""
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
                    tok_lib.train_text_tokenizer([corpus], bpe_vocab_size, out)
    return CLIPTextTokenizer.from_text_tokenizer(out, max_length)


# -- held-out retrieval ---------------------------------------------------------------

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


# -- the training run -----------------------------------------------------------------

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
