"""Data preparation (`cm3leon prepare`): the acceptance test on an image
folder (through the CLI) and on webdataset tars (in process), each holding a
corrupt image, an empty caption, a 3,000-word caption and a greyscale PNG;
every stored field against a direct computation; reruns that write nothing,
an interrupted run that recomputes one shard only, refusal of other
settings, the reader (by position, by id, grain), the bank from stored
embeddings, and bad inputs through the CLI."""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import prepare, prepare_worker, prepared
from cm3leon_jax.data.images import load_image
from cm3leon_jax.data.sources import open_source
from cm3leon_jax.data.tokenizers import TextTokenizer
from cm3leon_jax.data import shapes
from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
from cm3leon_jax.models.clip import CLIP, preprocess_images
from cm3leon_jax.models.clip_convert import load_clip
from cm3leon_jax.models.image_tokenizer import ImageTokenizer
from tests.conftest import run_cli

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from task_data import make_bpe, make_vq_dir, shared_clip_dir  # noqa: E402

MAX_TOKENS = 40
PER_SHARD = 3
WORDS = "a red blue green circle square triangle left of right above below the small big".split()
LONG_CAPTION = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(3000))
GOOD_IDS = [0, 1, 2, 5, 6, 7]  # the corrupt image (3) and the empty caption (4) are skipped
SKIPPED = {"corrupt or truncated image": 1, "empty caption": 1}


def _encoded(array, fmt, mode=None):
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _rows():
    """(file name, encoded bytes, caption) of the test corpus; the row number
    is the document id in both layouts."""
    ex = [shapes.generate_example(11, i, 64) for i in range(6)]
    jpeg = _encoded(ex[3].image, "JPEG")
    return [
        ("00000.png", _encoded(ex[0].image, "PNG"), ex[0].caption),
        ("00001.png", _encoded(ex[1].image, "PNG"), ex[1].caption),
        ("00002.jpg", _encoded(ex[2].image, "JPEG"), ex[2].caption),
        ("corrupt.jpg", jpeg[:len(jpeg) // 2], "a truncated jpeg"),     # skipped: corrupt
        ("empty.png", _encoded(ex[3].image, "PNG"), ""),                 # skipped: empty caption
        ("long.png", _encoded(ex[4].image, "PNG"), LONG_CAPTION),        # truncated
        ("grey.png", _encoded(ex[5].image, "PNG", mode="L"), ex[5].caption),  # converted to RGB
        ("00003.png", _encoded(ex[3].image, "PNG"), ex[3].caption),
    ]


def _image_folder(path, rows):
    os.makedirs(path)
    with open(os.path.join(path, "captions.jsonl"), "w") as f:
        for name, data, caption in rows:
            with open(os.path.join(path, name), "wb") as g:
                g.write(data)
            f.write(json.dumps({"file": name, "caption": caption}) + "\n")
    return str(path)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _webdataset(path, rows):
    """Two img2dataset-style shards: KEY.jpg|png + KEY.txt (+ KEY.json)."""
    os.makedirs(path)
    for s, part in enumerate((rows[:4], rows[4:])):
        with tarfile.open(os.path.join(path, f"{s:05d}.tar"), "w") as tar:
            for j, (name, data, caption) in enumerate(part):
                key = f"{s:05d}{j:04d}"
                _add(tar, f"{key}.{name.rsplit('.', 1)[1]}", data)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return str(path)


def _mtimes(out):
    return {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in sorted(os.listdir(out))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("models")
    return {"vqgan_dir": make_vq_dir(str(base / "vqgan")),
            "text_tokenizer": make_bpe(str(base / "text"), 320, extra_lines=[LONG_CAPTION]),
            "clip_dir": shared_clip_dir()}


def _flags(models):
    return [f"--{k}={v}" for k, v in models.items()]


@pytest.fixture(scope="module")
def rows():
    return _rows()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, models, rows):
    """`cm3leon prepare` on the image folder, twice."""
    base = tmp_path_factory.mktemp("folder")
    src = _image_folder(str(base / "pairs"), rows)
    out = str(base / "prepared")
    args = ["prepare", f"--source=image_folder:{src}", f"--out={out}", *_flags(models),
            f"--max_text_tokens={MAX_TOKENS}", f"--records_per_shard={PER_SHARD}", "--no_progress"]
    first = run_cli(args)
    mtimes = _mtimes(out)
    second = run_cli(args)
    return {"out": out, "src": src, "args": args, "first": first, "second": second, "mtimes": mtimes}


@pytest.fixture(scope="module")
def wds_run(tmp_path_factory, models, rows):
    """`prepare.prepare` (what the CLI calls) on the webdataset shards, twice."""
    base = tmp_path_factory.mktemp("wds")
    src = _webdataset(str(base / "tars"), rows)
    out = str(base / "prepared")
    kw = dict(max_text_tokens=MAX_TOKENS, records_per_shard=PER_SHARD, progress=False)
    first = prepare.prepare(f"webdataset:{src}/*.tar", out, **models, **kw)
    mtimes = _mtimes(out)
    second = prepare.prepare(f"webdataset:{src}/*.tar", out, **models, **kw)
    return {"out": out, "src": src, "kw": kw, "first": first, "second": second, "mtimes": mtimes}


def _direct_clip(clip_dir, texts, images):
    """CLIP's own outputs on the whole list at once (no batching, no padding),
    normalised in float64."""
    cfg, params = load_clip(clip_dir)
    model = CLIP(cfg)
    ids, mask = CLIPTextTokenizer.from_model_dir(clip_dir)(texts)
    t = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), method=CLIP.encode_text),
                   np.float64)
    i = np.asarray(model.apply({"params": params}, jnp.asarray(preprocess_images(images, cfg)),
                               method=CLIP.encode_image), np.float64)
    return t / np.linalg.norm(t, axis=1, keepdims=True), i / np.linalg.norm(i, axis=1, keepdims=True)


