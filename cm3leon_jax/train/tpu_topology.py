"""TPU slices described without a TPU: the chip generations (HBM, bf16
peak, how slice names count), parsing a slice name such as `v5e-256` into
its chip grid, and the devices libtpu describes for it (what `cm3leon
compile`, train/compile.py, compiles for)."""
from __future__ import annotations

import dataclasses
import math
import os
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: HBM per chip, bf16 peak per chip, how its slice
    names count (TensorCores for v4/v5p, chips for v5e/v6e), the libtpu chip
    config (megacore = one JAX device per chip) and the torus dimensions."""

    generation: str
    hbm_bytes: int
    peak_bf16_flops: float
    cores_per_chip_in_name: int
    chip_config_name: str
    dims: int


# Public figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 2, "megacore", 3),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 1, "default", 2),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2, "megacore", 3),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1, "default", 2),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v6litepod": "v6e"}

# Chip grids of the standard slice shapes (x, y[, z]).
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
             8960: (16, 20, 28)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str          # as the user wrote it, e.g. v5e-256
    chip: Chip
    grid: tuple        # chips per dimension
    num_chips: int

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.grid))}"


def parse_topology(name: str) -> Topology:
    """`v5e-256`, `v5litepod-256`, `v4-128` (TensorCores, as Cloud names
    them), `v5p-128`, `v6e-64`, or an explicit chip grid `v5e:16x16` /
    `v4:4x4x4`."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", text)
    gen = _ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or gen not in CHIPS:
        raise ValueError(f"--topology={name!r}: use GENERATION-SIZE (v5e-256, v4-128, v5p-128, v6e-64) "
                         f"or GENERATION:GRID (v5e:16x16, v4:4x4x4); generations: {', '.join(CHIPS)}")
    chip = CHIPS[gen]
    if m.group(3):
        grid = tuple(int(x) for x in m.group(3).split("x"))
        if len(grid) != chip.dims:
            raise ValueError(f"--topology={name!r}: {gen} slices have a {chip.dims}-D chip grid")
    else:
        size = int(m.group(2))
        if size % chip.cores_per_chip_in_name:
            raise ValueError(f"--topology={name!r}: {gen} sizes count TensorCores "
                             f"({chip.cores_per_chip_in_name} per chip); use an even size")
        chips = size // chip.cores_per_chip_in_name
        grids = _GRIDS_2D if chip.dims == 2 else _GRIDS_3D
        if chips not in grids:
            sizes = ", ".join(f"{gen}-{c * chip.cores_per_chip_in_name}" for c in grids)
            raise ValueError(f"--topology={name!r}: no standard {gen} slice of {chips} chips; one of {sizes}, "
                             f"or give the grid ({gen}:AxB{'xC' if chip.dims == 3 else ''})")
        grid = grids[chips]
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    return Topology(name, chip, tuple(grid), math.prod(grid3))


def topology_devices(topo: Topology) -> list:
    """The TPU devices of the slice (needs libtpu: `pip install -e '.[tpu]'`)."""
    # libtpu takes /tmp/libtpu_lockfile for the life of a process that loads
    # it; describing a topology needs no TPU, so do not refuse to start when
    # another process on this host (a second compile, a test) holds it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax
        raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from None
    grid3 = tuple(topo.grid) + (1,) * (3 - len(topo.grid))
    host = tuple(min(g, b) for g, b in zip(grid3, (2, 2, 1)))
    # v4 / v5p full cubes are tori; v5e / v6e slices have no wrap-around links.
    wrap = tuple(topo.chip.dims == 3 and g >= 4 for g in grid3)
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.topology_name,
                                            chip_config_name=topo.chip.chip_config_name,
                                            chips_per_host_bounds=host, num_slices=1, wrap=wrap)
    except Exception as e:  # noqa: BLE001 - libtpu raises plain RuntimeErrors / XlaRuntimeErrors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "tpu" in msg.lower() and ("not found" in msg.lower() or "unknown backend" in msg.lower()
                                     or "no module" in msg.lower()):
            raise RuntimeError(f"cannot describe {topo.name}: the TPU compiler is missing ({msg}); "
                               "install the tpu extra: pip install -e '.[tpu]'") from None
        raise RuntimeError(f"cannot describe TPU topology {topo.topology_name} ({topo.name}): {msg}; "
                           "is the tpu extra installed (pip install -e '.[tpu]')?") from None
    devices = list(desc.devices)
    if len(devices) != topo.num_chips:
        raise RuntimeError(f"{topo.name}: libtpu described {len(devices)} devices, expected {topo.num_chips}")
    return devices
