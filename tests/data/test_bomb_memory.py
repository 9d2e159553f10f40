"""A decompression bomb costs `cm3leon prepare` no memory (issue 26): the
peak RSS of a prepare run on an image folder holding one bomb (a 300 KB PNG
of 9000 x 9000 RGBA pixels: over the 8192 x 8192 budget, under Pillow's own
limit, so only our header check stands between it and 1.2 GB of decoded and
converted pixels) stays within 1 GiB of the same run on the folder without
it. Each run is a fresh `cm3leon prepare` process whose peak is read by a
wrapper process with getrusage(RUSAGE_CHILDREN)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from cm3leon_jax.data import shapes
from tests.conftest import REPO

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from image_bombs import png_bomb  # noqa: E402
from task_data import make_bpe, make_vq_dir, shared_clip_dir  # noqa: E402

GIB_KB = 1024 * 1024  # ru_maxrss is in KiB on Linux

_PEAK_OF_CHILD = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                  "print(p.stdout[-2000:], file=sys.stderr); print(p.stderr[-3000:], file=sys.stderr); "
                  "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def _folder(path, bomb: bool) -> str:
    os.makedirs(path)
    lines = []
    for i in range(3):
        ex = shapes.generate_example(5, i, 64)
        buf = io.BytesIO()
        Image.fromarray(ex.image).save(buf, format="PNG")
        with open(os.path.join(path, f"{i}.png"), "wb") as f:
            f.write(buf.getvalue())
        lines.append(json.dumps({"file": f"{i}.png", "caption": ex.caption}))
    if bomb:
        data = png_bomb(9000, 9000, "RGBA")
        assert len(data) < 1_000_000
        with open(os.path.join(path, "bomb.png"), "wb") as f:
            f.write(data)
        lines.append(json.dumps({"file": "bomb.png", "caption": "a small file"}))
    with open(os.path.join(path, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _peak_kb(src: str, out: str, models: dict) -> tuple:
    cmd = [sys.executable, "-c", _PEAK_OF_CHILD, sys.executable, "-m", "cm3leon_jax.cli", "prepare",
           f"--source=image_folder:{src}", f"--out={out}", "--no_progress", "--records_per_shard=10",
           *[f"--{k}={v}" for k, v in models.items()]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads([line for line in proc.stderr.splitlines() if line.startswith("{")][-1])
    return int(proc.stdout.strip().splitlines()[-1]), report


@pytest.mark.slow
def test_a_bomb_costs_prepare_no_memory(tmp_path):
    models = {"vqgan_dir": make_vq_dir(str(tmp_path / "vqgan")),
              "text_tokenizer": make_bpe(str(tmp_path / "text"), 320), "clip_dir": shared_clip_dir()}
    clean_kb, clean = _peak_kb(_folder(str(tmp_path / "clean"), False), str(tmp_path / "out_clean"), models)
    bomb_kb, bombed = _peak_kb(_folder(str(tmp_path / "bomb"), True), str(tmp_path / "out_bomb"), models)
    print(f"\npeak RSS of prepare: clean folder {clean_kb / 1024:.0f} MiB, with the bomb {bomb_kb / 1024:.0f} MiB")
    assert clean["written"] == bombed["written"] == 3
    assert clean["skipped"] == {} and bombed["skipped"] == {"too large": 1}
    assert bomb_kb - clean_kb < GIB_KB
