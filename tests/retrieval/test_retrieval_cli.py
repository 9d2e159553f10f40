"""`cm3leon embed` and `cm3leon index build|search|neighbours` end to end on
the tiny CLIP, and every bad input giving exit status 2 with one line on
stderr that names it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cm3leon_jax import cli
from cm3leon_jax.retrieval.bank import load_bank, write_bank
from cm3leon_jax.retrieval.clip_encoder import ClipEncoder
from cm3leon_jax.retrieval.exact import exact_search
from cm3leon_jax.retrieval.index import MipsIndex
from tiny_clip import shared_clip_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expect_input_error(capsys, argv, *names):
    code, out, err = run(capsys, *argv)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    print(lines[0], file=sys.__stdout__)
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(clip dir, bank dir, index dir) made through the CLI."""
    base = tmp_path_factory.mktemp("retrieval_cli")
    clip_dir, bank, index = shared_clip_dir(), str(base / "bank"), str(base / "index")
    code = cli.main(["embed", f"--clip_dir={clip_dir}", "--source=shapes:40:1", f"--out={bank}",
                     "--batch_size=8", "--chunk_size=16", "--resolution=32", "--no_progress"])
    assert code == 0
    code = cli.main(["index", "build", f"--embeddings={bank}", f"--out={index}"])
    assert code == 0
    return clip_dir, bank, index


def test_embed_build_search_neighbours(built, capsys, tmp_path):
    clip_dir, bank_dir, index_dir = built
    capsys.readouterr()
    bank = load_bank(bank_dir)
    assert len(bank) == 40 and bank.manifest["source"] == "shapes:40:1"
    # build prints its parameters as JSON
    code, out, _ = run(capsys, "index", "build", f"--embeddings={bank_dir}", f"--out={tmp_path / 'i2'}")
    params = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and params["kind"] == "brute_force" and params["count"] == 40
    assert params["embedding_model"] == bank.embedding_model
    # search: the query embedded by the same CLIP, ranked by exact MIPS over the bank
    code, out, err = run(capsys, "index", "search", f"--index={index_dir}", "--query=a red circle", "--k=5")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == "rank\tid\tscore\tcaption" and len(lines) == 6
    q = ClipEncoder(clip_dir, batch_size=1).encode_texts(["a red circle"])
    rows, scores = exact_search(np.asarray(bank.embeddings), q, 5)
    for r, line in enumerate(lines[1:]):
        rank, doc_id, score, caption = line.split("\t")
        assert int(rank) == r + 1 and int(doc_id) == bank.ids[rows[0, r]]
        assert abs(float(score) - scores[0, r]) < 1e-4
        assert caption == bank.caption(int(rows[0, r]))
    # neighbours
    code, out, err = run(capsys, "index", "neighbours", f"--embeddings={bank_dir}", f"--index={index_dir}",
                         "--k=4", "--no_progress")
    assert code == 0, err
    man = json.loads(out.strip().splitlines()[-1])
    assert man["k"] == 4 and man["count"] == 40
    table = np.load(os.path.join(bank_dir, "neighbours", "ids.npy"))
    assert table.shape == (40, 4) and (table != bank.ids[:, None]).all()


def test_search_with_a_moved_clip_copy(built, capsys, tmp_path):
    import shutil

    clip_dir, _, index_dir = built
    copy = str(tmp_path / "clip_copy")
    shutil.copytree(clip_dir, copy)
    code, out, err = run(capsys, "index", "search", f"--index={index_dir}", "--query=a star", "--k=2",
                         f"--clip_dir={copy}")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 3


