"""CLI: fast --help, gin errors in one line before any work, info figures."""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

from conftest import REPO, SMALL
from cm3leon_jax import gin_utils, partitioning


def _cm3leon(*args, timeout=120):
    exe = os.path.join(os.path.dirname(sys.executable), "cm3leon")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "cm3leon_jax.cli"]
    return subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["info", "--help"]])
def test_help_is_fast_and_lists_commands(args):
    t0 = time.perf_counter()
    proc = _cm3leon(*args)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0
    assert elapsed < 2.0, f"--help took {elapsed:.2f}s"
    if args == ["--help"]:
        assert "train" in proc.stdout and "info" in proc.stdout
    else:
        assert "--gin_file" in proc.stdout


def _error_lines(proc):
    return [l for l in proc.stderr.splitlines() if l.startswith("error:")]


def test_missing_required_macro_fails_before_work_with_one_line(tmp_path):
    t0 = time.perf_counter()
    proc = _cm3leon("train", "--gin_file=gin/cm3leon_tiny.gin")  # no --model_dir
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "MODEL_DIR" in lines[0] and "REQUIRED" in lines[0], proc.stderr
    assert time.perf_counter() - t0 < 60


def test_required_run_macro_missing(tmp_path):
    proc = _cm3leon("train", "--gin_file=gin/runs/pretrain.gin", "--gin_file=gin/models/cm3leon_tiny.gin",
                    f"--model_dir={tmp_path}")
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1
    assert "MIXTURE_OR_TASK_NAME" in lines[0] and "also missing" in lines[0]
    assert not os.listdir(tmp_path)  # no work was done


def test_unknown_binding_names_it(tmp_path):
    proc = _cm3leon("train", "--gin_file=gin/cm3leon_tiny.gin", "--gin.DecoderConfig.nope=3",
                    f"--model_dir={tmp_path}")
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "DecoderConfig.nope" in lines[0], proc.stderr
    proc = _cm3leon("train", "--gin_file=gin/cm3leon_tiny.gin", "--gin.NoSuchThing.x=3",
                    f"--model_dir={tmp_path}")
    assert proc.returncode == 2 and "NoSuchThing" in _error_lines(proc)[0]


def test_unknown_task_and_missing_gin_file(tmp_path):
    proc = _cm3leon("train", "--gin_file=gin/cm3leon_tiny.gin", "--gin.MIXTURE_OR_TASK_NAME='nope_task'",
                    f"--model_dir={tmp_path}")
    assert proc.returncode == 2
    lines = _error_lines(proc)
    assert len(lines) == 1 and "nope_task" in lines[0] and "synthetic_lm" in lines[0]
    proc = _cm3leon("train", "--gin_file=gin/does_not_exist.gin", f"--model_dir={tmp_path}")
    assert proc.returncode == 2 and "does_not_exist.gin" in _error_lines(proc)[0]