def _check_report(report):
    assert report["written"] == len(GOOD_IDS)
    assert report["skipped"] == SKIPPED
    assert report["truncated"] == 1
    assert report["shards"] == 3 and report["resumed_shards"] == 0 and report["new_records"] == len(GOOD_IDS)


def _check_rerun(run):
    second = run["second"]
    assert second["written"] == len(GOOD_IDS) and second["skipped"] == SKIPPED
    assert second["resumed_shards"] == second["shards"] == 3 and second["new_records"] == 0
    out = run["out"]
    assert _mtimes(out) == run["mtimes"]  # a rerun of a finished dataset writes nothing
    ds = prepared.PreparedDataset(out)
    assert len(ds) == len(GOOD_IDS) and sorted(ds.ids.tolist()) == GOOD_IDS  # no duplicates


def _check_dataset(out, rows, models):
    ds = prepared.PreparedDataset(out)
    vocab = ds.vocabulary
    assert (vocab.image_codebook_size, vocab.text_vocab_size) == (32, 320)
    assert len(ds) == len(GOOD_IDS) and ds.ids.tolist() == GOOD_IDS
    vq = ImageTokenizer.from_model_dir(models["vqgan_dir"])
    tok = TextTokenizer(models["text_tokenizer"], vocab)
    images = [load_image(rows[i][1], 32) for i in GOOD_IDS]
    codes = vq.encode(np.stack(images))
    assert len({c.tobytes() for c in codes}) > 2  # the VQ-GAN tells the images apart
    text_emb, image_emb = _direct_clip(models["clip_dir"], [rows[i][2] for i in GOOD_IDS], images)
    for k, doc_id in enumerate(GOOD_IDS):
        rec = ds.by_id(doc_id)
        assert ds[k]["id"] == rec["id"]
        assert rec["id"] == doc_id and rec["index"] == doc_id and rec["id"].dtype == np.int64
        caption = rows[doc_id][2]
        assert rec["caption"] == rec["text"] == caption
        assert rec["image_ids"].dtype == np.int32 and rec["text_ids"].dtype == np.int32
        np.testing.assert_array_equal(rec["image_ids"], codes[k] + vocab.image_start)
        np.testing.assert_array_equal(ds.image_codes(rec["image_ids"]), codes[k])
        want = tok.encode(caption)
        np.testing.assert_array_equal(rec["text_ids"], want[:MAX_TOKENS])
        assert rec["num_text_tokens"] == len(want)
        if caption == LONG_CAPTION:
            assert len(want) > 3000 // 2 and len(rec["text_ids"]) == MAX_TOKENS and rec["text_truncated"]
        else:
            assert len(want) < MAX_TOKENS and not rec["text_truncated"]
        np.testing.assert_allclose(rec["text_embedding"], text_emb[k], atol=1e-5)
        np.testing.assert_allclose(rec["image_embedding"], image_emb[k], atol=1e-5)
        assert rec["has_text"] and rec["has_image"]
    # the greyscale PNG: the codes of its RGB conversion
    grey = Image.open(io.BytesIO(rows[6][1]))
    assert grey.mode == "L"
    rgb = load_image(_encoded(np.asarray(grey.convert("RGB")), "PNG"), 32)
    np.testing.assert_array_equal(ds.by_id(6)["image_ids"], vq.encode(rgb) + vocab.image_start)
    with pytest.raises(KeyError, match="3"):
        ds.by_id(3)
    return ds


