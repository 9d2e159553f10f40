"""Training throughput on CPU: our JAX trainer step vs. transformers' PyTorch OPT.

One run trains the *same* configuration two ways and compares tokens/s:

  (a) ours: the jitted `make_train_step` (cross-entropy + global-norm clipping +
      AdamW, train/step.py), the state from `train/state.py`'s sharded init, the
      mesh from `partitioning.create_mesh()` on the single CPU device, fp32
      compute (`DecoderConfig(dtype="float32", remat_policy="none")`);
  (b) transformers' `OPTForCausalLM` configured as the paper's architecture
      (pre-LN, no biases, LayerNorm without affine, untied output projection,
      ReLU, no dropout) with `torch.optim.AdamW` and the same clipping.

Both are warmed up (XLA compile, then untimed alternating rounds), then timed
in alternating rounds (jax, torch, torch, jax, ...) so that both see the same
machine load; the median round gives tokens/s. Each round line also prints
the process CPU time per step (a round with seconds of `sys` time was
page-faulting, or the machine was busy: that is what the median is for). The CPU's fp32 matmul peak
is measured in the same run (a jitted n x n x n fp32 matmul, best of several,
also repeated between rounds) and gives the MFU of each, with
`DecoderConfig.train_flops_per_token` as the FLOPs per token for both.

The last line printed is one JSON object (tokens_per_sec_jax,
tokens_per_sec_torch, ratio, matmul_peak_flops, mfu_jax, mfu_torch, config,
xla_flags, malloc_env, ...). Quick run: `--layers 2 --steps 1 --rounds 1
--warmup 1`. The default run takes about 3 minutes on 2 quiet cores.

XLA flags must be set before jax is imported, and glibc malloc settings
before the process starts, so this file parses its arguments first, re-execs
itself once with MALLOC_TUNING in the environment (unless
--no-malloc-tuning), and imports jax afterwards.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

from common import (alternating_rounds, apply_xla_flags, make_parser, report_ratio, say,
                    say_jax_banner, torch_all_cores)

# XLA CPU flags used by default for our side. None of the XLA:CPU flags of
# jax 0.10.2 tried helped this model (benchmarks/RESULTS.md lists them), so
# the default is XLA's own. Flags already in $XLA_FLAGS and --xla-flags are
# appended after these (later ones win).
DEFAULT_XLA_FLAGS = ""


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and framework")
    p.add_argument("--rounds", type=int, default=5, help="alternating jax/torch timing rounds")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed alternating rounds (of --steps steps) after compile")
    p.add_argument("--scan-layers", type=int, default=0, choices=(0, 1),
                   help="DecoderConfig.scan_layers (1: nn.scan over layers, 0: unrolled; "
                        "unrolled is ~15%% faster on CPU, see RESULTS.md)")
    p.add_argument("--matmul-n", type=int, default=2048, help="size of the peak-FLOPs matmul")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS (appended; later flags win)")
    p.add_argument("--no-default-xla-flags", action="store_true",
                   help="do not apply this benchmark's DEFAULT_XLA_FLAGS")
    p.add_argument("--torch-optimizer", default="default", choices=("default", "foreach", "fused"),
                   help="torch.optim.AdamW implementation (default: torch's own choice)")
    p.add_argument("--jax-sync", action="store_true",
                   help="block on every JAX step (default: async dispatch, blocked once per round)")
    p.add_argument("--skip-torch", action="store_true", help="time ours only (ratio is null)")
    p.add_argument("--skip-jax", action="store_true", help="time torch only (ratio is null)")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="keep glibc malloc's defaults (see MALLOC_TUNING; applies to both sides)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None

# glibc malloc settings (read only at process start, hence the re-exec below).
# Both frameworks allocate their activations afresh each step: XLA one
# ~3 GB temp buffer per execution, PyTorch one buffer per tensor. glibc
# serves blocks over 32 MiB with mmap and gives them back with munmap on
# free, so every step page-faults (and zeroes) all of that memory again
# (~1.5 s of kernel time per step here). One arena, no mmap and no trimming
# keep the freed memory mapped for the next step. Same process, so the same
# setting holds for the JAX and the PyTorch side.
MALLOC_TUNING = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                 "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
_REEXEC_MARK = "CM3LEON_BENCH_REEXEC"


def _maybe_reexec(args):
    """Restart this process once with MALLOC_TUNING in the environment."""
    if args.no_malloc_tuning or os.environ.get(_REEXEC_MARK):
        return
    if all(os.environ.get(k) == v for k, v in MALLOC_TUNING.items()):
        return
    env = dict(os.environ, **MALLOC_TUNING, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


if ARGS is not None:
    _maybe_reexec(ARGS)


if ARGS is not None:
    apply_xla_flags(ARGS.xla_flags, defaults="" if ARGS.no_default_xla_flags else DEFAULT_XLA_FLAGS)

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cm3leon_jax import partitioning  # noqa: E402
from cm3leon_jax.models.causal_attention import num_query_blocks  # noqa: E402
from cm3leon_jax.models.decoder import Decoder  # noqa: E402
from cm3leon_jax.models.decoder_config import DecoderConfig  # noqa: E402
from cm3leon_jax.train import optimizer as opt_lib  # noqa: E402
from cm3leon_jax.train import state as state_lib  # noqa: E402
from cm3leon_jax.train.step import make_train_step  # noqa: E402

# AdamW hyper-parameters shared by both sides (train/optimizer.py's defaults).
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def _use_mesh(mesh):
    """`jax.set_mesh` where it exists (`with mesh:` is deprecated), else the mesh."""
    return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def make_batch(args):
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(2, args.vocab, size=(args.batch, args.seq + 1), dtype=np.int64)
    return tokens[:, :-1], tokens[:, 1:]


# -- peak -----------------------------------------------------------------------

class MatmulPeak:
    """fp32 FLOP/s of a jitted n x n x n matmul, repeated `inner` times inside
    one jitted call (a chain, so nothing is elided); best over all calls."""

    def __init__(self, n: int, inner: int = 4):
        self.n, self.inner, self.best = n, inner, 0.0
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32) / np.sqrt(n)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32) / np.sqrt(n)
        self.a, self.b = a, b

        def chain(x, y):
            for _ in range(inner):
                x = x @ y
            return x

        self.fn = jax.jit(chain)
        self.fn(a, b).block_until_ready()

    def measure(self, repeats: int = 5) -> float:
        flops = 2.0 * self.n ** 3 * self.inner
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.fn(self.a, self.b).block_until_ready()
            self.best = max(self.best, flops / (time.perf_counter() - t0))
        return self.best


# -- ours (JAX) -----------------------------------------------------------------

class JaxRunner:
    def __init__(self, args, inputs, targets):
        self.cfg = DecoderConfig(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model,
                                 num_heads=args.heads, d_ff=args.d_ff, max_length=args.seq,
                                 activation="relu", dtype="float32", param_dtype="float32",
                                 scan_layers=bool(args.scan_layers), remat_policy="none")
        self.sync = bool(getattr(args, "jax_sync", False))
        self.mesh = partitioning.create_mesh()
        rules = partitioning.logical_axis_rules()
        model = Decoder(self.cfg)
        schedule = opt_lib.learning_rate_schedule(peak_learning_rate=LR, warmup_steps=0,
                                                  total_steps=10 ** 6, decay="constant")
        tx = opt_lib.adamw(schedule, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                           weight_decay=WEIGHT_DECAY, grad_clip_norm=CLIP)
        _, shardings, sharded_init = state_lib.abstract_state(model, tx, args.seq, args.seed,
                                                              self.mesh, rules)
        step_fn = make_train_step(model.apply, tx, schedule)
        self.step_fn = jax.jit(step_fn, in_shardings=(shardings, partitioning.batch_sharding(self.mesh, rules)),
                               out_shardings=(shardings, partitioning.replicated(self.mesh)),
                               donate_argnums=(0,))
        with _use_mesh(self.mesh):
            self.state = sharded_init()
            self.num_params = state_lib.count_params(self.state.params)
            local = {"decoder_input_tokens": inputs.astype(np.int32),
                     "decoder_target_tokens": targets.astype(np.int32),
                     "decoder_loss_weights": np.ones(inputs.shape, np.float32)}
            self.batch = partitioning.global_batch_from_local(local, self.mesh, rules)

    def compile(self) -> float:
        t0 = time.perf_counter()
        with _use_mesh(self.mesh):
            self.step_fn = self.step_fn.lower(self.state, self.batch).compile()
        return time.perf_counter() - t0

    def run(self, n: int) -> float:
        """n steps; returns seconds (async dispatch, blocked once at the end)."""
        t0 = time.perf_counter()
        with _use_mesh(self.mesh):
            for _ in range(n):
                self.state, metrics = self.step_fn(self.state, self.batch)
                if self.sync:
                    jax.block_until_ready(metrics)
            self.loss = float(metrics["loss"])
        return time.perf_counter() - t0


# -- PyTorch OPT -----------------------------------------------------------------

class TorchRunner:
    def __init__(self, args, inputs, targets):
        from transformers import OPTConfig, OPTForCausalLM

        torch = torch_all_cores()
        torch.manual_seed(args.seed)
        self.torch = torch
        self.config = OPTConfig(
            vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers,
            ffn_dim=args.d_ff, num_attention_heads=args.heads, max_position_embeddings=args.seq,
            do_layer_norm_before=True, word_embed_proj_dim=args.d_model, enable_bias=False,
            layer_norm_elementwise_affine=False, tie_word_embeddings=False, activation_function="relu",
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
            torch_dtype=torch.float32)
        self.model = OPTForCausalLM(self.config).to(torch.float32)
        self.model.train()
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        kw = {}
        if args.torch_optimizer == "foreach":
            kw["foreach"] = True
        elif args.torch_optimizer == "fused":
            kw["fused"] = True
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WEIGHT_DECAY, **kw)
        self.inputs = torch.from_numpy(inputs)
        self.targets = torch.from_numpy(targets)

    def step(self):
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        return loss

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            loss = self.step()
        self.loss = float(loss.detach())
        return time.perf_counter() - t0


# -- main ------------------------------------------------------------------------

def main(args):
    flags = os.environ.get("XLA_FLAGS", "")
    tokens_per_step = args.batch * args.seq
    malloc_env = {k: os.environ[k] for k in MALLOC_TUNING if k in os.environ}
    say_jax_banner(f"malloc env {malloc_env or 'glibc defaults'}")
    inputs, targets = make_batch(args)

    peak = MatmulPeak(args.matmul_n)
    say(f"matmul peak ({args.matmul_n}^3 fp32): {peak.measure() / 1e9:.1f} GFLOP/s")

    runners = {}
    if not args.skip_jax:
        jr = JaxRunner(args, inputs, targets)
        say(f"jax: {jr.num_params / 1e6:.2f}M params, scan_layers={jr.cfg.scan_layers}; "
            f"compile {jr.compile():.1f}s")
        runners["jax"] = jr
    if not args.skip_torch:
        import torch
        tr = TorchRunner(args, inputs, targets)
        say(f"torch {torch.__version__}: {tr.num_params / 1e6:.2f}M params, threads "
            f"{torch.get_num_threads()}, attn_implementation={tr.attn_implementation}, "
            f"AdamW={args.torch_optimizer}")
        runners["torch"] = tr
    cfg = (runners["jax"].cfg if "jax" in runners else
           DecoderConfig(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model,
                         num_heads=args.heads, d_ff=args.d_ff, max_length=args.seq,
                         dtype="float32", remat_policy="none", scan_layers=bool(args.scan_layers)))
    flops_per_token = cfg.train_flops_per_token(args.seq)

    # Warm-up: untimed rounds exactly like the timed ones (alternating, --steps
    # steps back to back), so that both allocators reach their steady state:
    # with MALLOC_TUNING the heap only grows, and the first time JAX has two
    # steps in flight (async dispatch) it needs a second temp buffer.
    warm = {name: 0.0 for name in runners}
    for _ in range(max(args.warmup, 1)):
        for name, r in runners.items():
            warm[name] += r.run(args.steps)
    for name, r in runners.items():
        say(f"{name}: warm-up {max(args.warmup, 1)} x {args.steps} steps {warm[name]:.1f}s, loss {r.loss:.4f}")

    rates, med = alternating_rounds(
        {name: r.run for name, r in runners.items()}, args.rounds, args.steps, tokens_per_step, "tok/s",
        line_format="{name} {rate:7.1f} {unit} ({wall_per_call:.2f} s/step, "
                    "cpu user {user_per_call:.1f}s sys {sys_per_call:.1f}s)",
        after_round=lambda: peak.measure(repeats=2))

    best_peak = peak.best
    tps_jax, tps_torch = med.get("jax"), med.get("torch")
    mfu = {name: flops_per_token * v / best_peak for name, v in med.items()}
    say(f"train FLOPs/token {flops_per_token / 1e6:.1f}M; matmul peak {best_peak / 1e9:.1f} GFLOP/s")
    for name in runners:
        say(f"{name:5s}: median {med[name]:7.1f} tok/s  (rounds: "
            + ", ".join(f"{v:.0f}" for v in rates[name])
            + f")  MFU {100 * mfu[name]:.1f}%  final loss {runners[name].loss:.4f}")
    ratio = report_ratio(med)
    say(f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")

    result = {
        "tokens_per_sec_jax": tps_jax,
        "tokens_per_sec_torch": tps_torch,
        "ratio": ratio,
        "matmul_peak_flops": best_peak,
        "mfu_jax": mfu.get("jax"),
        "mfu_torch": mfu.get("torch"),
        "train_flops_per_token": flops_per_token,
        "rounds_jax": rates.get("jax"),
        "rounds_torch": rates.get("torch"),
        "config": {"vocab_size": args.vocab, "d_model": args.d_model, "num_heads": args.heads,
                   "num_layers": args.layers, "d_ff": args.d_ff, "seq_len": args.seq,
                   "batch_size": args.batch, "dtype": "float32", "optimizer": "AdamW",
                   "scan_layers": bool(args.scan_layers), "attention_query_blocks": num_query_blocks(args.seq),
                   "steps_per_round": args.steps,
                   "rounds": args.rounds, "warmup": args.warmup, "matmul_n": args.matmul_n,
                   "torch_optimizer": args.torch_optimizer, "jax_sync": args.jax_sync,
                   "cpu_count": os.cpu_count()},
        "xla_flags": flags,
        "malloc_env": malloc_env,
        "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main(ARGS) else 1)