def test_info_7b_counts():
    proc = _cm3leon("info", "--gin_file=gin/cm3leon_7b.gin", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 6.5e9 <= info["params_total"] <= 7.5e9
    assert info["vocab_size"] == 64512
    # 32 layers x (4 d^2 + 2 d 4d) with d = 4096, computed by hand
    assert info["params_non_embedding"] == 32 * (4 * 4096 ** 2 + 2 * 4096 * 16384)
    assert info["params_embedding"] == 2 * 64512 * 4096 + 4096 * 4096
    assert info["params_total"] == info["params_non_embedding"] + info["params_embedding"]
    human = _cm3leon("info", "--gin_file=gin/cm3leon_7b.gin").stdout
    assert "non-embedding" in human and "embedding, all" in human and "count one embedding" in human


@pytest.mark.parametrize("name,layers,d", [("350m", 24, 1024), ("760m", 24, 1536), ("tiny", 4, 128)])
def test_info_other_configs(name, layers, d):
    proc = _cm3leon("info", f"--gin_file=gin/cm3leon_{name}.gin", "--json")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["num_layers"] == layers and info["d_model"] == d
    assert info["d_ff"] == 4 * d


def test_split_gin_dot_flags():
    rest, b = gin_utils.split_gin_dot_flags(["train", "--gin.TRAIN_STEPS=3", "--gin.train.x", "5", "--a=1"])
    assert rest == ["train", "--a=1"]
    assert b == ["TRAIN_STEPS = 3", "train.x = 5"]


def test_resolve_mesh_shape():
    assert partitioning.resolve_mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert partitioning.resolve_mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    assert partitioning.resolve_mesh_shape(-1, 1, 1, 1) == (1, 1, 1)
    with pytest.raises(ValueError, match="at most one"):
        partitioning.resolve_mesh_shape(-1, -1, 1, 8)
    with pytest.raises(ValueError, match="not divisible"):
        partitioning.resolve_mesh_shape(-1, 3, 1, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        partitioning.resolve_mesh_shape(2, 2, 1, 8)


def test_python_m_train_equivalent(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "cm3leon_jax.train", *SMALL, "--gin.TRAIN_STEPS=3",
                           f"--model_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "config.gin").exists()
    assert "TRAIN_STEPS = 3" in (tmp_path / "config.gin").read_text()
    assert (tmp_path / "checkpoints" / "3").exists()


@pytest.mark.parametrize("path", sorted(str(p.relative_to(gin_utils.REPO_ROOT))
                                        for p in pathlib.Path(gin_utils.REPO_ROOT, "gin").rglob("*.gin")))
def test_every_gin_file_parses(path):
    """Each shipped gin file's bindings name real configurables (the modules
    its commands import before parsing)."""
    import gin

    from cm3leon_jax.commands.clip import CLIP_MODULES
    from cm3leon_jax.commands.tokenizer import VQ_MODULES
    from cm3leon_jax.data.pipeline import TRAIN_DATA_MODULES

    modules = TRAIN_DATA_MODULES + VQ_MODULES + CLIP_MODULES + ("cm3leon_jax.demo.pipeline",)
    try:
        gin_utils.parse([path], [], extra_modules=modules, check_required=False)
    finally:
        gin.clear_config()


def test_written_bindings_read_back_the_resolved_config(tmp_path):
    """planned_train_steps (demo) and architecture_bindings (finetune) read a
    model dir's config.gin through read_written_bindings: checked on what
    gin.config_str() really writes, a value gin wraps over lines included."""
    import gin

    from cm3leon_jax.commands import sft
    from cm3leon_jax.demo import pipeline

    lengths = {f"feature_with_a_long_name_{i}": 64 * i for i in range(6)}  # > 80 chars: gin wraps it
    try:
        gin_utils.parse([os.path.join(REPO, "gin", "cm3leon_tiny.gin")],
                        ["TRAIN_STEPS = 1234", f"TASK_FEATURE_LENGTHS = {lengths!r}",
                         f"MODEL_DIR = {str(tmp_path)!r}"])
        path = gin_utils.write_config(str(tmp_path))
    finally:
        gin.clear_config()
    text = open(path).read()
    assert "TASK_FEATURE_LENGTHS = \\\n    {'feature_with" in text  # really wrapped
    bindings = gin_utils.read_written_bindings(path)
    assert gin_utils.written_value(bindings, "TASK_FEATURE_LENGTHS") == lengths
    assert bindings["train.train_steps"] == "%TRAIN_STEPS"
    assert gin_utils.written_value(bindings, "train.train_steps") == 1234
    assert gin_utils.written_value(bindings, "DecoderConfig.vocab_size") is None  # @vocab_size(): not a literal
    assert pipeline.planned_train_steps(str(tmp_path)) == 1234
    arch = sft.architecture_bindings(path)
    assert "DecoderConfig.d_model = 128" in arch and "UnifiedVocabulary.image_codebook_size = 512" in arch
    assert all(b.split(".")[0] in ("DecoderConfig", "UnifiedVocabulary") for b in arch)
    assert pipeline.planned_train_steps(str(tmp_path / "nowhere")) is None
