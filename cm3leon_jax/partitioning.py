"""Device mesh and logical-axis partitioning (pjit = jax.jit + NamedSharding).

The mesh has three axes, (data, fsdp, model), sized in gin; one size may be -1,
meaning "all the devices left". Which array dimension is split over which mesh
axis is data, not code: a list of (logical axis, mesh axes) rules in gin, read
first-match-wins by flax's `logical_to_mesh_sharding` (a mesh axis already used
by an earlier dimension of the same array is skipped).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# Parameters: embed over fsdp (ZeRO-3 style), heads/mlp/vocab over model
# (Megatron tensor parallelism). Activations: batch over (data, fsdp).
DEFAULT_LOGICAL_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "model"),
    ("activation_kv", None),
    ("activation_mlp", "model"),
    ("activation_vocab", "model"),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("embed_compute", None),  # a weight's embed dim at its matmul: gathered (decoder._param)
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("layers", None),
    ("max_length", None),
    ("image_grid", None),
)


@gin.configurable
def logical_axis_rules(rules: Sequence = DEFAULT_LOGICAL_RULES):
    """The rules in force (bind `logical_axis_rules.rules` in gin)."""
    return tuple((name, tuple(m) if isinstance(m, list) else m) for name, m in rules)


def resolve_mesh_shape(data: int, fsdp: int, model: int, num_devices: int) -> tuple:
    sizes = [data, fsdp, model]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, model={model}): at most one size may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh (data={data}, fsdp={fsdp}, model={model}): sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh (data={data}, fsdp={fsdp}, model={model}): {num_devices} devices are not "
                f"divisible by {known}; change create_mesh.* in gin")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh (data={data}, fsdp={fsdp}, model={model}) needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one size to -1 or change create_mesh.* in gin")
    return tuple(sizes)


@gin.configurable
def create_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, model, len(devices))
    try:
        from jax.experimental import mesh_utils
        device_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # mesh_utils knows the physical topology of TPU/GPU slices only: for
        # CPU devices, or a shape it cannot map onto the slice, it refuses,
        # and device order is as good as any (no interconnect to respect).
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def logical_to_shardings(logical_specs, mesh: Mesh, rules=None):
    """Tree of logical PartitionSpecs -> tree of NamedShardings."""
    rules = logical_axis_rules() if rules is None else rules
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def abstract_with_shardings(init_fn, mesh: Mesh, rules=None):
    """Abstract (unboxed) output of `init_fn()` and its NamedShardings.

    `init_fn` returns a tree holding flax `LogicallyPartitioned` boxes (a
    TrainState whose params and optimizer moments carry logical names).
    """
    rules = logical_axis_rules() if rules is None else rules
    boxed = jax.eval_shape(init_fn)
    specs = nn.get_partition_spec(boxed)
    shardings = logical_to_shardings(specs, mesh, rules)
    return nn.meta.unbox(boxed), shardings


def batch_sharding(mesh: Mesh, rules=None) -> NamedSharding:
    """Sharding of a [batch, length] input array."""
    rules = logical_axis_rules() if rules is None else rules
    spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch_from_local(local_batch: dict, mesh: Mesh, rules=None) -> dict:
    """Per-host numpy batch -> global jax.Arrays (one shard per host)."""
    sharding = batch_sharding(mesh, rules)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


class RulesInForce:
    """A jitted function that is traced (called or lowered) with `mesh` set
    and the logical axis `rules` in force, so that the model's
    `nn.with_logical_constraint` calls on activations become real sharding
    constraints; without both, flax makes them no-ops and XLA is left to
    guess the activations' layout (on v5e-256 it replicated the batch of a
    7B step: `cm3leon compile`)."""

    def __init__(self, jitted, mesh: Mesh, rules=None):
        self.jitted = jitted
        self.mesh = mesh
        self.rules = logical_axis_rules() if rules is None else rules

    @contextlib.contextmanager
    def _in_force(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def __call__(self, *args, **kwargs):
        with self._in_force():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with self._in_force():
            return self.jitted.lower(*args, **kwargs)
