"""`cm3leon generate` end to end on a briefly trained small model over the
shapes task data of tests/data/task_data.py: PNGs, grid, samples.json,
retrieval, same seed -> same bytes, image -> text, bad input."""
from __future__ import annotations

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from conftest import SMALL, run_cli  # noqa: E402
from task_data import shapes_task_data  # noqa: E402

from cm3leon_jax.data.tasks import SHAPES_DATA_ENV  # noqa: E402

PROMPT = "a small red circle above a large blue square"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    env = {SHAPES_DATA_ENV: shapes_task_data()}
    d = tmp_path_factory.mktemp("model")
    args = [a for a in SMALL if not a.startswith("--gin.MIXTURE_OR_TASK_NAME")]
    run_cli(["train", *args, "--gin.TASK_FEATURE_LENGTHS={'targets': 128}", "--gin.TRAIN_STEPS=8",
             f"--model_dir={d}"], env=env)
    return str(d), env


def _generate(trained, out, *extra):
    d, env = trained
    return run_cli(["generate", f"--model_dir={d}", f"--prompt={PROMPT}", "--num_samples=4", f"--out={out}",
                    *extra], env=env)


@pytest.mark.slow
def test_generate_writes_pngs_grid_and_samples_json(trained, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    _generate(trained, a, "--seed=3", "--num_retrieved=2", "--decoding=mixed", "--cfg_scale=3")
    _generate(trained, b, "--seed=3", "--num_retrieved=2", "--decoding=mixed", "--cfg_scale=3")
    _generate(trained, c, "--seed=4", "--num_retrieved=2", "--decoding=top_p", "--cfg_scale=3",
              "--temperature=2")
    rep = json.loads((a / "samples.json").read_text())
    row = rep["prompts"][0]
    assert row["prompt"] == PROMPT and len(row["samples"]) == 4 and len(row["retrieved"]) == 2
    scores = [s["clip_score"] for s in row["samples"]]
    assert scores == sorted(scores, reverse=True)                  # reranked by CLIP, best first
    assert {s["decoding"] for s in row["samples"]} == {"top_p", "cd_k"}  # mixed: both
    files = sorted(p.name for p in a.iterdir() if p.suffix == ".png")
    assert files == ["000_0.png", "000_1.png", "000_2.png", "000_3.png", "grid.png"]
    for name in files:                                              # same seed -> same bytes
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert any((a / n).read_bytes() != (c / n).read_bytes() for n in files if n != "grid.png")


@pytest.mark.slow
def test_image_to_text_and_bad_input(trained, tmp_path):
    d, env = trained
    _generate(trained, tmp_path / "g", "--num_retrieved=0", "--decoding=top_p")
    proc = run_cli(["generate", f"--model_dir={d}", f"--image={tmp_path / 'g' / '000_0.png'}",
                    "--prompt=Question: what is above?", "--decoding=greedy", "--quantize=int8"], env=env)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert isinstance(out["text"], str)
    bad = run_cli(["generate", f"--model_dir={tmp_path / 'nope'}", "--prompt=x", f"--out={tmp_path}"],
                  env=env, check=False)
    assert bad.returncode == 2 and "config.gin" in bad.stderr
    bad = run_cli(["generate", f"--model_dir={d}", f"--out={tmp_path}"], env=env, check=False)
    assert bad.returncode == 2 and "--prompt" in bad.stderr


@pytest.mark.slow
def test_num_retrieved_prepends_the_strategys_documents(trained, monkeypatch):
    """`--num_retrieved=2`: the prompt is the strategy's two documents (found
    here by brute-force inner products over the whole bank, then
    `strategy.select`) laid out text first, each ending in <eos>, then the
    query text and <break>; the unconditional stream keeps the documents
    and replaces only the query text by <mask:0>."""
    import numpy as np

    from cm3leon_jax import vocab as vocab_lib
    from cm3leon_jax.data.prepared import PreparedDataset
    from cm3leon_jax.retrieval import strategy
    from cm3leon_jax.retrieval.bank import load_bank
    from cm3leon_jax.sampling.generate import Generator, load_model

    import gin

    d, env = trained
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        g = Generator(load_model(d))  # parses the model dir's config.gin into the global gin config
    finally:
        gin.clear_config()
    got = g.retrieve(PROMPT, 2)

    bank = load_bank(g.b.bank_dir)
    key = g.clip.encode_texts([PROMPT])[0]
    scores = np.asarray(bank.embeddings, np.float64) @ key
    cands = [strategy.Candidate(int(i), float(s), bool(m[0]), bool(m[1]), f"{int(h):016x}")
             for i, s, m, h in zip(bank.ids, scores, bank.modalities, bank.content_hashes)]
    want = strategy.select(cands, 2)
    assert [int(x["id"]) for x in got] == [c.doc_id for c in want]
    np.testing.assert_allclose([x["score"] for x in got], [c.score for c in want], atol=1e-4)

    store = PreparedDataset(g.b.prepared_dir)
    ctx = []
    for c in want:
        doc = store.by_id(c.doc_id)
        ctx += list(doc["text_ids"]) + [vocab_lib.BREAK_ID] + list(doc["image_ids"]) + [vocab_lib.EOS_ID]
    cond, uncond = g.image_prompt(PROMPT, got)
    assert cond == ctx + g.text.encode(PROMPT).tolist() + [vocab_lib.BREAK_ID]
    assert uncond == ctx + [g.b.vocab.mask_id(0), vocab_lib.BREAK_ID]


def _generator(trained, monkeypatch):
    """A Generator over the trained model, its task data found through the
    environment the CLI runs got."""
    import gin

    from cm3leon_jax.sampling.generate import Generator, load_model

    d, env = trained
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        return Generator(load_model(d))
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_batched_prompts_give_the_samples_of_one_prompt_at_a_time(trained, monkeypatch):
    import numpy as np

    from cm3leon_jax.sampling.sampler import SamplingSettings

    g = _generator(trained, monkeypatch)
    settings = SamplingSettings("mixed", temperature=1.5, top_p=0.9, cfg_scale=3.0)
    other = "a large green star"
    batched = g.images_for_prompts([PROMPT, other], 3, settings, seed=11, batch_rows=4)  # rows split 4 + 2
    for i, prompt in enumerate([PROMPT, other]):
        _, codes, _ = g.images(prompt, 3, settings, seed=11 + i)
        np.testing.assert_array_equal(batched[i][1], codes)
    assert not np.array_equal(batched[0][1][0], batched[0][1][1])


@pytest.mark.slow
def test_mixed_decoding_draws_one_cd_k_sample_per_prompt(trained, monkeypatch):
    """CD-K is an argmax, so two CD-K samples of a prompt are one image
    twice. Mixed decoding gives CD-K to sample 1 only: that sample is the
    one `cd_k` decoding draws (at any seed), and every other sample is the
    top-p draw of the same seed and index."""
    import numpy as np

    from cm3leon_jax.sampling.sampler import SamplingSettings, mixed_sample_decoding

    g = _generator(trained, monkeypatch)
    assert [mixed_sample_decoding(j) for j in range(4)] == ["top_p", "cd_k", "top_p", "top_p"]
    kw = dict(temperature=1.5, top_p=0.9, cfg_scale=3.0)
    _, mixed, _ = g.images(PROMPT, 4, SamplingSettings("mixed", **kw), seed=5, num_retrieved=1)
    _, top_p, _ = g.images(PROMPT, 4, SamplingSettings("top_p", **kw), seed=5, num_retrieved=1)
    _, cd_k, _ = g.images(PROMPT, 2, SamplingSettings("cd_k", **kw), seed=9, num_retrieved=1)
    np.testing.assert_array_equal(cd_k[0], cd_k[1])          # deterministic: copies
    np.testing.assert_array_equal(mixed[1], cd_k[0])
    for j in (0, 2, 3):
        np.testing.assert_array_equal(mixed[j], top_p[j])
    assert len({m.tobytes() for m in mixed}) == 4            # four distinct candidates


def _coco_fixture(root, n=20):
    """A 20-image COCO 2014 layout (val2014/*.jpg + annotations/captions_val2014.json,
    several captions per image as COCO has) from the shapes corpus, plus one
    corrupt image."""
    from PIL import Image

    from cm3leon_jax.data import shapes

    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(n + 1):
        name = f"COCO_val2014_{1000 + i:012d}.jpg"
        images.append({"id": 1000 + i, "file_name": name})
        if i == n:
            (root / "val2014" / name).write_bytes(b"\xff\xd8 not a jpeg")
        else:
            ex = shapes.generate_example(4242, i, 48)
            Image.fromarray(ex.image).save(root / "val2014" / name, quality=95)
            anns += [{"id": 10 * i, "image_id": 1000 + i, "caption": ex.caption},
                     {"id": 10 * i + 1, "image_id": 1000 + i, "caption": "  " + ex.caption.upper() + " "}]
    anns.append({"id": 99999, "image_id": 1000 + n, "caption": "a broken file"})
    images.append({"id": 5000, "file_name": "no_caption.jpg"})  # uncaptioned: never selected
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images,
                                                                           "annotations": anns}))
    return root


