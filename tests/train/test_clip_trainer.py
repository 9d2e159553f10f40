"""The CLIP trainer: the InfoNCE loss against NumPy, the mirrored-caption
augmentation against the shapes checker, training that lowers the loss and
writes a loadable model dir, exact resume, the retrieval eval on a case with a
known answer, and the CLI's errors."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.data import shapes
from cm3leon_jax.data import shapes_check
from cm3leon_jax.models import clip_convert
from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
from cm3leon_jax.models.clip import CLIP, preprocess_images, tiny_config
from cm3leon_jax.train import clip_data, clip_eval, clip_objective
from cm3leon_jax.train import clip_trainer as ct
from conftest import REPO, run_cli

# 32x32 images, patch 16, width 32, one layer: trains in seconds.
MICRO = dict(image_size=32, patch_size=16, text_hidden_size=32, text_intermediate_size=64, text_num_layers=1,
             text_num_heads=2, vision_hidden_size=32, vision_intermediate_size=64, vision_num_layers=1,
             vision_num_heads=2, projection_dim=32, max_position_embeddings=24)


def _train(model_dir, steps, **kw):
    args = dict(model_dir=str(model_dir), train_steps=steps, config=tiny_config(**MICRO), bpe_vocab_size=320,
                train_examples=60, batch_size=12, learning_rate=3e-3, warmup_steps=2, checkpoint_every=5,
                log_every=5, eval_pool=24, eval_queries=8, quiet=True)
    args.update(kw)
    return ct.train_clip(**args)


def _log_softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def test_contrastive_loss_matches_numpy_and_clips_the_temperature():
    rng = np.random.default_rng(0)
    text, image = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    tn = text / np.linalg.norm(text, axis=1, keepdims=True)
    im = image / np.linalg.norm(image, axis=1, keepdims=True)
    for logit_scale, used in ((1.5, 1.5), (7.0, np.log(100.0)), (-2.0, 0.0)):
        logits = np.exp(used) * tn @ im.T
        ref = -(np.trace(_log_softmax(logits, 1)) + np.trace(_log_softmax(logits, 0))) / 6
        loss, metrics = clip_objective.contrastive_loss(jnp.asarray(text), jnp.asarray(image), jnp.asarray(logit_scale))
        np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
        np.testing.assert_allclose(float(metrics["temperature_inverse"]), np.exp(used), rtol=1e-6)
    # by hand: two orthogonal pairs at scale ln 2 -> logits [[2, 0], [0, 2]]
    eye = jnp.eye(2)
    loss, m = clip_objective.contrastive_loss(eye, eye, jnp.log(2.0))
    np.testing.assert_allclose(float(loss), np.log(1 + np.exp(-2.0)), rtol=1e-6)
    assert float(m["accuracy_text_to_image"]) == 1.0 == float(m["accuracy_image_to_text"])


def test_mirrored_caption_describes_the_mirrored_image():
    assert (clip_data.mirror_caption("a small red circle in the top left")
            == "a small red circle in the top right")
    assert (clip_data.mirror_caption("a large blue star to the left of a small red square above a small green star")
            == "a large blue star to the right of a small red square above a small green star")
    assert clip_data.mirror_caption("a small red circle at the top") == "a small red circle at the top"
    images, captions = clip_data.shapes_examples(3, 0, 40, 64)
    changed = 0
    for image, caption in zip(images, captions):
        mirrored = clip_data.mirror_caption(caption)
        assert shapes_check.score(image[:, ::-1], mirrored)["all_correct"], caption
        if mirrored != caption:
            changed += 1
            assert not shapes_check.score(image[:, ::-1], caption)["all_correct"], caption
    assert changed > 5


def test_siblings_are_true_to_their_images_and_one_edit_away():
    scenes = 40
    images, captions = clip_data.shapes_examples_with_siblings(4, scenes, 64, ("spatial", "attribute"))
    assert len(images) == len(captions) == 3 * scenes
    originals, _ = clip_data.shapes_examples(4, 0, scenes, 64)
    np.testing.assert_array_equal(images[:scenes], originals)
    false_of_sibling, lone = 0, 0
    for i in range(scenes):
        scene = shapes.caption_facts(captions[i])
        for k, group in ((1, "spatial"), (2, "attribute")):
            j = i + k * scenes
            assert captions[j] != captions[i]
            assert shapes_check.score(images[j], captions[j])["all_correct"], captions[j]
            false_of_sibling += not shapes_check.score(images[j], captions[i])["all_correct"]
            sib = shapes.caption_facts(captions[j])
            assert len(sib.shapes) == len(scene.shapes)
            if len(scene.shapes) == 1:  # a lone shape: spatial moves it, attribute keeps its cell
                lone += 1
                moved = sib.shapes[0].position != scene.shapes[0].position
                same = [getattr(sib.shapes[0], f) == getattr(scene.shapes[0], f) for f in ("kind", "color", "size")]
                assert (moved and all(same)) if group == "spatial" else (not moved and not all(same))
    assert false_of_sibling >= 2 * scenes - 2  # identical shapes can make an edit symmetric (rare)
    assert lone > 0
    with pytest.raises(ValueError, match="sibling edit group"):
        ex = shapes.generate_example(4, 0)
        clip_data.sibling_scene(ex.shapes, ex.relations, np.random.default_rng(0), "colour")


def test_in_graph_pixels_match_preprocess_images():
    images, _ = clip_data.shapes_examples(0, 0, 3, 64)
    np.testing.assert_allclose(np.asarray(clip_objective.normalize_pixels(images)),
                               preprocess_images(images, tiny_config()), atol=1e-6)


def test_batches_are_a_function_of_the_step():
    a = clip_data.batch_indices(0, 7, 16, 64, 0.5)
    b = clip_data.batch_indices(0, 7, 16, 64, 0.5)
    c = clip_data.batch_indices(0, 8, 16, 64, 0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert len(set(a[0].tolist())) == 16 and 0 < a[1].sum() < 16
    # 20 scenes, then two sibling blocks: pairs of a scene and one of its siblings
    idx, flip = clip_data.batch_indices(0, 7, 12, 60, 0.5, num_sibling_blocks=2, blocks=(1,))
    np.testing.assert_array_equal(idx[6:], idx[:6] + 20)
    np.testing.assert_array_equal(flip[6:], flip[:6])
    assert (idx[:6] < 20).all() and len(set(idx.tolist())) == 12
    offsets = np.concatenate([np.diff(clip_data.batch_indices(0, s, 12, 60, 0.5, 2, (1, 2))[0].reshape(2, 6), axis=0)[0]
                              for s in range(5)])
    assert set(offsets.tolist()) == {20, 40}


def test_retrieval_top1_on_a_known_answer():
    images, captions = clip_data.shapes_examples(12345, 0, 40, 64)
    # a caption whose mirrored image shows the same facts (no left/right in it)
    q2 = next(i for i, c in enumerate(captions)
              if len(shapes.caption_facts(c).shapes) > 1 and clip_data.mirror_caption(c) == c)
    pool = np.concatenate([images[:3], images[q2:q2 + 1, :, ::-1]])  # pool index 3: the mirror
    image_emb = np.eye(4, 5) * np.array([[1.0], [2.0], [0.5], [3.0]])  # norms must not matter
    queries = [captions[0], captions[1], captions[q2]]
    query_emb = np.stack([image_emb[0] * 0.1, image_emb[2] + 0.01, image_emb[3]])
    # query 0 -> its own image (right); query 1 -> image 2, another scene
    # (wrong); query 2 -> the mirror of its image, not its own (right)
    assert not shapes_check.score(images[2], captions[1])["all_correct"]
    out = clip_eval.retrieval_top1(query_emb, queries, image_emb, pool, own_index=[0, 1, 2])
    assert out["top1"] == [0, 2, 3]
    assert out["correct"] == [True, False, True]
    np.testing.assert_allclose(out["top1_accuracy"], 2 / 3)
    np.testing.assert_allclose(out["own_image_top1"], 1 / 3)


def test_training_lowers_the_loss_and_writes_a_loadable_model_dir(tmp_path):
    # 16 pairs, every one in every batch: memorised within 60 steps (at
    # chance, ln 16 = 2.77, the loss of collapsed embeddings, it would stall)
    result = _train(tmp_path, 60, train_examples=16, batch_size=16, sibling_edits=(), mirror_prob=0.0,
                    warmup_steps=5,
                    log_every=1, checkpoint_every=60, eval_pool=16, eval_queries=8)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.7 * first and last < 0.8 * np.log(16), (first, last)
    assert {"loss", "learning_rate", "temperature_inverse", "grad_norm", "examples_per_sec"} <= set(rows[0])
    assert all(r["temperature_inverse"] <= 100.0 + 1e-3 for r in rows)
    saved = json.load(open(tmp_path / "eval.json"))
    assert saved == result and saved["eval_pool"] == 16 and saved["eval_queries"] == 8
    assert 0.0 <= saved["top1_accuracy"] <= 1.0 and saved["checker_accuracy_own_images"] == 1.0
    # the dir loads with no extra arguments and embeds
    cfg, params = clip_convert.load_clip(str(tmp_path))
    tok = CLIPTextTokenizer.from_model_dir(str(tmp_path))
    assert tok.bpe is not None and cfg.vocab_size == tok.vocab_size and cfg.image_size == 32
    captions = ["a small red circle in the top left", "a large blue star above a small green square"]
    ids, mask = tok(captions)
    assert (mask.sum(1) < cfg.max_position_embeddings).all()  # whole captions, not truncated
    text = CLIP(cfg).apply({"params": params}, ids, mask, method=CLIP.encode_text)
    images, _ = clip_data.shapes_examples(1, 0, 2, 32)
    image = CLIP(cfg).apply({"params": params}, preprocess_images(images, cfg), method=CLIP.encode_image)
    assert text.shape == image.shape == (2, 32) and np.isfinite(np.asarray(text)).all()
    np.testing.assert_allclose(np.asarray(image), clip_eval.embed_images(CLIP(cfg), params, images), atol=1e-5)


def test_resume_continues_from_the_checkpoint_exactly(tmp_path, monkeypatch):
    full = _train(tmp_path / "full", 10)
    # Interrupt the same run while it draws step 7's batch (the last
    # checkpoint is step 5), then rerun the same call: it resumes from 5.
    real = clip_data.batch_indices
    seen = []

    def interrupted(seed, step, *a):
        seen.append(step)
        if step == 7:
            raise KeyboardInterrupt
        return real(seed, step, *a)

    monkeypatch.setattr(ct, "batch_indices", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "split", 10)
    seen.clear()
    monkeypatch.setattr(ct, "batch_indices", lambda seed, step, *a: seen.append(step) or real(seed, step, *a))
    resumed = _train(tmp_path / "split", 10)
    assert seen == [5, 6, 7, 8, 9]
    assert resumed["train_steps"] == 10 and resumed == full
    _, p_full = clip_convert.load_clip(str(tmp_path / "full"))
    _, p_split = clip_convert.load_clip(str(tmp_path / "split"))
    for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_split)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_settings_name_the_binding(tmp_path):
    with pytest.raises(ValueError, match="data_seed"):
        _train(tmp_path, 2, data_seed=12345)
    with pytest.raises(ValueError, match="eval_queries"):
        clip_eval.evaluate_retrieval(tiny_config(), None, None, pool_size=10, num_queries=20, seed=1)
    with pytest.raises(ValueError, match="sibling_edits"):
        _train(tmp_path, 2, train_examples=64)  # not whole groups of a scene and 2 siblings
    with pytest.raises(ValueError, match="text_tokenizer"):
        _train(tmp_path, 2, text_tokenizer=str(tmp_path / "nope"))


def test_cli_help_is_fast_and_missing_model_dir_is_one_error(tmp_path):
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "cm3leon")
    for args in (["clip", "--help"], ["clip", "train", "--help"]):
        t0 = time.perf_counter()
        proc = subprocess.run([exe, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and time.perf_counter() - t0 < 2.0
    assert "--gin_file" in proc.stdout and "--model_dir" in proc.stdout
    proc = run_cli(["clip", "train", "--gin_file=gin/clip_shapes.gin"], check=False)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "MODEL_DIR" in lines[0], proc.stderr


@pytest.mark.slow
def test_cli_trains_with_the_shipped_gin_file(tmp_path):
    micro = [f"--gin.CLIPConfig.{k}={v!r}" for k, v in MICRO.items()]
    proc = run_cli(["clip", "train", "--gin_file=gin/clip_shapes.gin", f"--model_dir={tmp_path}",
                    "--gin.train_clip.train_steps=4", "--gin.train_clip.train_examples=60",
                    "--gin.train_clip.batch_size=6", "--gin.train_clip.log_every=2",
                    "--gin.train_clip.eval_pool=16", "--gin.train_clip.eval_queries=4", *micro])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["train_steps"] == 4 and report["eval_pool"] == 16 and report["eval_queries"] == 4
    for name in ("config.gin", "clip_config.json", "eval.json", "metrics.jsonl", "text_tokenizer/tokenizer.json"):
        assert os.path.exists(tmp_path / name), name
