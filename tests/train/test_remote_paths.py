"""URL model and data dirs (gs:// on a TPU pod), proved on TensorFlow's
in-memory file system `ram://`: a short training run with
`--model_dir=ram://...` writes config.gin, metrics.jsonl, TensorBoard events
and batch_hashes.jsonl there while any local file call (open, os.makedirs,
os.listdir, ...) naming the URL raises; the fine-tuning and data readers
(config.gin, init checkpoints, the neighbour table, the memory bank, the SFT
manifest) read URLs; local paths keep their old behaviour.

Orbax writes array data through tensorstore, which has no `ram://` (it has
gs:// itself), so the run's checkpoints/ dir is redirected to a local
directory; everything else of the model dir stays on `ram://`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SMALL

# A test-only etils path class for ram:// (epath knows gs://, s3://, ... but
# not ram://), so that clu's TensorBoard writer, which goes through epath,
# reaches TensorFlow's in-memory file system the way it reaches gs://.
RAM_EPATH = '''
from etils.epath import backend as _backend, gpath as _gpath, register as _register

@_register.register_path_cls("ram://")
class _RamPath(_gpath.PosixGPath):
    @property
    def _uri_scheme(self):
        return "ram" if self.parts[:1] == ("ram:",) else None

    @property
    def _backend(self):
        return _backend.tf_backend if self._uri_scheme else _backend.os_backend

    @property
    def _path_str(self):
        return "ram://" + "/".join(self.parts[1:]) if self._uri_scheme else super()._path_str
'''

# Local file calls that must never see the URL.
GUARD = '''
import builtins, os, shutil

def _guard(fn, name):
    def wrapped(*args, **kwargs):
        for a in args[:2]:
            if isinstance(a, (str, os.PathLike)) and "ram:" in os.fspath(a):
                raise AssertionError(f"local file call {name}({os.fspath(a)!r}) on a URL path")
        return fn(*args, **kwargs)
    return wrapped

builtins.open = _guard(builtins.open, "open")
for _name in ("makedirs", "mkdir", "listdir", "replace", "rename", "remove", "stat", "scandir"):
    setattr(os, _name, _guard(getattr(os, _name), "os." + _name))
shutil.copyfile = _guard(shutil.copyfile, "shutil.copyfile")
'''

TRAIN_SCRIPT = '''
import json, os, sys
sys.path.insert(0, {repo!r})
os.environ.setdefault("JAX_PLATFORMS", "cpu")
{ram_epath}
from cm3leon_jax import cli
from cm3leon_jax import checkpoints as ckpt_lib
local_ckpt = {local_ckpt!r}
ckpt_lib.checkpoint_dir = lambda model_dir: local_ckpt  # tensorstore has no ram://
{guard}
import tensorflow as tf
g = tf.io.gfile
url = "ram://bucket/run"
small = {small!r}
rc1 = cli.main(["train", *small, "--gin.TRAIN_STEPS=3", "--gin.train.record_batch_hashes=True",
                "--gin.train.checkpoint_every=3", "--model_dir=" + url])
rc2 = cli.main(["train", *small, "--gin.TRAIN_STEPS=5", "--gin.train.record_batch_hashes=True",
                "--gin.train.checkpoint_every=5", "--model_dir=" + url])
names = sorted(g.listdir(url))
read = lambda name: g.GFile(url + "/" + name).read()
print("RESULT " + json.dumps({{
    "rc": [rc1, rc2], "names": names,
    "metrics_steps": [json.loads(l)["step"] for l in read("metrics.jsonl").splitlines()],
    "hash_steps": [json.loads(l)["step"] for l in read("batch_hashes.jsonl").splitlines()],
    "config_has_model_dir": url in read("config.gin"),
    "events": [n for n in names if "tfevents" in n],
    "checkpoints": sorted(os.listdir(local_ckpt)),
}}))
'''


def test_train_with_a_url_model_dir(tmp_path):
    local_ckpt = str(tmp_path / "checkpoints")
    script = TRAIN_SCRIPT.format(repo=REPO, ram_epath=RAM_EPATH, guard=GUARD, local_ckpt=local_ckpt,
                                 small=[a for a in SMALL if "log_every" not in a] + ["--gin.train.log_every=1"])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    r = json.loads(line[len("RESULT "):])
    assert r["rc"] == [0, 0]
    assert {"config.gin", "metrics.jsonl", "batch_hashes.jsonl"} <= set(r["names"])
    assert r["events"], r["names"]                       # TensorBoard events on the URL too
    assert r["metrics_steps"] == [1, 2, 3, 4, 5]         # appended across the resume
    assert r["hash_steps"] == [1, 2, 3, 4, 5]
    assert r["config_has_model_dir"]
    assert r["checkpoints"][:2] == ["3", "5"]            # resumed from 3, not retrained
    assert not os.path.exists(tmp_path / "ram:")         # nothing landed in a local "ram:" dir


# ---------------------------------------------------------------------------- readers, in process

@pytest.fixture
def gfile():
    tf = pytest.importorskip("tensorflow")
    return tf.io.gfile


def _put(gfile, url, text):
    gfile.makedirs(os.path.dirname(url))
    with gfile.GFile(url, "w") as f:
        f.write(text)


def _copy_tree(gfile, src, dst):
    for root, _dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else f"{dst}/{rel}"
        gfile.makedirs(target)
        for name in files:
            gfile.copy(os.path.join(root, name), f"{target}/{name}", overwrite=True)


def test_paths_helpers_local_and_url(tmp_path, gfile):
    from cm3leon_jax import paths

    assert paths.abspath("gs://b/run") == "gs://b/run"
    assert paths.abspath("rel") == os.path.join(os.getcwd(), "rel")
    url = "ram://helpers/d"
    paths.makedirs(url + "/sub")
    with paths.open(url + "/a.txt", "w") as f:
        f.write("x\n")
    with paths.open(url + "/a.txt", "a") as f:
        f.write("y\n")
    with paths.open(url + "/a.txt") as f:
        assert f.read() == "x\ny\n"
    assert paths.isfile(url + "/a.txt") and not paths.isfile(url + "/sub") and paths.isdir(url + "/sub")
    assert sorted(paths.listdir(url)) == ["a.txt", "sub"]
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    np.save(tmp_path / "a.npy", arr)
    gfile.copy(str(tmp_path / "a.npy"), url + "/a.npy")
    np.testing.assert_array_equal(paths.load_npy(url + "/a.npy"), arr)
    assert isinstance(paths.load_npy(str(tmp_path / "a.npy"), mmap_mode="r"), np.memmap)  # local: mmap kept
    with pytest.raises(OSError):
        paths.load_npy(url + "/missing.npy")


def test_config_gin_written_to_and_parsed_from_a_url(gfile):
    import gin

    from cm3leon_jax import gin_utils

    try:
        gin.clear_config()
        gin_utils.parse(["gin/cm3leon_tiny.gin"], ["DecoderConfig.num_layers = 3", "MODEL_DIR = 'ram://g/run'"],
                        extra_modules=(), check_required=False)
        path = gin_utils.write_config("ram://g/run")
        assert path == "ram://g/run/config.gin" and "num_layers = 3" in gfile.GFile(path).read()
        gin.clear_config()
        gin_utils.parse([path], [], check_required=False)  # what `cm3leon generate` does with a model dir
        assert gin.query_parameter("DecoderConfig.num_layers") == 3
        with pytest.raises(gin_utils.GinConfigError, match="not found"):
            gin_utils.parse(["ram://g/none/config.gin"], [], check_required=False)
    finally:
        gin.clear_config()


def test_finetune_reads_a_url_init_model_dir(gfile):
    from cm3leon_jax.commands import sft as commands
    from cm3leon_jax import checkpoints as ckpt_lib

    run = "ram://pre/run"
    _put(gfile, run + "/config.gin", "DecoderConfig.num_layers = 2\nUnifiedVocabulary.text_vocab_size = 300\n"
                                     "train.batch_size = 8\n")
    _put(gfile, run + "/checkpoints/7/state/_METADATA", "{}")
    _put(gfile, run + "/checkpoints/12/state/_METADATA", "{}")
    for given in (run, run + "/", run + "/checkpoints/12", run + "/checkpoints/12/state"):
        assert commands.find_config(given) == run + "/config.gin"
    assert commands.architecture_bindings(run + "/config.gin") == [
        "DecoderConfig.num_layers = 2", "UnifiedVocabulary.text_vocab_size = 300"]
    assert ckpt_lib.resolve_init_checkpoint(run) == run + "/checkpoints/12/state"
    assert ckpt_lib.resolve_init_checkpoint(run + "/checkpoints/7") == run + "/checkpoints/7/state"
    assert ckpt_lib.checkpoint_dir("gs://b/run") == "gs://b/run/checkpoints"
    with pytest.raises(ValueError, match="holds no checkpoint"):
        ckpt_lib.resolve_init_checkpoint("ram://pre/nothing")


def test_data_dirs_keep_urls(gfile, monkeypatch):
    from cm3leon_jax.data import tasks
    from cm3leon_jax.sft import records, tasks as sft_tasks

    assert tasks.corpus_data_dir("gs://b/task") == "gs://b/task"
    assert tasks.resolve_path(lambda: "gs://b/task/prepared") == "gs://b/task/prepared"
    assert sft_tasks.corpus_sft_data_dir("gs://b/sft") == "gs://b/sft"
    monkeypatch.setenv(sft_tasks.SHAPES_SFT_ENV, "gs://b/shapes_sft")
    assert sft_tasks.shapes_sft_data_dir() == "gs://b/shapes_sft"
    assert records.shard_pattern("gs://b/sft", "vqa", "train") == "gs://b/sft/vqa/train-*-of-*.tfrecord"
    sft = "ram://sft/data"
    _put(gfile, f"{sft}/{records.MANIFEST}", json.dumps({"format_version": records.FORMAT_VERSION,
                                                          "splits": {}}))
    assert records.read_manifest(sft)["format_version"] == records.FORMAT_VERSION
    with pytest.raises(ValueError, match="not a prepared SFT dataset"):
        records.read_manifest("ram://sft/none")


def test_neighbour_table_and_bank_from_a_url(tmp_path, gfile):
    from cm3leon_jax.retrieval.bank import load_bank, write_bank
    from cm3leon_jax.retrieval.index import MipsIndex
    from cm3leon_jax.retrieval.neighbours import NeighbourTable, build_neighbour_table

    keys = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [0.6, 0.8]], np.float32)
    ids = [10, 11, 12, 13, 14]
    bank = str(tmp_path / "bank")
    write_bank(bank, keys, ids, embedding_model="m", captions=[f"doc {i}" for i in ids])
    MipsIndex.build(keys, ids, embedding_model="m").save(str(tmp_path / "index"))
    build_neighbour_table(bank, str(tmp_path / "index"), k=2, progress=False)
    url = "ram://data/bank"
    _copy_tree(gfile, bank, url)
    local, remote = NeighbourTable(bank), NeighbourTable(url)
    np.testing.assert_array_equal(remote.ids, local.ids)
    np.testing.assert_array_equal(remote.scores, local.scores)
    assert [c.doc_id for c in remote.candidates(11)] == [c.doc_id for c in local.candidates(11)]
    b = load_bank(url)
    np.testing.assert_array_equal(b.embeddings, keys)
    assert b.caption(2) == load_bank(bank).caption(2) == "doc 12"
    with pytest.raises(FileNotFoundError, match="no neighbour table"):
        NeighbourTable("ram://data/nobank")
