"""platform_env: accelerators found from fake /dev trees and environments, and
the variables set for them (never one the user set)."""
import os

import pytest

from cm3leon_jax import platform_env
from cm3leon_jax.platform_env import GPU, TPU

CPU_ONLY = {"JAX_PLATFORMS": "cpu", "TF_ENABLED_DEVICE_TYPES": "CPU", "TF_CPP_MIN_LOG_LEVEL": "1"}


def _dev(tmp_path, *names):
    """A fake /dev holding empty files (or, for `vfio/N`, a vfio dir)."""
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in names:
        path = dev / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    return str(dev)


@pytest.mark.parametrize("names, env, found", [
    ((), {}, set()),
    (("null", "tty0", "nvme0n1", "vfio/vfio", "nvidia-uvm", "accel"), {}, set()),  # look-alikes
    (("accel0",), {}, {TPU}),                       # v2-v5p TPU VM
    (("accel0", "accel1", "accel2", "accel3"), {}, {TPU}),
    (("vfio/vfio", "vfio/0"), {}, {TPU}),           # v5e / v6e TPU VM
    (("nvidia0", "nvidiactl"), {}, {GPU}),
    (("nvidiactl",), {}, {GPU}),                    # Docker with the driver mounted
    (("dxg",), {}, {GPU}),                          # WSL2
    (("kfd",), {}, {GPU}),                          # ROCm
    (("accel0", "nvidia0"), {}, {TPU, GPU}),
    ((), {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}, {TPU}),
    ((), {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, {TPU}),  # a GKE TPU pod
    ((), {"JAX_FORCE_TPU_INIT": "1"}, {TPU}),
    # What `import jax` leaves in any environment with libtpu: no evidence.
    ((), {"TPU_LIBRARY_PATH": "/x/libtpu.so", "TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": ""}, set()),
])
def test_find_accelerators(tmp_path, names, env, found):
    assert platform_env.find_accelerators(env, _dev(tmp_path, *names)) == found


def test_no_dev_dir_means_no_accelerator(tmp_path):
    assert platform_env.find_accelerators({}, str(tmp_path / "absent")) == set()


@pytest.mark.parametrize("found, expected", [
    (set(), CPU_ONLY),
    ({TPU}, {"TF_ENABLED_DEVICE_TYPES": "CPU", "TF_CPP_MIN_LOG_LEVEL": "1"}),  # JAX finds the TPU itself
    ({GPU}, {"TF_CPP_MIN_LOG_LEVEL": "1"}),
    ({TPU, GPU}, {"TF_CPP_MIN_LOG_LEVEL": "1"}),
])
def test_settings_for(found, expected):
    assert platform_env.settings_for(frozenset(found), {}) == expected


@pytest.mark.parametrize("user", [
    {"JAX_PLATFORMS": "tpu"}, {"JAX_PLATFORMS": ""}, {"TF_ENABLED_DEVICE_TYPES": "CPU,GPU"},
    {"TF_CPP_MIN_LOG_LEVEL": "0"}])
def test_a_variable_the_user_set_is_kept(tmp_path, user):
    env = dict(user, HOME="/root")
    chosen = platform_env.apply(env, _dev(tmp_path))
    assert chosen == {k: v for k, v in CPU_ONLY.items() if k not in user}
    assert env == dict(user, HOME="/root", **chosen)


def _unset(monkeypatch, *names):
    for name in names:  # set first, so that teardown restores the variable apply() sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_apply_sets_os_environ_once(tmp_path, monkeypatch):
    _unset(monkeypatch, *CPU_ONLY, *platform_env.TPU_ENV_VARS)
    dev = _dev(tmp_path)
    assert platform_env.apply(dev_dir=dev) == CPU_ONLY
    assert {k: os.environ[k] for k in CPU_ONLY} == CPU_ONLY
    assert platform_env.apply(dev_dir=dev) == {}  # a child process inherits the choice and keeps it


def test_on_a_tpu_vm_jax_is_left_alone(tmp_path, monkeypatch):
    _unset(monkeypatch, *CPU_ONLY, *platform_env.TPU_ENV_VARS)
    platform_env.apply(dev_dir=_dev(tmp_path, "vfio/vfio", "vfio/0"))
    assert "JAX_PLATFORMS" not in os.environ
    assert os.environ["TF_ENABLED_DEVICE_TYPES"] == "CPU"
