"""Multi-host start-up: `jax.distributed.initialize`, configured by gin or env.

Every process of a multi-host run must call `initialize_distributed()` before
any JAX call that touches devices (`jax.devices()`, `jax.process_index()`, the
first array); `cm3leon train` and `trainer.train()` do so first thing. For an
ordinary single-process run it does nothing.

Settings (a gin binding wins over its environment variable):

  gin `initialize_distributed.*`   env                            meaning
  mode                             CM3LEON_DISTRIBUTED            'auto' (default), 'on', 'off'
  coordinator_address              CM3LEON_COORDINATOR_ADDRESS    host:port of process 0
                                   (or JAX's JAX_COORDINATOR_ADDRESS)
  num_processes                    CM3LEON_NUM_PROCESSES          processes in the run
  process_id                       CM3LEON_PROCESS_ID             0 .. num_processes-1
  local_device_ids                 (JAX's JAX_LOCAL_DEVICE_IDS)   devices this process uses
  cpu_collectives                  CM3LEON_CPU_COLLECTIVES        'gloo' (default), 'mpi', 'none'
  initialization_timeout           CM3LEON_DISTRIBUTED_TIMEOUT    seconds to wait for the others
  cluster_detection_method         -                              passed to JAX ('mpi4py', ...)

Modes:
  auto: initialise when a coordinator address, a process count or a process id
        is set, or on a multi-host Cloud TPU slice (JAX then detects all the
        settings from the TPU metadata: on TPU VM pods nothing needs setting).
        Otherwise it is a single-process run and nothing happens.
  on:   always call `jax.distributed.initialize` with whatever is set; JAX
        detects the rest on TPU, Slurm, Open MPI (and mpi4py with
        cluster_detection_method='mpi4py').
  off:  never (even if the environment says otherwise).

CPU multi-process runs (tests, clusters without accelerators) need cross-process
CPU collectives: `jax_cpu_collectives_implementation` is set to
`cpu_collectives` ('gloo' unless told otherwise) before initialising. It only
concerns the CPU backend, so it is harmless on TPU/GPU hosts.

Calling it again is a no-op (idempotent); calling it once JAX's backends are up
while a multi-process run is requested raises an error saying so. Bad settings
raise `DistributedConfigError` naming the setting (`cm3leon train` prints it
and exits 2). When the coordinator cannot be reached within the timeout, JAX
itself aborts the process (DEADLINE_EXCEEDED); the line printed just before
says which address, process id and count were tried.

Example, 2 processes on one machine (CPU), each started with
  CM3LEON_COORDINATOR_ADDRESS=localhost:12355 CM3LEON_NUM_PROCESSES=2
  CM3LEON_PROCESS_ID=0 (resp. 1) cm3leon train --gin_file=gin/cm3leon_tiny.gin ...
"""
from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Optional, Sequence, Union

import gin

log = logging.getLogger(__name__)

ENV_MODE = "CM3LEON_DISTRIBUTED"
ENV_COORDINATOR = "CM3LEON_COORDINATOR_ADDRESS"
JAX_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CM3LEON_NUM_PROCESSES"
ENV_PROCESS_ID = "CM3LEON_PROCESS_ID"
ENV_CPU_COLLECTIVES = "CM3LEON_CPU_COLLECTIVES"
ENV_TIMEOUT = "CM3LEON_DISTRIBUTED_TIMEOUT"

MODES = ("auto", "on", "off")
CPU_COLLECTIVES = ("gloo", "mpi", "none")


class DistributedConfigError(ValueError):
    """A bad or inconsistent multi-host setting; the message names it."""


def _setting(value, env: str, gin_name: str, kind=str):
    """(value, where it came from) from the gin argument, else the env var."""
    if value is not None:
        return value, f"initialize_distributed.{gin_name}"
    raw = os.environ.get(env)
    if raw is None or raw.strip() == "":
        return None, None
    if kind is int:
        try:
            return int(raw.strip()), env
        except ValueError:
            raise DistributedConfigError(
                f"{env}={raw!r} is not an integer; set it to the {gin_name.replace('_', ' ')} "
                "(or unset it for a single-process run)") from None
    return raw.strip(), env


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - private API; unknown means "assume not"
        return False


