"""On a machine without an accelerator, `cm3leon train` and `cm3leon generate`
print none of the TPU / CUDA probing errors (cm3leon_jax/platform_env.py).

The CLI runs as a user's shell starts it: JAX_PLATFORMS unset (conftest sets
it for every other test, which would hide the TPU probe), and without the
variables an earlier `import jax` in this process leaves behind.
ALLOW_MULTIPLE_LIBTPU_LOAD makes a probing libtpu print its errors even while
another process holds /tmp/libtpu_lockfile, so the test does not depend on
what else runs on the machine.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "tests", "data"))
from conftest import SMALL  # noqa: E402

from cm3leon_jax import platform_env  # noqa: E402

NOISE = ("E0000", "cuInit", "TPU_WORKER_HOSTNAMES", "host bounds", "InitGoogle")

pytestmark = pytest.mark.skipif(bool(platform_env.find_accelerators()),
                                reason="this machine has an accelerator; the test is about one without")


def _user_env():
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    for name in ("JAX_PLATFORMS", "TF_ENABLED_DEVICE_TYPES", "TF_CPP_MIN_LOG_LEVEL", "TPU_LIBRARY_PATH",
                 "TPU_SKIP_MDS_QUERY", "XLA_FLAGS"):
        env.pop(name, None)
    return env


def _run(module, args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=_user_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{module} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _noise(stderr):
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


def test_importing_the_cli_imports_neither_jax_nor_tensorflow():
    """platform_env.apply() runs in main(); it is in time only if nothing
    cli.py imports at module level has loaded jax or tensorflow already."""
    code = ("import sys, cm3leon_jax.cli; "
            "print(sorted(m for m in ('jax', 'jaxlib', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_user_env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_train_and_generate_print_no_accelerator_probe_errors(tmp_path):
    from task_data import tiny_models

    model_dir = tmp_path / "model"
    # `python -m cm3leon_jax.train`, the second entry point, on the data-free task (TensorFlow
    # input pipeline, so TensorFlow's CUDA probe would run), then `cm3leon generate`.
    train = _run("cm3leon_jax.train", [*SMALL, "--gin.TRAIN_STEPS=2", f"--model_dir={model_dir}"])
    assert "step 2/2" in train.stdout + train.stderr
    models = tiny_models()
    gen = _run("cm3leon_jax.cli", ["generate", f"--model_dir={model_dir}", "--prompt=a red circle",
                                   "--num_samples=1", f"--out={tmp_path / 'out'}",
                                   *(f"--{k}={v}" for k, v in models.items())])
    assert (tmp_path / "out" / "000_0.png").exists()
    assert _noise(train.stderr) == [], train.stderr
    assert _noise(gen.stderr) == [], gen.stderr
    # Real warnings still reach the user.
    assert "uncached FunctionDataset" in train.stderr
