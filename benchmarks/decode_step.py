"""Where one sampler step's time goes on this CPU: a KV-cache decode step of the sampler benchmark's config against what it must read from memory.

Same model as benchmarks/sampler.py (vocabulary 8,192, d_model 512, 8
layers, fp32, batch 4). For each cache size S (slots the step attends over):

  step_ms     one `models.decoding.cached_forward` step of one token per row
              (jitted, the cache donated so it is updated in place);
  bytes_mb    what that step must read: the weights it multiplies by (all
              but the two embedding tables, of which it gathers one row
              each) plus the K and V cache, 8 x 2 x [4, 8, S, 64] fp32;
  floor_ms    the time this machine takes to read that many bytes, measured
              in the same run as a jitted sum over an fp32 array of that
              size (the memory-bandwidth bound);
  ratio       step_ms / floor_ms.

S = 1 is the weights alone (attention over one slot). S = 640 is the
sampler benchmark's average (64 prompt + 1,024 new tokens, the cache grown
in 128-slot buckets). The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import statistics
import time

from common import make_parser, say


def main():
    p = make_parser(__doc__)
    p.add_argument("--sizes", default="1,128,640,1152", help="cache sizes (slots), comma-separated")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--calls", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smeared_keys", action="store_true",
                   help="the same model with smeared keys (DecoderConfig.smeared_keys)")
    args = p.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cm3leon_jax.models.decoder import Decoder
    from cm3leon_jax.models.decoder_config import DecoderConfig
    from cm3leon_jax.models.decoding import cached_forward, init_cache, layer_params

    cfg = DecoderConfig(vocab_size=8192, num_layers=8, d_model=512, num_heads=8, d_ff=2048, max_length=1152,
                        dtype="float32", param_dtype="float32", smeared_keys=args.smeared_keys)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(jnp.asarray, params)
    # per-layer weights as their own buffers, as the sampler slices them once before its loop (a
    # slice of the stacked [layers, ...] leaves inside the step made it 4x slower)
    layers = jax.tree.map(jnp.array, layer_params(params, cfg))
    b = args.batch
    tok = jnp.full((b, 1), 100, jnp.int32)
    start = jnp.zeros((b,), jnp.int32)
    weight_bytes = sum(x.nbytes for k, x in jax.tree_util.tree_leaves_with_path(params)
                       if "embedding" not in jax.tree_util.keystr(k))

    def timed(f, state, feed_back=True):
        out = f(state)
        jax.block_until_ready(out)
        t = time.perf_counter()
        for _ in range(args.calls):
            out = f(out[0] if feed_back else state)
        jax.block_until_ready(out)
        return 1000 * (time.perf_counter() - t) / args.calls

    rows = []
    for s in [int(x) for x in args.sizes.split(",")]:
        def step(c, p, layers, t, s=s):
            # params and tokens are arguments (closed over, XLA may constant-fold a step whose cache
            # it overwrites whole); the logits are an output, so nothing is dead code
            logits, c = cached_forward(p, cfg, t, t * 0 + s - 1, start, c, s - 1, layers=layers)
            return c, jnp.sum(logits)

        jitted = jax.jit(step, donate_argnums=0)
        step = lambda c: jitted(c, params, layers, tok)  # noqa: E731
        cache_bytes = 2 * cfg.num_layers * b * cfg.num_heads * s * cfg.head_dim * 4
        total = weight_bytes + cache_bytes
        data = jnp.ones((total // 4,), jnp.float32)
        read = jax.jit(jnp.sum)
        step_ms, floor_ms = [], []
        for _ in range(args.rounds):
            step_ms.append(timed(step, init_cache(cfg, b, s)))
            floor_ms.append(timed(read, data, feed_back=False))
        row = {"slots": s, "step_ms": round(statistics.median(step_ms), 2), "bytes_mb": round(total / 1e6, 1),
               "floor_ms": round(statistics.median(floor_ms), 2)}
        row["ratio"] = round(row["step_ms"] / row["floor_ms"], 2)
        row["read_gb_per_s"] = round(total / 1e6 / row["step_ms"], 1)
        say(f"S={s:5d}: step {row['step_ms']:6.2f} ms, reads {row['bytes_mb']:6.1f} MB, memory floor "
            f"{row['floor_ms']:5.2f} ms -> {row['ratio']:.2f}x the floor ({row['read_gb_per_s']} GB/s)")
        rows.append(row)
    print(json.dumps({"benchmark": "decode_step", "batch": b, "dtype": "float32", "rows": rows,
                      "smeared_keys": args.smeared_keys, "numpy": np.__version__}), flush=True)


if __name__ == "__main__":
    main()