def test_bad_inputs_exit_2_with_one_line(built, capsys, tmp_path):
    clip_dir, bank_dir, index_dir = built
    bank = load_bank(bank_dir)
    # embed
    expect_input_error(capsys, ["embed", f"--clip_dir={clip_dir}", "--source=foo:3", f"--out={tmp_path / 'b'}"],
                       "'foo:3'")
    expect_input_error(capsys, ["embed", f"--clip_dir={clip_dir}", "--source=shapes:0", f"--out={tmp_path / 'b'}"],
                       "'shapes:0'", "no documents")
    expect_input_error(capsys, ["embed", f"--clip_dir={tmp_path / 'noclip'}", "--source=shapes:3",
                                f"--out={tmp_path / 'b'}"], str(tmp_path / "noclip"))
    # index build: missing bank, empty bank
    expect_input_error(capsys, ["index", "build", f"--embeddings={tmp_path / 'nobank'}", f"--out={tmp_path / 'x'}"],
                       str(tmp_path / "nobank"), "does not exist")
    empty = str(tmp_path / "empty_bank")
    write_bank(empty, np.zeros((0, 32)), [], embedding_model=bank.embedding_model)
    expect_input_error(capsys, ["index", "build", f"--embeddings={empty}", f"--out={tmp_path / 'x'}"],
                       empty, "empty")
    # index search: missing index dir, corrupt manifest, another embedding model
    expect_input_error(capsys, ["index", "search", f"--index={tmp_path / 'noindex'}", "--query=x"],
                       str(tmp_path / "noindex"), "does not exist")
    corrupt = str(tmp_path / "corrupt")
    MipsIndex.load(index_dir).save(corrupt)
    with open(os.path.join(corrupt, "manifest.json"), "w") as f:
        f.write('{"kind": "brute_')
    expect_input_error(capsys, ["index", "search", f"--index={corrupt}", "--query=x"],
                       os.path.join(corrupt, "manifest.json"), "corrupt manifest")
    other = str(tmp_path / "other_model")
    idx = MipsIndex.load(index_dir)
    idx.embedding_model = f"clip:{clip_dir}#0000000000000000"
    idx.save(other)
    expect_input_error(capsys, ["index", "search", f"--index={other}", "--query=x"],
                       "#0000000000000000", "another model")
    idx.embedding_model = "some-other-encoder"
    idx.save(other)
    expect_input_error(capsys, ["index", "search", f"--index={other}", "--query=x", f"--clip_dir={clip_dir}"],
                       "'some-other-encoder'")
    # a query of the wrong dimension: an index of 16-d keys under this CLIP's (32-d) name
    narrow = str(tmp_path / "narrow")
    MipsIndex.build(np.eye(20, 16), embedding_model=bank.embedding_model).save(narrow)
    expect_input_error(capsys, ["index", "search", f"--index={narrow}", "--query=x"],
                       narrow, "dimension 32", "dimension 16")
    # index neighbours: a bank of another dimension than the index
    narrow_bank = str(tmp_path / "narrow_bank")
    write_bank(narrow_bank, np.eye(20, 16), np.arange(20), embedding_model=bank.embedding_model)
    expect_input_error(capsys, ["index", "neighbours", f"--embeddings={narrow_bank}", f"--index={index_dir}"],
                       narrow_bank, "dimension 16", index_dir, "dimension 32")
    expect_input_error(capsys, ["index", "neighbours", f"--embeddings={bank_dir}", f"--index={tmp_path / 'nix'}"],
                       str(tmp_path / "nix"))
    # ScaNN-only parameters on a bank that gets brute force
    expect_input_error(capsys, ["index", "build", f"--embeddings={bank_dir}", f"--out={tmp_path / 'x'}",
                                "--num_leaves=4"], "num_leaves", "kind='scann'")


def _cm3leon(*args):
    exe = os.path.join(os.path.dirname(sys.executable), "cm3leon")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "cm3leon_jax.cli"]
    return subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=120)


def test_help_is_fast_and_errors_have_no_traceback(tmp_path):
    for args in (["index", "--help"], ["embed", "--help"], ["index", "search", "--help"]):
        t0 = time.perf_counter()
        proc = _cm3leon(*args)
        assert proc.returncode == 0 and time.perf_counter() - t0 < 2.0, args
    assert "neighbours" in _cm3leon("index", "--help").stdout
    proc = _cm3leon("index", "search", f"--index={tmp_path / 'missing'}", "--query=x")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "missing" in proc.stderr