def test_image_folder_acceptance_through_the_cli(folder_run, rows, models):
    lines = folder_run["first"].stdout.strip().splitlines()
    assert len(lines) == 1, folder_run["first"].stdout  # one JSON line on stdout
    report = json.loads(lines[0])
    _check_report(report)
    assert report["out"] == folder_run["out"]
    _check_rerun(dict(folder_run, second=json.loads(folder_run["second"].stdout)))
    _check_dataset(folder_run["out"], rows, models)
    man = json.load(open(os.path.join(folder_run["out"], prepare.MANIFEST_FILE)))
    assert man["complete"] and man["count"] == 6 and man["settings"]["max_text_tokens"] == MAX_TOKENS
    assert man["settings"]["source"] == f"image_folder:{folder_run['src']}"
    assert {k for k, _, _ in man["skipped_examples"]} == {3, 4}


def test_webdataset_acceptance(wds_run, rows, models):
    _check_report(wds_run["first"])
    _check_rerun(wds_run)
    _check_dataset(wds_run["out"], rows, models)


def test_webdataset_samples_are_the_webdataset_librarys(wds_run):
    from webdataset.tariterators import tarfile_samples

    tars = sorted(os.path.join(wds_run["src"], f) for f in os.listdir(wds_run["src"]))
    theirs = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
              for s in tarfile_samples([{"url": t} for t in tars])]
    src = open_source(f"webdataset:{wds_run['src']}", resolution=32)  # a directory works too
    assert src.keys() == [k for k, _ in theirs] and len(src) == 8
    assert all("txt" in exts and "json" in exts for _, exts in theirs)
    assert src[5]["text"] == LONG_CAPTION and src[4]["text"] is None and src[6]["image"].shape == (32, 32, 3)


def test_interrupted_run_recomputes_only_the_missing_shard(wds_run, models, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(wds_run["out"], out)
    lost = prepare_worker.shard_stem(1, 3) + prepare.RECORD_SUFFIX
    os.remove(os.path.join(out, lost))
    kept = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".array_record")}
    report = prepare.prepare(f"webdataset:{wds_run['src']}/*.tar", out, **models, **wds_run["kw"])
    # shard 1 is documents 3-5: the corrupt image, the empty caption (skipped again) and the long caption
    assert report["resumed_shards"] == 2 and report["new_records"] == 1 and report["written"] == 6
    assert report["skipped"] == SKIPPED
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in kept} == kept  # the others untouched
    a, b = prepared.PreparedDataset(wds_run["out"]), prepared.PreparedDataset(out)
    assert len(a) == len(b) == 6 and a.ids.tolist() == b.ids.tolist()
    for r in range(6):
        x, y = a[r], b[r]
        assert x["caption"] == y["caption"]
        np.testing.assert_array_equal(x["image_ids"], y["image_ids"])
        np.testing.assert_array_equal(x["text_ids"], y["text_ids"])
        np.testing.assert_allclose(x["image_embedding"], y["image_embedding"], atol=1e-6)
    assert not [f for f in os.listdir(out) if f.startswith(prepare_worker.TMP_PREFIX)]


