"""The corpus recipes in data/ (bash scripts running the project's own
`cm3leon` commands), each run end to end on a small fixture written here in
the corpus's official layout (COCO 2014/2017 annotations + images, VQA v2,
InstructPix2Pix, img2dataset tar shards) with random-weight tokenizers and
CLIP, up to a registered SeqIO task that yields a training batch through the
binding the recipe prints. What the recipes read is checked against the
fixture: the captions, records and skips it holds by construction."""
from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import tarfile

import gin
import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
DATA = os.path.join(REPO, "data")
sys.path.insert(0, os.path.join(TESTS, "data"))
sys.path.insert(0, os.path.join(TESTS, "retrieval"))
from task_data import make_bpe, make_vq_dir  # noqa: E402
from tiny_clip import shared_clip_dir  # noqa: E402

RECIPES = ("coco_captions", "coco30k", "webdataset", "instructpix2pix", "vqa", "coco_detection")
COCO_IDS = (9, 25, 30, 34, 36)
MISSING_ID = 42  # in the annotations, its file absent
WORDS = ["a", "photo", "of", "dog", "cat", "on", "grass", "red", "car", "make", "it", "snowy", "what", "colour",
         "is", "the", "yes", "no", "two", "person"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("recipe_models")
    return {"vqgan_dir": make_vq_dir(str(base / "vqgan")),
            "text_tokenizer": make_bpe(str(base / "text"), 600, extra_lines=[" ".join(WORDS)] * 20),
            "clip_dir": shared_clip_dir()}


def _image(path, seed, size=(64, 48)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


def _caption(image_id, k):
    return f"a photo of a {WORDS[3 + image_id % 3]} on grass number {image_id} view {k}"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """COCO 2017 (train2017/000000000009.jpg, annotations/captions_train2017.json,
    instances_train2017.json) and, for VQA v2, COCO 2014's file names
    (train2014/COCO_train2014_000000000009.jpg)."""
    root = tmp_path_factory.mktemp("coco")
    for split, name in (("train2017", "{:012d}.jpg"), ("train2014", "COCO_train2014_{:012d}.jpg")):
        (root / split).mkdir()
        for i in COCO_IDS:
            _image(root / split / name.format(i), i)
    (root / "annotations").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 64, "height": 48} for i in COCO_IDS + (MISSING_ID,)]
    captions = [{"id": 100 * i + k, "image_id": i, "caption": _caption(i, k)}
                for k in range(2) for i in COCO_IDS + (MISSING_ID,)]
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": captions}))
    boxes = [{"id": 1000 + i, "image_id": i, "category_id": 1 + i % 2, "bbox": [10.0, 5.0, 30.0, 20.0], "iscrowd": 0,
              "area": 600.0} for i in COCO_IDS]
    boxes.append({"id": 2000, "image_id": 9, "category_id": 1, "bbox": [0, 0, 64, 48], "iscrowd": 1, "area": 1.0})
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"images": images, "annotations": boxes, "categories": [{"id": 1, "name": "person"},
                                                               {"id": 2, "name": "dog"}]}))
    return root


def _env():
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               JAX_PLATFORMS="cpu")
    for k in ("VQGAN_DIR", "TEXT_TOKENIZER", "CLIP_DIR"):
        env.pop(k, None)
    return env


