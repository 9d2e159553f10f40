"""`cm3leon compile`: ahead-of-time compilation of the real train step for a
TPU topology, on a CPU host (MaxText's train_compile idea; DESIGN.md, "Scale
check without a TPU").

With the `tpu` extra installed, `jax.experimental.topologies` describes the
devices of a TPU slice that is not there; the trainer's own
`build_train_step` (train/trainer.py) makes the sharded state and jitted step
over a mesh of those devices, and `.lower(...).compile()` runs the TPU
compiler. From the compiled executable:

* **memory per chip** (`memory_analysis()`): arguments (params + Adam state +
  batch shards), outputs, the part of the outputs aliased to the donated
  state, temporaries (activations, gradients, remat buffers), generated code;
  the total is arguments + outputs - aliased + temporaries + code, compared
  with the chip's HBM.
* **FLOPs per chip** (`cost_analysis()`). XLA's cost analysis counts the body
  of a while loop once, whatever its trip count, so the scanned layers and
  the microbatch loop would be undercounted. The FLOPs are therefore measured
  on two probes of the same step with the layers unrolled (1 and 2 layers,
  one microbatch of the real size, same mesh): per-layer FLOPs = F(2) - F(1),
  step FLOPs = microbatches x (F(1) + (L - 1) x per-layer). The optimizer
  update is counted once per microbatch there (Adam's ~20 FLOPs per
  parameter, < 1e-5 of a step at these sizes).
* the **analytic count** for the same step: 6 x matmul params x tokens for
  forward + backward, the attention products of the blocked causal attention
  (models/decoder.py computes only the query blocks' visible keys), x 3 for
  forward + backward, plus what the remat policy recomputes in the backward
  pass (`recomputed_per_token`). Compiled / analytic close to 1 means no
  silently wasted compute.
* the implied **step time and tokens/s** at a stated MFU (model FLOPs
  without the recomputation, over the chips' bf16 peak).

It exits 1 when the step does not fit, naming the biggest buffers and the gin
knobs that shrink them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


# ----------------------------------------------------------------------------- analytic FLOPs


def _param_groups(params) -> dict:
    """Matmul parameter counts per layer-kind, read off the abstract params:
    {"qkv", "attn_out", "mlp_in", "mlp_out", "other_layer", "output", "lookup"}
    (summed over layers). Lookup tables (token / position embedding) and
    vectors (norm gains) do no matmul FLOPs."""
    groups = dict.fromkeys(("qkv", "attn_out", "mlp_in", "mlp_out", "other_layer", "output", "lookup"), 0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if names[-1] == "value":  # a flax LogicallyPartitioned box
            names = names[:-1]
        size = int(np.prod(leaf.shape))
        last = names[-1]
        in_layers = names[0] == "layers" or names[0].startswith("layer_")
        matrix_dims = len(leaf.shape) - (1 if names[0] == "layers" else 0)
        if last in ("token_embedding", "position_embedding"):
            groups["lookup"] += size
        elif last == "output_projection":
            groups["output"] += size
        elif not in_layers or matrix_dims < 2 or "norm" in "/".join(names).lower():
            groups["lookup"] += size  # gains and biases: no matmul
        elif "attention" in names:
            groups["attn_out" if last in ("out", "o_proj") else "qkv"] += size
        elif "mlp" in names:
            groups["mlp_out" if last in ("wo", "down", "down_proj") else "mlp_in"] += size
        else:
            groups["other_layer"] += size
    return groups


def attention_flops_per_sequence(cfg, seq_len: int) -> float:
    """Forward FLOPs of q.k^T and p.v over all layers for one sequence, for
    the blocked causal attention of models/decoder.py: query block i (of nb)
    looks at keys [0, (i + 1) x block)."""
    from cm3leon_jax.models.decoder import num_query_blocks

    nb = num_query_blocks(seq_len)
    bs = seq_len // nb
    visible = bs * bs * nb * (nb + 1) // 2      # (query, key) pairs computed
    width = cfg.num_heads * cfg.head_dim
    return cfg.num_layers * 2 * 2 * visible * width


def recomputed_matmul_params(groups: dict, remat_policy: str) -> tuple[int, bool]:
    """(layer matmul params whose forward the backward pass recomputes, whether
    the attention products are recomputed) for a remat policy of
    models/decoder.py REMAT_POLICIES.

    The MLP's output projection is never recomputed: the backward pass needs
    the inputs of a layer's matmuls, and that projection's output feeds only
    the residual stream (the next layer's input, already saved), so XLA drops
    its recomputation as dead code. Counting it would put the 7B's full-remat
    step at 0.928 of the analytic count; without it, 1.002."""
    layer = groups["qkv"] + groups["attn_out"] + groups["mlp_in"] + groups["mlp_out"] + groups["other_layer"]
    live = layer - groups["mlp_out"]
    table = {
        "none": (0, False),
        "dots": (0, False),
        "dots_with_no_batch_dims": (0, True),
        "save_qkv_proj": (live - groups["qkv"], True),
        "save_out_proj": (live - groups["attn_out"], True),
        "full": (live, True),
    }
    if remat_policy not in table:
        raise ValueError(f"no analytic recompute count for remat_policy={remat_policy!r}; "
                         f"known: {sorted(table)}")
    return table[remat_policy]


def analytic_flops(cfg, params, batch_size: int, seq_len: int) -> dict:
    """Whole-step FLOPs (all chips) of the train step, by term."""
    groups = _param_groups(params)
    matmul = sum(v for k, v in groups.items() if k != "lookup")
    tokens = batch_size * seq_len
    attn_fwd = attention_flops_per_sequence(cfg, seq_len) * batch_size
    re_params, re_attn = recomputed_matmul_params(groups, cfg.remat_policy)
    model = 6.0 * matmul * tokens + 3.0 * attn_fwd
    recompute = 2.0 * re_params * tokens + (attn_fwd if re_attn else 0.0)
    return {"matmul_params": matmul, "tokens": tokens, "matmul_6NT": 6.0 * matmul * tokens,
            "attention_fwd_bwd": 3.0 * attn_fwd, "remat_recompute": recompute,
            "model_flops": model, "total": model + recompute}


# ----------------------------------------------------------------------------- compiling


def _abstract_inputs(built, batch_size: int, seq_len: int):
    from cm3leon_jax.train.step import FEATURES

    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         built.abstract, built.shardings)
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=built.batch_sharding)
             for k in FEATURES}
    return state, batch


def _compile(cfg, mesh, rules, batch_size, seq_len, num_microbatches, z_loss, train_steps):
    from cm3leon_jax.train.trainer import build_train_step

    built = build_train_step(cfg, train_steps, seq_len, mesh, rules, num_microbatches, z_loss)
    state, batch = _abstract_inputs(built, batch_size, seq_len)
    return built, state, built.jit_step.lower(state, batch).compile()


def _flops(compiled) -> float:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca.get("flops", 0.0))


def _leaf_bytes_per_chip(state) -> list:
    """[(bytes per chip, 'path shape -> shard')] for every state leaf."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        shard = leaf.sharding.shard_shape(leaf.shape)
        nbytes = int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
        name = jax.tree_util.keystr(path).replace("']['", ".").replace("['", ".").replace("']", "")
        name = re.sub(r"\.value$", "", name.replace(".params.", "params.", 1))
        out.append((nbytes, f"{name.strip('.')} {list(leaf.shape)} -> {list(shard)} per chip"))
    return sorted(out, reverse=True)


def _group_bytes(leaves) -> dict:
    total = {"params": 0, "optimizer_state": 0, "other": 0}
    for nbytes, name in leaves:
        key = "params" if name.startswith("params") else "optimizer_state" if "opt_state" in name else "other"
        total[key] += nbytes
    return total


def _oom_allocations(message: str, limit: int = 6) -> list:
    """The allocation lines of a TPU compiler out-of-memory message."""
    lines = [ln.strip() for ln in message.splitlines()]
    picks = [ln for ln in lines if re.search(r"(Size:|size=|Shape:|Allocation type|Operator:)", ln)]
    return picks[: limit * 3]


KNOBS = ("create_mesh.fsdp (shard params and Adam state over more chips; -1 = all)",
         "NUM_MICROBATCHES (fewer activations per pass; BATCH_SIZE must divide)",
         "DecoderConfig.remat_policy ('full' saves the least; 'save_out_proj', 'dots' more)",
         "create_mesh.model (tensor parallelism over heads / mlp / vocab)",
         "BATCH_SIZE or TASK_FEATURE_LENGTHS (fewer tokens per step)")


def compile_report(topo: Topology, *, mfu: float = 0.4, flop_probes: bool = True,
                   devices: Optional[Sequence] = None) -> dict:
    """Compiles the gin-configured train step (gin already parsed) for `topo`."""
    import gin

    from cm3leon_jax import partitioning
    from cm3leon_jax.data.pipeline import decoder_length
    from cm3leon_jax.models.decoder import DecoderConfig
    from cm3leon_jax.train import trainer

    bindings = gin.get_bindings(trainer.train)
    cfg = bindings.get("model_config") or DecoderConfig()
    batch_size = int(bindings["batch_size"])
    micro = int(bindings.get("num_microbatches", 1))
    z_loss = float(bindings.get("z_loss", 0.0))
    train_steps = int(bindings.get("train_steps", 1000))
    name = bindings["mixture_or_task_name"]
    seq_len = decoder_length(name, bindings["task_feature_lengths"])
    if seq_len > cfg.max_length:
        raise ValueError(f"TASK_FEATURE_LENGTHS gives {seq_len} tokens > DecoderConfig.max_length={cfg.max_length}")
    if batch_size % micro:
        raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by NUM_MICROBATCHES={micro}")

    devices = topology_devices(topo) if devices is None else list(devices)
    mesh = partitioning.create_mesh(devices=devices)
    rules = partitioning.logical_axis_rules()
    mesh_shape = dict(mesh.shape)
    batch_shards = math.prod(mesh_shape[a] for a in ("data", "fsdp"))
    if (batch_size // micro) % batch_shards:
        raise ValueError(f"a microbatch of {batch_size // micro} sequences (BATCH_SIZE={batch_size} / "
                         f"NUM_MICROBATCHES={micro}) does not split over data x fsdp = {batch_shards} chips; "
                         "change BATCH_SIZE, NUM_MICROBATCHES or create_mesh.*")

    report = {
        "topology": topo.name, "topology_grid": topo.topology_name, "chips": topo.num_chips,
        "device_kind": getattr(devices[0], "device_kind", "?"),
        "mesh": mesh_shape, "params": None, "num_layers": cfg.num_layers, "d_model": cfg.d_model,
        "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": batch_size * seq_len,
        "num_microbatches": micro, "remat_policy": cfg.remat_policy, "scan_layers": cfg.scan_layers,
    }
    t0 = time.time()
    try:
        built, state, compiled = _compile(cfg, mesh, rules, batch_size, seq_len, micro, z_loss, train_steps)
    except Exception as e:  # noqa: BLE001 - the TPU compiler's OOM is an XlaRuntimeError
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "memory" not in msg.lower():
            raise
        from cm3leon_jax.train.trainer import build_train_step

        built = build_train_step(cfg, train_steps, seq_len, mesh, rules, micro, z_loss)
        state, _ = _abstract_inputs(built, batch_size, seq_len)
        leaves = _leaf_bytes_per_chip(state)
        groups = _group_bytes(leaves)
        report.update({
            "fits": False, "compile_seconds": round(time.time() - t0, 1),
            "params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(built.abstract.params))),
            "memory_per_chip": {"hbm_gib": topo.chip.hbm_bytes / GiB,
                                "state_gib": {k: v / GiB for k, v in groups.items()}},
            "compiler_error": msg.strip().splitlines()[0][:400],
            "compiler_allocations": _oom_allocations(msg),
            "biggest_buffers": [f"{n / GiB:.2f} GiB {s}" for n, s in leaves[:8]],
            "suggested_gin_knobs": list(KNOBS),
        })
        return report
    compile_s = time.time() - t0

    ma = compiled.memory_analysis()
    mem = {
        "arguments": ma.argument_size_in_bytes, "outputs": ma.output_size_in_bytes,
        "aliased": ma.alias_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
        "generated_code": ma.generated_code_size_in_bytes,
    }
    total = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"] + mem["generated_code"]
    leaves = _leaf_bytes_per_chip(state)
    params = built.abstract.params
    n_params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
    hbm = topo.chip.hbm_bytes
    report.update({
        "params": n_params,
        "memory_per_chip": {**{f"{k}_gib": v / GiB for k, v in mem.items()},
                            "total_gib": total / GiB, "hbm_gib": hbm / GiB, "headroom_gib": (hbm - total) / GiB,
                            "state_gib": {k: v / GiB for k, v in _group_bytes(leaves).items()}},
        "fits": bool(total <= hbm),
        "compile_seconds": round(compile_s, 1),
    })
    if total > hbm:
        report["biggest_buffers"] = [f"{n / GiB:.2f} GiB {s}" for n, s in leaves[:8]]
        report["suggested_gin_knobs"] = list(KNOBS)

    analytic = analytic_flops(cfg, params, batch_size, seq_len)
    per_chip = {k: analytic[k] / topo.num_chips for k in
                ("matmul_6NT", "attention_fwd_bwd", "remat_recompute", "model_flops", "total")}
    flops = {"analytic_per_chip": per_chip["total"], "analytic_terms_per_chip": per_chip,
             "compiled_scanned_program": _flops(compiled)}
    if flop_probes:
        t1 = time.time()
        mb = batch_size // micro
        probe = []
        for layers in (1, 2):
            pcfg = dataclasses.replace(cfg, num_layers=layers, scan_layers=False)
            probe.append(_flops(_compile(pcfg, mesh, rules, mb, seq_len, 1, z_loss, train_steps)[2]))
        per_layer = probe[1] - probe[0]
        compiled_flops = micro * (probe[0] + (cfg.num_layers - 1) * per_layer)
        flops.update({"compiled_per_chip": compiled_flops,
                      "compiled_over_analytic": compiled_flops / per_chip["total"],
                      "probe_flops_1_2_layers": probe, "probe_seconds": round(time.time() - t1, 1)})
    report["flops"] = flops
    peak = topo.chip.peak_bf16_flops
    step_s = per_chip["model_flops"] / (peak * mfu)
    report["predicted"] = {
        "mfu": mfu, "peak_bf16_flops_per_chip": peak, "step_time_sec": step_s,
        "tokens_per_sec": batch_size * seq_len / step_s,
        "tokens_per_sec_per_chip": batch_size * seq_len / step_s / topo.num_chips,
        "note": "model FLOPs (6NT + attention, no recompute) / (chips x peak x mfu)",
    }
    return report


def print_summary(report: dict, out=sys.stderr):
    """A few human lines next to the JSON."""
    m = report.get("memory_per_chip", {})
    head = (f"{report['topology']} ({report['chips']} chips, mesh {report['mesh']}): "
            f"{report['params'] / 1e9:.2f}B params, batch {report['batch_size']} x {report['seq_len']}, "
            f"{report['num_microbatches']} microbatch(es), remat {report['remat_policy']}")
    print(head, file=out)
    if "total_gib" in m:
        print(f"  memory per chip: {m['total_gib']:.2f} GiB of {m['hbm_gib']:.0f} GiB "
              f"(args {m['arguments_gib']:.2f}, temps {m['temporaries_gib']:.2f}) -> "
              f"{'fits' if report['fits'] else 'DOES NOT FIT'}", file=out)
    f = report.get("flops", {})
    if "compiled_per_chip" in f:
        print(f"  FLOPs per chip per step: compiled {f['compiled_per_chip']:.4g}, analytic "
              f"{f['analytic_per_chip']:.4g} (ratio {f['compiled_over_analytic']:.3f})", file=out)
    p = report.get("predicted")
    if p:
        print(f"  at MFU {p['mfu']:.0%}: {p['step_time_sec']:.2f} s/step, {p['tokens_per_sec']:,.0f} tokens/s", file=out)
    if not report.get("fits", True):
        state = sum(m.get("state_gib", {}).values())
        print(f"  DOES NOT FIT: params + optimizer state alone take {state:.2f} GiB per chip of "
              f"{m.get('hbm_gib', 0):.0f} GiB" + (f"; compiler: {report['compiler_error']}"
                                                  if report.get("compiler_error") else ""), file=out)
        print("  biggest buffers per chip:", file=out)
        for b in report.get("biggest_buffers", [])[:6]:
            print(f"    {b}", file=out)
        for a in report.get("compiler_allocations", [])[:9]:
            print(f"    compiler: {a}", file=out)
        print("  gin knobs that reduce memory: " + "; ".join(report.get("suggested_gin_knobs", [])), file=out)
