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
  (models/causal_attention.py computes only the query blocks' visible
  keys), x 3 for forward + backward, plus what the remat policy recomputes
  in the backward pass (train/flop_count.py). Compiled / analytic close to 1
  means no silently wasted compute.
* the implied **step time and tokens/s** at a stated MFU (model FLOPs
  without the recomputation, over the chips' bf16 peak).

It exits 1 when the step does not fit, naming the biggest buffers and the gin
knobs that shrink them.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.train.flop_count import analytic_flops
from cm3leon_jax.train.tpu_topology import GiB, Topology, topology_devices


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
    from cm3leon_jax.models.decoder_config import DecoderConfig
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