def _run(recipe, *args, check=True):
    proc = subprocess.run(["bash", os.path.join(DATA, recipe + ".sh"), *map(str, args)], env=_env(),
                          capture_output=True, text=True, cwd=str(REPO), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{recipe}.sh exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _model_flags(models, clip=True):
    flags = [f"--vqgan_dir={models['vqgan_dir']}", f"--text_tokenizer={models['text_tokenizer']}"]
    return flags + ([f"--clip_dir={models['clip_dir']}"] if clip else []) + ["--no_progress"]


def _report_after(stdout, command):
    """The JSON line a `cm3leon` command printed after the recipe echoed it."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("+ cm3leon " + command))
    return next(json.loads(line) for line in lines[start + 1:] if line.startswith("{"))


def _bind_printed_command(stdout, command, which=-1):
    """Binds the --gin.NAME=VALUE flags of a `cm3leon COMMAND` line the
    recipe printed (what a user pastes; the last one by default) and
    returns that line's flags, the bindings as {NAME: VALUE}."""
    from cm3leon_jax.data import pipeline

    line = [x for x in stdout.splitlines() if x.startswith(f"cm3leon {command} ")][which]
    args = shlex.split(line)[2:]
    pipeline.import_task_modules()  # registers the configurables the bindings name
    gin.clear_config()
    bindings = {}
    for a in args:
        if a.startswith("--gin."):
            name, value = a[len("--gin."):].split("=", 1)
            gin.parse_config(f"{name} = {value}")
            bindings[name] = value
    return args, bindings


def _batch(task, lengths, pack=True):
    from cm3leon_jax.data import pipeline

    try:
        return next(pipeline.TrainIterator(task, lengths, 2, seed=0, pack=pack))
    finally:
        gin.clear_config()


def _check_cm3_task_batch(stdout, data_dir):
    from cm3leon_jax.data.prepared import PreparedDataset

    args, _ = _bind_printed_command(stdout, "train")
    assert f"--gin.corpus_data_dir.path='{data_dir}'" in args and "--gin_file=gin/cm3leon_350m.gin" in args
    vocab = PreparedDataset(os.path.join(data_dir, "prepared")).vocabulary
    batch = _batch("corpus_cm3_retrieval", {"targets": 64})
    tokens = batch["decoder_target_tokens"]
    assert tokens.shape == (2, 64) and batch["decoder_loss_weights"].sum() > 0
    first_code = vocab.num_special_tokens
    assert ((tokens >= first_code) & (tokens < first_code + vocab.image_codebook_size)).any()  # image codes
    assert (tokens >= first_code + vocab.image_codebook_size).any()  # text
    assert tokens.max() < vocab.size


def _prepared_captions(data_dir):
    from cm3leon_jax.data.prepared import PreparedDataset

    ds = PreparedDataset(os.path.join(data_dir, "prepared"))
    return sorted(ds[i]["caption"] for i in range(len(ds)))


def _sft_manifest(out):
    with open(os.path.join(out, "sft.json")) as f:
        return json.load(f)


def _weighted_rows(batch):
    return [tuple(int(t) for t, w in zip(row, wts) if w > 0)
            for row, wts in zip(batch["decoder_target_tokens"], batch["decoder_loss_weights"])]


def _encoded(models, out, texts):
    from cm3leon_jax import vocab as vocab_lib
    from cm3leon_jax.data.tokenizers import TextTokenizer

    vocab = vocab_lib.UnifiedVocabulary(**_sft_manifest(out)["vocabulary"])
    tok = TextTokenizer(models["text_tokenizer"], vocab)
    return {tuple(int(t) for t in tok.encode(x)) + (vocab_lib.EOS_ID,) for x in texts}


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize("recipe", RECIPES)
def test_usage_line_when_arguments_are_missing(recipe):
    proc = _run(recipe, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"usage: data/{recipe}.sh --")
    assert "error: missing --" in proc.stderr
    helped = _run(recipe, "--help", check=False)
    assert helped.returncode == 0 and helped.stdout.startswith("usage:")
    bad = _run(recipe, "--no_such_flag=1", check=False)
    assert bad.returncode == 2 and "unknown flag --no_such_flag" in bad.stderr


def test_layout_errors_name_the_missing_file(tmp_path, models):
    proc = _run("coco_captions", f"--coco_dir={tmp_path}", f"--out={tmp_path / 'out'}", *_model_flags(models),
                check=False)
    assert proc.returncode == 1
    assert f"{tmp_path}/annotations/captions_train2017.json not found" in proc.stderr
    proc = _run("coco30k", f"--coco_dir={tmp_path}", f"--model_dir={tmp_path}", f"--out={tmp_path / 'o'}",
                "--inception_weights=w.pth", check=False)
    assert proc.returncode == 1 and "annotations/captions_val2014.json not found" in proc.stderr
    proc = _run("vqa", f"--vqa_dir={tmp_path}", f"--coco_dir={tmp_path}", f"--out={tmp_path / 'o'}",
                *_model_flags(models, clip=False), check=False)
    assert proc.returncode == 1 and "v2_OpenEnded_mscoco_train2014_questions.json not found" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the layout is checked


# ---------------------------------------------------------------- pretraining recipes


@pytest.mark.slow
def test_webdataset_shards_to_a_retrieval_task(tmp_path, models):
    shards = tmp_path / "cc3m"
    shards.mkdir()
    expected = []
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{s:05d}{i:04d}"
                path = tmp_path / "x.jpg"
                _image(path, 10 * s + i)
                caption = f"a red car on grass number {s} {i}"
                members = {"jpg": path.read_bytes(), "txt": caption.encode(), "json": b"{}"}
                if (s, i) == (1, 2):
                    del members["txt"]  # image only: skipped by prepare
                else:
                    expected.append(caption)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "task"
    proc = _run("webdataset", f"--shards={shards}/{{00000..00001}}.tar", f"--out={out}", *_model_flags(models),
                "--k=4")
    assert proc.stdout.startswith("+ cm3leon task-data --source=webdataset:")
    report = _report_after(proc.stdout, "task-data")
    assert report["prepare"]["written"] == 5 and sum(report["prepare"]["skipped"].values()) == 1
    assert _prepared_captions(str(out)) == sorted(expected)
    _check_cm3_task_batch(proc.stdout, str(out))


@pytest.mark.slow
def test_coco_captions_to_a_retrieval_task(tmp_path, models, coco):
    out = tmp_path / "coco_task"
    proc = _run("coco_captions", f"--coco_dir={coco}", f"--out={out}", *_model_flags(models), "--k=3")
    convert = _report_after(proc.stdout, "sft convert coco_captions")
    assert convert["records"] == 2 * len(COCO_IDS) and convert["skipped"] == {"missing image": 2}
    # one document per image, its first caption; the COCO images are linked, not copied
    assert _prepared_captions(str(out)) == sorted(_caption(i, 0) for i in COCO_IDS)
    assert os.path.islink(out / "source" / "images")
    assert "data/coco30k.sh --coco_dir=" in proc.stdout and "not zero-shot" in proc.stdout
    _check_cm3_task_batch(proc.stdout, str(out))


# ---------------------------------------------------------------- SFT recipes


def _sft_batch(proc, out, family, which=-1):
    """A batch of the task the recipe's printed finetune command trains on."""
    args, bindings = _bind_printed_command(proc.stdout, "finetune", which)
    assert bindings["corpus_sft_data_dir.path"] == f"'{out}'" and "--gin_file=gin/sft_7b.gin" in args
    assert bindings["MIXTURE_OR_TASK_NAME"] == f"'corpus_sft_{family}'"
    return _batch(f"corpus_sft_{family}", {"inputs": 96, "targets": 96}, pack=False)


def test_coco_captions_to_sft_captioning(tmp_path, models, coco):
    out = tmp_path / "sft_cap"
    proc = _run("coco_captions", f"--coco_dir={coco}", f"--out={out}", "--mode=sft", *_model_flags(models, False))
    assert _sft_manifest(str(out))["splits"]["train"]["families"]["captioning"]["count"] == 2 * len(COCO_IDS)
    batch = _sft_batch(proc, str(out), "captioning")
    want = _encoded(models, str(out), [_caption(i, k) for i in COCO_IDS for k in range(2)])
    assert all(row in want for row in _weighted_rows(batch))


def test_vqa_to_sft(tmp_path, models, coco):
    vqa = tmp_path / "vqa"
    vqa.mkdir()
    qa = [(9, "what colour is the car", "red"), (25, "is it snowy", "no"), (30, "is it snowy", "yes"),
          (34, "what is on the grass", "two dog"), (MISSING_ID, "is it snowy", "no")]
    questions = [{"question_id": 10 * n, "image_id": i, "question": q + "?"} for n, (i, q, _) in enumerate(qa)]
    answers = [{"question_id": 10 * n, "image_id": i, "multiple_choice_answer": a, "question_type": "what",
                "answer_type": "other", "answers": [{"answer": a, "answer_id": k + 1} for k in range(3)]}
               for n, (i, _, a) in enumerate(qa)]
    (vqa / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "train2014",
         "questions": questions}))
    (vqa / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(
        {"info": {}, "data_type": "mscoco", "data_subtype": "train2014", "annotations": answers}))
    out = tmp_path / "sft_vqa"
    proc = _run("vqa", f"--vqa_dir={vqa}", f"--coco_dir={coco}", f"--out={out}", *_model_flags(models, False))
    convert = _report_after(proc.stdout, "sft convert vqa")
    assert convert["records"] == 4 and convert["skipped"] == {"missing image": 1}
    batch = _sft_batch(proc, str(out), "vqa")
    want = _encoded(models, str(out), [a for i, _, a in qa if i != MISSING_ID])
    assert all(row in want for row in _weighted_rows(batch))