def test_other_settings_on_the_same_out_are_refused(wds_run, models):
    before = sorted(os.listdir(wds_run["out"]))
    kw = dict(wds_run["kw"], max_text_tokens=MAX_TOKENS + 1)
    with pytest.raises(ValueError, match=f"other settings.*max_text_tokens: {MAX_TOKENS} there vs "
                                         f"{MAX_TOKENS + 1} now"):
        prepare.prepare(f"webdataset:{wds_run['src']}/*.tar", wds_run["out"], **models, **kw)
    assert sorted(os.listdir(wds_run["out"])) == before


def test_reader_grain_and_bank_from_stored_embeddings(wds_run, models, tmp_path):
    import grain

    from cm3leon_jax.retrieval.bank import content_hash, load_bank

    ds = open_source(f"prepared:{wds_run['out']}")
    assert isinstance(ds, prepared.PreparedDataset) and ds.spec == f"prepared:{wds_run['out']}"
    mds = grain.MapDataset.source(prepared.PreparedDataset(wds_run["out"]))
    assert len(mds) == 6 and mds[2]["id"] == 2
    rec = ds[0]  # the document protocol: text and the VQ-GAN reconstruction
    assert rec["text"] == rec["caption"] and rec["image"].shape == (32, 32, 3) and rec["image"].dtype == np.uint8
    man = prepared.bank_from_prepared(ds, models["clip_dir"], str(tmp_path / "bank"))
    assert man["count"] == 6 and man["source"] == ds.spec
    bank = load_bank(str(tmp_path / "bank"))
    plain = prepared.PreparedDataset(wds_run["out"])
    want = np.stack([(plain[r]["text_embedding"] + plain[r]["image_embedding"]) / 2 for r in range(6)])
    np.testing.assert_array_equal(bank.ids, GOOD_IDS)
    np.testing.assert_allclose(bank.embeddings, want, atol=1e-7)
    assert bank.caption(3) == LONG_CAPTION
    assert bank.content_hashes[0] == content_hash(plain[0]["caption"], load_image(_rows()[0][1], 32))


def test_tfds_dataset_not_present_locally_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not prepared in .*never downloads"):
        open_source(f"tfds:coco_captions?data_dir={tmp_path}")
    with pytest.raises(ValueError, match="unknown option"):
        open_source("tfds:mnist?split=train")


def test_tfds_source_and_prepare_from_a_local_tfds_dataset(tmp_path, models):
    import tensorflow_datasets as tfds

    ex = [shapes.generate_example(2, i, 40) for i in range(4)]
    captions = [ex[0].caption, "", ex[2].caption, ex[3].caption]  # 1: empty caption
    features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                           "caption": tfds.features.Text()})
    for fmt in ("array_record", "tfrecord"):  # random access, and block reads by split slicing
        tfds.dataset_builders.store_as_tfds_dataset(
            name=f"cm3_pairs_{fmt}", version="1.0.0", features=features, data_dir=str(tmp_path), file_format=fmt,
            split_datasets={"train": [(i, {"image": e.image, "caption": c}) for i, (e, c) in enumerate(zip(ex, captions))]},
            disable_shuffling=True)
        src = open_source(f"tfds:cm3_pairs_{fmt}@train?data_dir={tmp_path}", resolution=32)
        assert len(src) == 4 and (src._random is None) == (fmt == "tfrecord")
        assert [src[i]["text"] for i in range(4)] == [ex[0].caption, None, ex[2].caption, ex[3].caption]
        np.testing.assert_array_equal(src[2]["image"], load_image(_encoded(ex[2].image, "PNG"), 32))
    with pytest.raises(ValueError, match="no split 'test'"):
        open_source(f"tfds:cm3_pairs_tfrecord@test?data_dir={tmp_path}")
    report = prepare.prepare(f"tfds:cm3_pairs_array_record?data_dir={tmp_path}", str(tmp_path / "out"), **models,
                             max_text_tokens=MAX_TOKENS, records_per_shard=PER_SHARD, progress=False)
    assert (report["written"], report["skipped"], report["shards"]) == (3, {"empty caption": 1}, 2)
    ds = prepared.PreparedDataset(str(tmp_path / "out"))
    assert ds.ids.tolist() == [0, 2, 3] and ds.by_id(3)["caption"] == ex[3].caption


