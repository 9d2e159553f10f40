"""Retrieval throughput: our MIPS index (ScaNN tree + AH + reorder, automatic
parameters from `choose_params`) vs batched NumPy brute force, in one run.

The bank is `clustered_bank(200_000, 512, 2_000, seed)` from
cm3leon_jax/retrieval/synthetic.py (the same generator as the tests): unit-norm
keys in 2,000 Gaussian clusters, the shape of a CLIP ViT-B/32 key bank
(CM3Leon section 2.1 retrieves by MIPS over such keys).  Queries are fresh
points from the same clusters.

1. build the index with the automatic parameters (timed: build_sec);
2. exact top-10 of every query with `exact_search` (the reference);
3. recall@10 of the index against it;
4. after one untimed warm-up each, alternating timed rounds (index, brute |
   brute, index | ...) of batched search over all queries, so both see the
   same machine load; queries/s is the median round.  The index is fast, so
   each of its rounds repeats the batch `--index-repeats` times.

Brute force is the same `exact_search` the tests use as reference: one sgemm
per chunk of queries plus an argpartition top-k, NumPy's BLAS on every core.
ScaNN searches with `search_batched_parallel` (its thread pool, every core).

The last line printed is one JSON object (queries_per_sec_index,
queries_per_sec_bruteforce, speedup, recall_at_10, params, n, dim, build_sec).
Quick run: `--n 30000 --dim 64 --clusters 300 --queries 500 --rounds 1`.

A real memory bank instead (`--bank DIR`, a `cm3leon embed` output): its
keys are the bank, and the queries are either `--queries` keys of the bank
itself drawn at random (what the neighbour table searches; each finds itself
first in both the exact and the approximate lists) or the keys of another
bank (`--queries_bank DIR`, e.g. text-only embeddings of held-out captions:
what retrieval at inference searches). The index kind is the automatic one
(ScaNN from 20,000 keys) unless `--params '{"kind": "scann"}'` forces it.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import alternating_rounds, make_parser, say, timed_calls  # noqa: E402
from cm3leon_jax.retrieval.exact import exact_search, recall_at_k  # noqa: E402
from cm3leon_jax.retrieval.index import MipsIndex  # noqa: E402
from cm3leon_jax.retrieval.synthetic import clustered_bank  # noqa: E402


def parse_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--n", type=int, default=200_000, help="keys in the bank")
    p.add_argument("--dim", type=int, default=512, help="key width (512 = CLIP ViT-B/32)")
    p.add_argument("--clusters", type=int, default=2_000)
    p.add_argument("--noise", type=float, default=1.0, help="clustered_bank noise norm")
    p.add_argument("--queries", type=int, default=2_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--index-repeats", type=int, default=5, help="index batches per timed round")
    p.add_argument("--params", default="{}", help="JSON overrides for choose_params, "
                                                   "e.g. '{\"num_leaves_to_search\": 12}'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bank", default=None, help="a `cm3leon embed` output dir to use instead of the "
                                                "synthetic bank")
    p.add_argument("--queries_bank", default=None, help="with --bank: query keys from this `cm3leon "
                                                        "embed` dir (default: --queries keys of --bank)")
    return p.parse_args(argv)


def load_bank(path: str):
    """(keys [N, D] float32, embedding model name) of a `cm3leon embed` dir."""
    import numpy as np

    with open(os.path.join(path, "bank.json")) as f:
        meta = json.load(f)
    keys = np.load(os.path.join(path, "embeddings.npy"), mmap_mode="r")
    return np.ascontiguousarray(keys[:meta["count"]], dtype=np.float32), meta["embedding_model"]


def real_bank(args):
    import numpy as np

    bank, model = load_bank(args.bank)
    if args.queries_bank:
        queries, q_model = load_bank(args.queries_bank)
        if q_model != model:
            raise SystemExit(f"--queries_bank was embedded with {q_model}, --bank with {model}")
        queries = queries[:args.queries]
    else:
        pick = np.random.default_rng(args.seed).choice(len(bank), size=min(args.queries, len(bank)),
                                                       replace=False)
        queries = bank[pick]
    return bank, queries, model


def main(argv=None):
    args = parse_args(argv)
    t = time.time()
    if args.bank:
        bank, queries, model = real_bank(args)
        args.n, args.dim, args.queries, args.clusters = len(bank), bank.shape[1], len(queries), None
        say(f"bank {args.bank} {bank.shape} ({model}), queries {queries.shape} from "
            f"{args.queries_bank or 'the bank itself'}")
    else:
        model = "synthetic"
        bank, queries = clustered_bank(args.n, args.dim, args.clusters, args.seed,
                                       n_queries=args.queries, noise=args.noise)
        say(f"bank {bank.shape} queries {queries.shape} generated in {time.time() - t:.1f}s")

    t = time.time()
    index = MipsIndex.build(bank, embedding_model=model, **json.loads(args.params))
    # ScaNN's own build time (k-means tree + AH training + encoding), without
    # the one-off `import scann` (TensorFlow) that the wall time also holds.
    build_sec = index.params.get("build_sec", time.time() - t)
    say(f"built {index!r} in {build_sec:.1f}s ({time.time() - t:.1f}s with imports): "
        f"{index.params}")

    exact_ids, _ = exact_search(bank, queries, args.k)  # reference, doubles as brute-force warm-up
    got, _ = index.search(queries, args.k)  # warm-up (thread pool start)
    recall = recall_at_k(got, exact_ids)
    say(f"recall@{args.k} {recall:.4f}")

    runners = {"index": lambda n: timed_calls(lambda: index.search(queries, args.k), n),
               "brute": lambda n: timed_calls(lambda: exact_search(bank, queries, args.k), n)}
    rates, med = alternating_rounds(runners, args.rounds, {"index": args.index_repeats, "brute": 1},
                                    len(queries), "q/s", line_format="{name} {rate:9.0f} {unit} (cpu {cpu:.1f}s)")
    qps_index, qps_brute = rates["index"], rates["brute"]
    qi, qb = med["index"], med["brute"]
    say(f"median: index {qi:.0f} q/s, brute force {qb:.0f} q/s, speedup {qi / qb:.1f}x "
        f"at recall@{args.k} {recall:.4f} (load average {os.getloadavg()[0]:.1f})")
    print(json.dumps({
        "queries_per_sec_index": qi,
        "queries_per_sec_bruteforce": qb,
        "speedup": qi / qb,
        f"recall_at_{args.k}": recall,
        "params": index.params,
        "n": args.n,
        "dim": args.dim,
        "build_sec": build_sec,
        "n_queries": args.queries,
        "clusters": args.clusters,
        "bank": args.bank,
        "queries_bank": args.queries_bank,
        "rounds_index": qps_index,
        "rounds_bruteforce": qps_brute,
    }))


if __name__ == "__main__":
    main()