@pytest.mark.slow
def test_coco_detection_to_sft(tmp_path, models, coco):
    out = tmp_path / "sft_det"
    proc = _run("coco_detection", f"--coco_dir={coco}", f"--out={out}", *_model_flags(models, False))
    convert = _report_after(proc.stdout, "sft convert coco_detection")
    assert convert["by_task"] == {"detection": len(COCO_IDS), "spatial": len(COCO_IDS)}
    assert convert["skipped"] == {"crowd box": 1}
    families = _sft_manifest(str(out))["splits"]["train"]["families"]
    assert {f: e["count"] for f, e in families.items()} == {"detection": len(COCO_IDS), "spatial": len(COCO_IDS)}
    # a 64 x 48 image is cropped to its centre 48 x 48 (x from 8): box x 10..40 -> 2..32 of 48
    records = [json.loads(x) for x in open(out / "records_detection.jsonl")]
    det = next(r for r in records if r["task"] == "detection" and r["meta"]["image_id"] == 9)
    assert det["instruction"] == "detect the objects"
    assert det["meta"]["boxes"][0]["x0"] == pytest.approx(2 / 48) and det["meta"]["boxes"][0]["label"] == "dog"
    texts = [r["output_text"] for r in records if r["task"] == "detection"]
    batch = _sft_batch(proc, str(out), "detection", which=-2)
    assert all(row in _encoded(models, str(out), texts) for row in _weighted_rows(batch))
    batch = _sft_batch(proc, str(out), "spatial", which=-1)
    assert all(len(row) == 16 + 1 for row in _weighted_rows(batch))  # 4 x 4 image codes <eos>


