"""`cm3leon compile`'s argparse wiring (argparse only at import, so that
`cm3leon --help` stays fast); the work is in train/compile.py."""
from __future__ import annotations

import os
import sys

# ----------------------------------------------------------------------------- the command


def add_compile(sub):
    import argparse

    from cm3leon_jax import gin_utils

    p = sub.add_parser(
        "compile", help="AOT-compile the train step for a TPU topology on this host: memory and FLOPs per chip",
        description="Compile the gin-configured train step (the trainer's own jitted step, sharded over "
                    "the gin mesh) for a TPU slice described by libtpu, without any TPU, and print one "
                    "JSON report: per-chip memory (arguments, outputs, temporaries, total vs HBM), FLOPs "
                    "per step from the compiler vs the analytic count, and the implied step time and "
                    "tokens/s at --mfu. Exits 1 when the step does not fit, naming the biggest buffers. "
                    "Needs the tpu extra: pip install -e '.[tpu]'.",
        epilog="Examples:\n"
               "  cm3leon compile --gin_file=gin/cm3leon_7b.gin --topology=v5e-256\n"
               "  cm3leon compile --gin_file=gin/tpu/cm3leon_7b_v4_128.gin --topology=v4-128\n"
               "  cm3leon compile --gin_file=gin/cm3leon_350m.gin --topology=v5p-128 "
               "--gin.NUM_MICROBATCHES=2\n"
               "Topologies: v4-N and v5p-N count TensorCores (2 per chip), v5e-N / v5litepod-N and "
               "v6e-N count chips; or a chip grid, v5e:16x16, v4:4x4x4.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gin_utils.add_gin_arguments(p)
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e-256, v4-128, v5p-128, v6e-64")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model FLOPs utilisation assumed for the predicted step time (default 0.4)")
    p.add_argument("--no_flop_probes", action="store_true",
                   help="skip the two 1-/2-layer unrolled compiles that measure FLOPs per step")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.set_defaults(func=cmd_compile)


def cmd_compile(args, gin_bindings) -> int:
    import json

    from cm3leon_jax.train.compile import compile_report, print_summary
    from cm3leon_jax.train.tpu_topology import parse_topology

    from cm3leon_jax import gin_utils
    from cm3leon_jax.data.pipeline import TRAIN_DATA_MODULES

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # see tpu_topology.topology_devices
    if not 0 < args.mfu <= 1:
        print(f"error: --mfu={args.mfu} must be in (0, 1]", file=sys.stderr)
        return 2
    try:
        topo = parse_topology(args.topology)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    search = [s for s in (args.gin_search_paths or "").split(",") if s]
    # Compiling writes nothing: MODEL_DIR gets a stand-in unless given.
    bindings = ["MODEL_DIR = '/nonexistent/cm3leon-compile'"] + list(args.gin_bindings) + list(gin_bindings)
    gin_utils.parse(args.gin_file, bindings, search, TRAIN_DATA_MODULES)
    try:
        report = compile_report(topo, mfu=args.mfu, flop_probes=not args.no_flop_probes)
    except (RuntimeError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    report["gin_files"] = list(args.gin_file)
    report["gin_bindings"] = list(args.gin_bindings) + list(gin_bindings)
    line = json.dumps(report)
    print(line, flush=True)
    if args.out:
        from etils import epath

        epath.Path(args.out).write_text(line + "\n")
    print_summary(report)
    return 0 if report["fits"] else 1