@pytest.mark.parametrize("case", ["bad spec", "no shards", "missing vqgan", "missing tokenizer", "bad size",
                                  "bad budget"])
def test_cli_bad_inputs_exit_2_with_one_line(case, models, tmp_path):
    flags = dict(models)
    source, extra = f"image_folder:{tmp_path}", []
    match = {"bad spec": "unknown source kind 'nope'", "no shards": "no tar shards match",
             "missing vqgan": "--vqgan_dir '/no/such/vq' does not exist",
             "missing tokenizer": "--text_tokenizer '/no/such/bpe' does not exist",
             "bad size": "--max_text_tokens must be an integer >= 1",
             "bad budget": "--max_image_pixels must be an integer >= 64, got 10"}[case]
    if case == "bad spec":
        source = "nope:1"
    elif case == "no shards":
        source = f"webdataset:{tmp_path}/*.tar"
    elif case == "missing vqgan":
        flags["vqgan_dir"] = "/no/such/vq"
    elif case == "missing tokenizer":
        flags["text_tokenizer"] = "/no/such/bpe"
    elif case == "bad budget":
        extra = ["--max_image_pixels=10"]
    else:
        extra = ["--max_text_tokens=0"]
    proc = run_cli(["prepare", f"--source={source}", f"--out={tmp_path / 'out'}", *_flags(flags), *extra],
                   check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], proc.stderr
    assert proc.stdout == ""


def test_bad_input_in_an_image_folder_loses_nothing(models, tmp_path):
    """Issue 26's acceptance test: a captions.jsonl line whose caption holds a
    lone surrogate (valid JSON), a 20000 x 20000 PNG, a path out of the
    folder, a non-string caption and control characters: the run finishes,
    keeps every good record once, counts each bad one under its reason, and
    a rerun adds nothing."""
    from image_bombs import png_bomb

    rows = _rows()
    d = tmp_path / "pairs"
    os.makedirs(d)
    for name, data, _ in rows[:3]:
        (d / name).write_bytes(data)
    (d / "big.png").write_bytes(png_bomb(20000, 20000))
    lines = [json.dumps({"file": name, "caption": caption}) for name, _, caption in rows[:3]] + [
        '{"file": "00001.png", "caption": "abc \\udcff"}',               # 3: kept, U+FFFD
        json.dumps({"file": "big.png", "caption": "a huge image"}),     # 4: too large
        json.dumps({"file": "../../etc/passwd", "caption": "x"}),       # 5: never read
        json.dumps({"file": "00002.jpg", "caption": 42}),               # 6: not a string
        json.dumps({"file": "00000.png", "caption": "a\x00 red\x1b circle\r\n"}),  # 7: kept, cleaned
    ]
    (d / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "prepared")
    kw = dict(max_text_tokens=MAX_TOKENS, records_per_shard=PER_SHARD, progress=False)
    first = prepare.prepare(f"image_folder:{d}", out, **models, **kw)
    skipped = {"too large": 1, "file outside the image folder": 1, "caption is not a string": 1}
    assert first["written"] == 5 and first["skipped"] == skipped and first["new_records"] == 5
    mtimes = _mtimes(out)
    second = prepare.prepare(f"image_folder:{d}", out, **models, **kw)
    assert second["written"] == 5 and second["new_records"] == 0 and second["skipped"] == skipped
    assert _mtimes(out) == mtimes
    ds = prepared.PreparedDataset(out)
    # the document id is the line number: 4 (too large), 5 and 6 are skipped
    assert ds.ids.tolist() == [0, 1, 2, 3, 7]
    assert ds.by_id(3)["caption"] == "abc \ufffd" and ds.by_id(7)["caption"] == "a red circle\n"
    tok = TextTokenizer(models["text_tokenizer"], ds.vocabulary)
    np.testing.assert_array_equal(ds.by_id(3)["text_ids"], tok.encode("abc \ufffd")[:MAX_TOKENS])
    man = json.load(open(os.path.join(out, prepare.MANIFEST_FILE)))
    assert [r for _, r, _ in man["skipped_examples"]] == ["too large"]
    assert "20000x20000" in man["skipped_examples"][0][2]
