"""`cm3leon serve` under load: 8 concurrent clients, each asking for 4 samples, against the same requests served one at a time.

One server process (`cm3leon serve --model_dir=M`, warmed up), one model
dir (default: demo_full_out/model, else demo_out/model). Each round sends
the same `--clients` x `--requests` text -> image requests (4 samples each,
top-p, CFG 3, no retrieval, a different seed per request) twice:

  (a) one at a time: one client, each request sent when the last returned;
  (b) concurrently: `--clients` threads, each sending its requests in turn,
      so requests that arrive together are decoded as one sampler call.

Latency is the client's wall time per request (HTTP, decoding, CLIP
reranking, PNG encoding). Throughput is requests per second over the phase.
Target (issue 28): (b) throughput >= 3x (a), and (b)'s p50 latency <= 1.5x
(a)'s p50. The last line printed is one JSON object.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

from common import make_parser, say

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _post(url: str, body: dict) -> float:
    t = time.perf_counter()
    req = urllib.request.Request(url + "/api/generate", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    assert len(out["samples"]) == body["num_samples"], out
    return time.perf_counter() - t


def _phase(url: str, bodies, clients: int) -> dict:
    t = time.perf_counter()
    if clients == 1:
        lat = [_post(url, b) for b in bodies]
    else:
        per_client = [bodies[i::clients] for i in range(clients)]
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            lat = [x for xs in pool.map(lambda bs: [_post(url, b) for b in bs], per_client) for x in xs]
    wall = time.perf_counter() - t
    return {"requests": len(bodies), "seconds": round(wall, 3), "requests_per_s": round(len(bodies) / wall, 3),
            "p50_s": round(statistics.median(lat), 3), "p90_s": round(sorted(lat)[int(0.9 * (len(lat) - 1))], 3)}


def main() -> None:
    p = make_parser(__doc__)
    default_model = next((d for d in ("demo_full_out/model", "demo_out/model")
                          if os.path.isfile(os.path.join(REPO, d, "config.gin"))), None)
    p.add_argument("--model_dir", default=default_model, help="a trained model dir")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--samples", type=int, default=4, help="samples per request")
    p.add_argument("--requests", type=int, default=3, help="requests per client and phase")
    p.add_argument("--rounds", type=int, default=2, help="(a) then (b), this many times")
    p.add_argument("--max_batch_rows", type=int, default=32)
    p.add_argument("--batch_window_ms", type=float, default=50.0)
    args = p.parse_args()
    if not args.model_dir:
        sys.exit("no model dir: run `make demo` or pass --model_dir")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "cm3leon_jax.cli", "serve", f"--model_dir={args.model_dir}",
                             f"--port={port}", f"--max_batch_rows={args.max_batch_rows}",
                             f"--batch_window_ms={args.batch_window_ms}", f"--max_queue={4 * args.clients}"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t = time.time()
        while True:
            try:
                with urllib.request.urlopen(url + "/api/info", timeout=5) as r:
                    info = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit(f"cm3leon serve exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
                time.sleep(1)
        say(f"server ready in {time.time() - t:.0f}s: {info['model_dir']} step {info['step']}, "
            f"{os.cpu_count()} cores")
        n = args.clients * args.requests
        bodies = [{"prompt": "a small red circle above a large blue square", "num_samples": args.samples,
                   "seed": i, "decoding": "top_p", "cfg_scale": 3.0} for i in range(n)]
        # warm the batch widths concurrency will use (compiles are not what we measure)
        _phase(url, bodies[:args.clients], args.clients)
        _phase(url, bodies[:2], 1)
        rounds = []
        for r in range(args.rounds):
            one = _phase(url, bodies, 1)
            many = _phase(url, bodies, args.clients)
            rounds.append((one, many))
            say(f"round {r}: one at a time {one['requests_per_s']:.2f} req/s (p50 {one['p50_s']:.2f}s) | "
                f"{args.clients} clients {many['requests_per_s']:.2f} req/s (p50 {many['p50_s']:.2f}s, "
                f"p90 {many['p90_s']:.2f}s)")
        one = {k: statistics.median(r[0][k] for r in rounds) for k in ("requests_per_s", "p50_s", "p90_s")}
        many = {k: statistics.median(r[1][k] for r in rounds) for k in ("requests_per_s", "p50_s", "p90_s")}
        with urllib.request.urlopen(url + "/api/info", timeout=5) as r:
            info = json.loads(r.read())
        result = {"benchmark": "serve", "model_dir": info["model_dir"], "step": info["step"],
                  "clients": args.clients, "samples": args.samples, "requests_per_phase": n,
                  "one_at_a_time": one, "concurrent": many,
                  "throughput_ratio": round(many["requests_per_s"] / one["requests_per_s"], 2),
                  "p50_ratio": round(many["p50_s"] / one["p50_s"], 2), "largest_batch": info["largest_batch"],
                  "targets": {"throughput_ratio": ">= 3", "p50_ratio": "<= 1.5"}}
        result["met"] = result["throughput_ratio"] >= 3 and result["p50_ratio"] <= 1.5
        say(json.dumps(result))
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
