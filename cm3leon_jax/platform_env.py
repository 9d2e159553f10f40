"""Which accelerator this machine has, told to JAX and TensorFlow before they load.

On a machine with no accelerator, two libraries installed for other machines
go looking for hardware at start-up and print errors that mean nothing here:
- JAX, with `JAX_PLATFORMS` unset, tries every backend it knows. The `test`
  and `tpu` extras install libtpu, so it loads libtpu, which asks for a TPU
  worker list and host bounds that only a TPU VM has (`Failed to find host
  bounds for accelerator type`, `WARNING: Logging before InitGoogle()`,
  `E0000 ... TPU_WORKER_HOSTNAMES`, a source-location trace). It also takes
  /tmp/libtpu_lockfile for the life of the process, so one CPU training run
  keeps every other process (`cm3leon compile` included) from loading libtpu.
- TensorFlow (the SeqIO / tf.data input side) registers its GPU device factory
  and calls cuInit when it first makes a device, and logs `failed call to
  cuInit` when no CUDA driver answers.

The fix removes the probes, not the log lines: before either library is
imported (`cli.main`, which `python -m cm3leon_jax.train` also runs),
`apply()` looks for accelerator device files and
- with no TPU and no GPU, sets `JAX_PLATFORMS=cpu`, so JAX never loads
  libtpu (nor a CUDA plugin);
- with no GPU, sets `TF_ENABLED_DEVICE_TYPES=CPU`, so TensorFlow registers
  only its CPU device factory and never calls cuInit. TensorFlow only feeds
  the input pipeline on the host here, so this holds on a TPU VM too, where it
  also keeps TensorFlow off the TPU that JAX owns;
- sets `TF_CPP_MIN_LOG_LEVEL=1` (INFO hidden, warnings and errors kept), the
  value `import jax` sets anyway, so the output does not depend on whether a
  command happens to import TensorFlow before JAX.
Every variable the user has set, even to an empty string, is left as it is:
an explicit `JAX_PLATFORMS` always wins.

A TPU is recognised by its device files, `/dev/accel<N>` (v2-v5p) or
`/dev/vfio/<N>` (v5e and newer), or by the variables a TPU VM, a GKE TPU pod
or libtpu's own advice set (`TPU_ACCELERATOR_TYPE`, `TPU_WORKER_HOSTNAMES`,
`JAX_FORCE_TPU_INIT`); a GPU by `/dev/nvidia<N>`, `/dev/nvidiactl`,
`/dev/dxg` (WSL2) or `/dev/kfd` (ROCm). Where any is found JAX's own platform
choice is left alone, so a TPU VM or a GPU machine behaves as without this
module. `TPU_LIBRARY_PATH` and `TPU_SKIP_MDS_QUERY` are no evidence: `import
jax` sets them on any machine with libtpu, and child processes inherit them.
A doubtful device file only costs the old noise, never a missed accelerator.
"""
from __future__ import annotations

import os
import re
from typing import Dict, FrozenSet, MutableMapping, Optional

TPU = "tpu"
GPU = "gpu"

# Names in /dev (or, for `vfio/`, in /dev/vfio) that mean an accelerator.
_TPU_DEVICE_FILES = (("", re.compile(r"accel\d+")), ("vfio", re.compile(r"\d+")))
_GPU_DEVICE_FILES = (("", re.compile(r"nvidia\d+|nvidiactl|dxg|kfd")),)
TPU_ENV_VARS = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "JAX_FORCE_TPU_INIT")


def _has_device_file(dev_dir: str, patterns) -> bool:
    for sub, pattern in patterns:
        try:
            names = os.listdir(os.path.join(dev_dir, sub) if sub else dev_dir)
        except OSError:  # no such dir, or not readable: nothing found there
            continue
        if any(pattern.fullmatch(n) for n in names):
            return True
    return False


def find_accelerators(environ: Optional[MutableMapping[str, str]] = None,
                      dev_dir: str = "/dev") -> FrozenSet[str]:
    """The accelerator kinds present: a subset of {TPU, GPU}."""
    environ = os.environ if environ is None else environ
    found = set()
    if _has_device_file(dev_dir, _TPU_DEVICE_FILES) or any(environ.get(v) for v in TPU_ENV_VARS):
        found.add(TPU)
    if _has_device_file(dev_dir, _GPU_DEVICE_FILES):
        found.add(GPU)
    return frozenset(found)


def settings_for(accelerators: FrozenSet[str], environ: MutableMapping[str, str]) -> Dict[str, str]:
    """The variables to set for these accelerators; none the user has set."""
    wanted = {"TF_CPP_MIN_LOG_LEVEL": "1"}
    if not accelerators:
        wanted["JAX_PLATFORMS"] = "cpu"
    if GPU not in accelerators:
        wanted["TF_ENABLED_DEVICE_TYPES"] = "CPU"
    return {k: v for k, v in wanted.items() if k not in environ}


def apply(environ: Optional[MutableMapping[str, str]] = None, dev_dir: str = "/dev") -> Dict[str, str]:
    """Sets (in `environ`, default os.environ) what `settings_for` says and
    returns it. Call it before jax or tensorflow is imported; later it
    changes nothing in this process (only in its children)."""
    environ = os.environ if environ is None else environ
    chosen = settings_for(find_accelerators(environ, dev_dir), environ)
    environ.update(chosen)
    return chosen