def test_coco_selection_is_seeded_distinct_and_bounded(tmp_path):
    from cm3leon_jax.eval import coco

    caps = coco.load_captions(str(_coco_fixture(tmp_path / "coco")))
    assert len(caps) == 21 and 5000 not in caps
    a = coco.select_pairs(caps, 10, seed=0)
    assert a == coco.select_pairs(caps, 10, seed=0)
    assert [p.image_id for p in a] != [p.image_id for p in coco.select_pairs(caps, 10, seed=1)]
    assert len({p.image_id for p in a}) == 10
    assert all(p.caption in caps[p.image_id][1] for p in a)
    assert len(coco.select_pairs(caps, 500, seed=0)) == 21      # more than there are: all, with a warning
    with pytest.raises(ValueError, match="captions_val2014.json"):
        coco.load_captions(str(tmp_path / "nowhere"))
    (tmp_path / "bad" / "annotations").mkdir(parents=True)
    (tmp_path / "bad" / "annotations" / "captions_val2014.json").write_text("{\"images\": 3}")
    with pytest.raises(ValueError, match="not a COCO captions file"):
        coco.load_captions(str(tmp_path / "bad"))


@pytest.mark.slow
def test_eval_coco_protocol_on_a_20_image_fixture(trained, tmp_path):
    from task_data import tiny_models

    from cm3leon_jax.eval import fid as fid_lib
    from cm3leon_jax.eval import samples

    d, env = trained
    root = _coco_fixture(tmp_path / "coco")
    out = tmp_path / "out"
    args = ["eval", "coco", f"--model_dir={d}", f"--coco_dir={root}", "--num_images=30000", f"--out={out}",
            "--features=clip", f"--clip_dir={tiny_models()['clip_dir']}", "--num_samples=2", "--num_retrieved=1",
            "--batch_rows=8", "--no_progress"]
    proc = run_cli(args, env=env)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["num_images"] == 20 and res["skipped_real"] == {"corrupt or truncated image": 1}
    assert res["features"] == "clip" and res["fid"] > 0 and res["small_set"]
    assert "fewer than --num_images=30000" in proc.stderr and "biased" in proc.stderr
    fake = sorted(os.listdir(out / "fake"))
    assert fake == sorted(os.listdir(out / "real")) and len(fake) == 20
    real0 = samples.load_image(str(out / "real" / fake[0]))
    assert real0.shape == (32, 32, 3)                             # centre-cropped to the VQ-GAN's side
    sel = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(sel) == 21 and len({s["image_id"] for s in sel}) == 21
    # FID from the written dirs with the standalone command agrees
    extractor = fid_lib.make_extractor("clip", clip_dir=tiny_models()["clip_dir"])
    ref = fid_lib.fid_between(str(out / "real"), str(out / "fake"), extractor, progress=False)["fid"]
    assert abs(ref - res["fid"]) <= 1e-6 * max(1.0, ref)
    # a rerun continues (nothing regenerated); other flags on the same dir are refused
    before = {n: (out / "fake" / n).stat().st_mtime_ns for n in fake}
    again = json.loads(run_cli(args, env=env).stdout.strip().splitlines()[-1])
    assert again["fid"] == res["fid"]
    assert {n: (out / "fake" / n).stat().st_mtime_ns for n in fake} == before
    bad = run_cli([a if not a.startswith("--num_samples") else "--num_samples=1" for a in args], env=env,
                  check=False)
    assert bad.returncode == 2 and "other settings (num_samples)" in bad.stderr