def test_instructpix2pix_to_sft(tmp_path, models):
    src = tmp_path / "clip-filtered-dataset"
    seeds = [["0000001", [11, 12]], ["0000002", [21, 22]]]
    for n, (d, seed_list) in enumerate(seeds):
        (src / d).mkdir(parents=True)
        (src / d / "prompt.json").write_text(json.dumps(
            {"input": "a photo of a dog", "edit": ["make it snowy", "make it red"][n], "output": "a snowy dog"}))
        for s in seed_list:
            if s != 22:  # seed 22's images missing
                _image(src / d / f"{s}_0.jpg", s, (48, 48))
                _image(src / d / f"{s}_1.jpg", s + 1, (48, 48))
    (src / "seeds.json").write_text(json.dumps(seeds))
    out = tmp_path / "sft_ip2p"
    proc = _run("instructpix2pix", f"--ip2p_dir={src}", f"--out={out}", *_model_flags(models, False))
    convert = _report_after(proc.stdout, "sft convert instructpix2pix")
    assert convert["by_task"] == {"editing": 3} and convert["skipped"] == {"missing image": 1}
    assert _sft_manifest(str(out))["splits"]["train"]["families"]["editing"]["count"] == 3
    batch = _sft_batch(proc, str(out), "editing")
    assert all(len(row) == 16 + 1 for row in _weighted_rows(batch))  # the edited image's 4 x 4 codes <eos>