@functools.lru_cache(maxsize=1)
def _multihost_tpu_detected() -> bool:
    """A Cloud TPU slice with more than one host (JAX's own detection)."""
    try:
        from jax._src import clusters
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except Exception:  # noqa: BLE001 - private API moved: be conservative
        return False
    if not running_in_cloud_tpu_vm:
        return False
    for env in clusters.ClusterEnv._cluster_types:  # noqa: SLF001 - JAX has no public probe
        if "tpu" not in env.__name__.lower() or getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.get_process_count() > 1
        except Exception as e:  # noqa: BLE001 - metadata unreachable: treat as one host
            log.warning("TPU cluster detection (%s) failed: %s; assuming a single host "
                        "(set %s=on to force jax.distributed.initialize)", env.__name__, e, ENV_MODE)
            return False
    return False


@gin.configurable
def initialize_distributed(mode: Optional[str] = None,
                           coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Union[int, Sequence[int]]] = None,
                           cpu_collectives: Optional[str] = None,
                           initialization_timeout: Optional[int] = None,
                           cluster_detection_method: Optional[str] = None) -> bool:
    """Initialises JAX's multi-process runtime when the run is multi-process.

    Returns True when JAX runs distributed (initialised now or before), False
    for a single-process run. See the module docstring for the settings.
    """
    import jax

    mode, mode_from = _setting(mode, ENV_MODE, "mode")
    mode = (mode or "auto").lower()
    if mode not in MODES:
        raise DistributedConfigError(f"{mode_from}={mode!r}: must be one of {', '.join(MODES)}")

    already = jax.distributed.is_initialized()
    if mode == "off":
        return already

    address, address_from = _setting(coordinator_address, ENV_COORDINATOR, "coordinator_address")
    if address is None:
        address, address_from = _setting(None, JAX_ENV_COORDINATOR, "coordinator_address")
    nproc, nproc_from = _setting(num_processes, ENV_NUM_PROCESSES, "num_processes", int)
    pid, pid_from = _setting(process_id, ENV_PROCESS_ID, "process_id", int)
    collectives, coll_from = _setting(cpu_collectives, ENV_CPU_COLLECTIVES, "cpu_collectives")
    timeout, timeout_from = _setting(initialization_timeout, ENV_TIMEOUT, "initialization_timeout", int)

    if collectives is not None and collectives.lower() not in CPU_COLLECTIVES:
        raise DistributedConfigError(
            f"{coll_from}={collectives!r}: must be one of {', '.join(CPU_COLLECTIVES)} "
            "('gloo' for CPU multi-process runs)")
    if nproc is not None and nproc < 1:
        raise DistributedConfigError(f"{nproc_from}={nproc}: the number of processes must be >= 1")
    if pid is not None and (pid < 0 or (nproc is not None and pid >= nproc)):
        raise DistributedConfigError(
            f"{pid_from}={pid} is out of range: process ids are 0 .. num_processes-1"
            + (f" (num_processes={nproc} from {nproc_from})" if nproc is not None else ""))
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise DistributedConfigError(
            f"{address_from}={address!r} needs a port: write HOST:PORT, the address of process 0 and a "
            "free port, the same on every process")
    if timeout is not None and timeout <= 0:
        raise DistributedConfigError(f"{timeout_from}={timeout}: the timeout must be positive seconds")

    explicit = any(v is not None for v in (address, nproc, pid)) or cluster_detection_method is not None
    if already:
        _check_consistent(nproc, nproc_from, pid, pid_from)
        return True
    if mode == "auto":
        if not explicit and not _multihost_tpu_detected():
            return False  # an ordinary single-process run
        if nproc == 1 and address is None:
            return False  # explicitly one process, nothing to coordinate

    if _backends_initialized():
        what = ", ".join(w for w in (address_from, nproc_from, pid_from) if w) or f"{ENV_MODE}={mode}"
        raise DistributedConfigError(
            f"a multi-process run is requested ({what}) but JAX's backends are already initialised, so "
            "jax.distributed.initialize can no longer run: call "
            "cm3leon_jax.distributed.initialize_distributed() first in the program, before any JAX call "
            "that touches devices (jax.devices(), jax.process_index(), creating arrays)")
    if explicit and cluster_detection_method is None:
        missing = [(name, env) for name, env, v in (
            ("coordinator_address", ENV_COORDINATOR, address), ("num_processes", ENV_NUM_PROCESSES, nproc),
            ("process_id", ENV_PROCESS_ID, pid)) if v is None]
        if missing and not _multihost_tpu_detected():
            # JAX could still detect them under Slurm / Open MPI; elsewhere it
            # fails with a terse message, so name what to set.
            from jax._src import clusters

            detected = any(e.is_env_present() for e in clusters.ClusterEnv._cluster_types  # noqa: SLF001
                           if not getattr(e, "opt_in_only_method", False))
            if not detected:
                given = ", ".join(f"{w}" for w in (address_from, nproc_from, pid_from) if w)
                raise DistributedConfigError(
                    f"multi-process settings are incomplete: {given} set, but not "
                    + ", ".join(f"{name} (env {env} or --gin.initialize_distributed.{name}=...)"
                                for name, env in missing)
                    + "; every process needs the coordinator address (HOST:PORT of process 0), the "
                      "number of processes and its own process id")

    impl = (collectives or "gloo").lower()
    jax.config.update("jax_cpu_collectives_implementation", None if impl == "none" else impl)
    kwargs = dict(coordinator_address=address, num_processes=nproc, process_id=pid,
                  local_device_ids=local_device_ids, cluster_detection_method=cluster_detection_method)
    if timeout is not None:
        kwargs["initialization_timeout"] = timeout
    # JAX aborts the process (not an exception) when the coordinator cannot be
    # reached in time: say beforehand what is being tried.
    print(f"jax.distributed.initialize: process {'?' if pid is None else pid} of "
          f"{'?' if nproc is None else nproc}, coordinator {address or '(detected)'}, timeout "
          f"{timeout or 300} s (an abort with DEADLINE_EXCEEDED means the other processes or the "
          f"coordinator were not reachable in time: same {ENV_COORDINATOR} and {ENV_NUM_PROCESSES} on "
          f"every process, distinct {ENV_PROCESS_ID}; raise {ENV_TIMEOUT})", file=sys.stderr, flush=True)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as e:
        given = ", ".join(f"{name}={v!r} (from {w})" for name, v, w in (
            ("coordinator_address", address, address_from), ("num_processes", nproc, nproc_from),
            ("process_id", pid, pid_from)) if v is not None) or "nothing set"
        raise DistributedConfigError(
            f"jax.distributed.initialize (mode {mode!r}, {given}) failed: {str(e).rstrip('.')}; outside TPU / Slurm / Open MPI "
            f"clusters set {ENV_COORDINATOR} (HOST:PORT of process 0), {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} "
            "(or gin initialize_distributed.*) on every process") from e
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
        raise RuntimeError(
            f"jax.distributed.initialize failed (process {pid} of {nproc}, coordinator {address}): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}. Start every process with the same "
            f"coordinator address and process count and distinct process ids; process 0 must be reachable "
            f"at that address (raise {ENV_TIMEOUT} / initialize_distributed.initialization_timeout if the "
            "others start late)") from e
    from jax._src import distributed as jd

    log.info("jax.distributed initialised: process %s of %s (coordinator %s)", jd.global_state.process_id,
             jd.global_state.num_processes, jd.global_state.coordinator_address)
    return True


def _check_consistent(nproc, nproc_from, pid, pid_from):
    from jax._src import distributed as jd

    state = jd.global_state
    if nproc is not None and state.num_processes is not None and nproc != state.num_processes:
        raise DistributedConfigError(
            f"{nproc_from}={nproc} but jax.distributed is already initialised with "
            f"{state.num_processes} processes")
    if pid is not None and state.process_id is not None and pid != state.process_id:
        raise DistributedConfigError(
            f"{pid_from}={pid} but jax.distributed is already initialised as process {state.process_id}")
