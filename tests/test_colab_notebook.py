"""tpu/colab_finetune.ipynb, every cell, on this CPU through nbclient: the
parameter cell is followed by injected values (papermill's way) that point it
at a tiny pretrained model dir (`cm3leon train` on the smoke task), the
random-weight VQ-GAN and the BPE of tests/data/task_data.py, and a folder of
shapes image + caption pairs; then the fine-tuned checkpoint, its training
loss and params, the prepared data, the sample PNGs and the inline images
are checked."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "tpu", "colab_finetune.ipynb")
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from conftest import SMALL, run_cli  # noqa: E402

PRE_STEPS, TRAIN_STEPS, NUM_PAIRS, NUM_VALIDATION, NUM_SAMPLES = 2, 4, 24, 4, 2
RESOLUTION = 32  # task_data's VQ-GAN: 32x32 -> 4x4 codes


def _read(path=NOTEBOOK):
    import nbformat

    return nbformat.read(path, as_version=4)


def _parameter_cell(nb) -> int:
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged 'parameters', found {len(found)}"
    return found[0]


def _names(source: str) -> set:
    import ast

    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def test_committed_notebook_is_clean_and_parameterised():
    nb = _read()
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit the notebook without outputs"
    params = nb.cells[_parameter_cell(nb)]
    assert params.cell_type == "code"
    names = _names(params.source)
    for name in ("INSTALL", "CONFIG", "INIT_MODEL_DIR", "VQGAN_DIR", "TEXT_TOKENIZER", "DATA", "TRAIN_STEPS",
                 "BATCH_SIZE", "OUTPUT_DIR"):
        assert name in names, f"the parameter cell lacks {name}"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny pretrained model dir, its tokenizers and a folder of pairs."""
    from PIL import Image
    from task_data import tiny_models

    from cm3leon_jax.data import shapes

    base = tmp_path_factory.mktemp("colab")
    models = tiny_models()  # VQ-GAN with the tiny codebook (512), BPE of the tiny text size (1472)
    pre = str(base / "pretrained")
    run_cli(["train", *SMALL, f"--gin.TRAIN_STEPS={PRE_STEPS}", f"--gin.train.checkpoint_every={PRE_STEPS}",
             f"--model_dir={pre}"])
    data = base / "pairs"
    data.mkdir()
    with open(data / "captions.jsonl", "w") as f:
        for i in range(NUM_PAIRS):
            ex = shapes.generate_example(11, i, RESOLUTION)
            Image.fromarray(ex.image).save(data / f"{i:04d}.png")
            f.write(json.dumps({"file": f"{i:04d}.png", "caption": ex.caption}) + "\n")
        f.write(json.dumps({"file": "", "caption": "a caption without an image"}) + "\n")  # no record from it
    return {"base": base, "pre": pre, "data": str(data), **models}


def _params(state_dir):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(state_dir)


@pytest.mark.slow
def test_notebook_runs_every_cell_on_cpu(inputs, monkeypatch):
    import jax
    import nbformat
    from nbclient import NotebookClient
    from PIL import Image

    base = inputs["base"]
    work, out = str(base / "work"), str(base / "sft_model")
    values = dict(
        INSTALL=False, WORK_DIR=work, CONFIG="gin/sft_shapes.gin", INIT_MODEL_DIR=inputs["pre"],
        VQGAN_DIR=inputs["vqgan_dir"], TEXT_TOKENIZER=inputs["text_tokenizer"], DATA=inputs["data"],
        FAMILIES=["captioning", "spatial"], NUM_VALIDATION=NUM_VALIDATION, MAX_TEXT_TOKENS=64,
        TASK_NAME="colab_test_sft", OUTPUT_DIR=out, TRAIN_STEPS=TRAIN_STEPS, BATCH_SIZE=4, LEARNING_RATE=1e-3,
        WARMUP_STEPS=1, CHECKPOINT_EVERY=TRAIN_STEPS, LOG_EVERY=1,
        EXTRA_GIN=["train.peak_flops_per_device = 1e11"],  # skip the matmul that measures the peak
        PROMPTS=None, NUM_SAMPLES=NUM_SAMPLES, CFG_SCALE=3.0, SEED=0, COMPARE_PARAMS=True, EXPORT_DIR=None)
    nb = _read()
    i = _parameter_cell(nb)
    unknown = set(values) - _names(nb.cells[i].source)
    assert not unknown, f"not parameters of the notebook: {sorted(unknown)}"
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, injected)

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits this process's environment
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}})
    try:
        client.execute()  # CellExecutionError (with the cell and traceback) when a cell fails
    finally:
        nbformat.write(nb, str(base / "executed.ipynb"))  # kept for a look when it fails

    # the prepared data: both families from the pairs, the held-out pairs in validation
    with open(os.path.join(work, "sft_data", "sft.json")) as f:
        splits = json.load(f)["splits"]
    n_train = NUM_PAIRS - NUM_VALIDATION
    assert {k: v["count"] for k, v in splits["train"]["families"].items()} == {"captioning": n_train,
                                                                              "spatial": n_train}
    assert splits["validation"]["count"] == 2 * NUM_VALIDATION

    # the fine-tuned model dir: checkpoint at TRAIN_STEPS, finite losses, params moved from the init's
    ckpt = os.path.join(out, "checkpoints", str(TRAIN_STEPS), "state")
    assert os.path.isdir(ckpt) and os.path.isfile(os.path.join(out, "config.gin"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, TRAIN_STEPS + 1))
    assert all(math.isfinite(x) and x > 0 for x in losses), losses
    with open(os.path.join(out, "config.gin")) as f:
        config = f.read()
    assert "MIXTURE_OR_TASK_NAME = 'colab_test_sft'" in config and "DecoderConfig.d_model = 64" in config
    a, b = _params(os.path.join(inputs["pre"], "checkpoints", str(PRE_STEPS), "state")), _params(ckpt)
    assert int(b["step"]) == TRAIN_STEPS
    pairs = list(zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])))
    assert pairs and all(np.shape(x) == np.shape(y) for x, y in pairs)
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs), "fine-tuning changed nothing"

    # text -> image samples for the held-out captions: PNGs of the VQ-GAN's size, samples.json, grid
    samples = os.path.join(work, "samples")
    with open(os.path.join(samples, "samples.json")) as f:
        report = json.load(f)
    assert report["step"] == TRAIN_STEPS and len(report["prompts"]) == NUM_VALIDATION
    files = [s["file"] for p in report["prompts"] for s in p["samples"]]
    assert len(files) == NUM_VALIDATION * NUM_SAMPLES
    pixels = []
    for name in files:
        img = np.asarray(Image.open(os.path.join(samples, name)))
        assert img.shape == (RESOLUTION, RESOLUTION, 3) and img.dtype == np.uint8
        pixels.append(img)
    assert np.ptp(np.stack(pixels)) > 0  # decoded images, not a blank fill
    assert os.path.isfile(os.path.join(samples, "grid.png"))

    # inline images (the grid, the matplotlib figures) and the captions of held-out images
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3, f"{len(images)} inline images"  # loss curve, grid, samples figure, captions
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert text.count("  model: ") == NUM_VALIDATION and "initialised params from" in text
