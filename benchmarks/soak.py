"""Soak: the input pipeline and the trainer together, with bad records mixed in and SIGKILLs.

1. Writes a shapes image folder (`--docs` documents, the layout a user's own
   data has) and mixes in bad records at `--bad_fraction` (5%), one of each
   kind in turn, each with the reason `cm3leon prepare` must count it under:
   random bytes, a truncated PNG, an empty file, a missing file, a 4x4 image,
   a decompression bomb, a non-string caption, a line that is not JSON. Some
   good records carry odd text (a lone surrogate, control characters, a 100k
   caption), which must be cleaned and kept.
2. Builds the `shapes_cm3_retrieval` data from it with the code of
   `cm3leon task-data` (prepare -> CLIP bank -> ScaNN index -> neighbours),
   with random-weight models at the demo's geometry (as
   benchmarks/input_pipeline.py does), and checks the skip counts.
3. Trains the tiny CM3Leon (`cm3leon train --gin_file=gin/cm3leon_tiny.gin`,
   smaller batches so that a run takes a minute) twice, each in its own
   process: once uninterrupted, and once SIGKILLed at random times
   (`--kills`, drawn from `--seed`) and restarted after each kill with the
   same command, which resumes from the last good checkpoint.
4. Compares the final train states of the two runs bit for bit (CPU, fp32).

The last line printed is one JSON object with `kills`, `final_step`,
`stale_locks_taken_over` (each restart finds the killed run's writer lock),
`params_bitwise_equal`, `state_bitwise_equal`, `skipped_by_reason` and
`injected_bad` (and `skips_match`: the skip counts equal the injected bad
records, reason by reason). Minutes, not part of the suite:
`.venv/bin/python benchmarks/soak.py`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from common import make_parser, say

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gin/vqgan_shapes.gin's VQGANConfig (benchmarks/input_pipeline.py)
SHAPES_VQ = dict(resolution=64, base_channels=16, channel_multiplier=(1, 1, 2, 4), num_res_blocks=1,
                 latent_channels=64, embed_dim=32, num_embeddings=512, num_groups=8)


# ---- bad records: (kind, how to make it, the reason prepare must count) -------------------------------

def _random_bytes(path, rng):
    with open(path, "wb") as f:
        f.write(bytes(rng.getrandbits(8) for _ in range(300)))


def _truncated_png(path, rng):
    from PIL import Image

    Image.new("RGB", (64, 64), (rng.randrange(256), 0, 0)).save(path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _empty(path, rng):
    open(path, "wb").close()


def _missing(path, rng):
    pass  # the caption line names a file that is not there


def _tiny(path, rng):
    from PIL import Image

    Image.new("RGB", (4, 4), (0, 0, 255)).save(path)


def _bomb(path, rng):
    from PIL import Image

    Image.new("1", (20000, 20000)).save(path)  # ~50 KB on disk, 400M pixels decoded


BAD_FILES = [
    ("random bytes", _random_bytes, "corrupt or truncated image"),
    ("truncated PNG", _truncated_png, "corrupt or truncated image"),
    ("empty file", _empty, "empty file"),
    ("missing file", _missing, "missing file"),
    ("4x4 image", _tiny, "too small"),
    ("decompression bomb", _bomb, "too large"),
]
# caption-line faults: (kind, the captions.jsonl line, the reason)
BAD_LINES = [
    ("non-string caption", lambda name: json.dumps({"file": name, "caption": 12345}),
     "caption is not a string"),
    ("not JSON", lambda name: '{"file": "' + name + '", "caption": "a red',
     "captions.jsonl line is not JSON"),
]


# good records with odd text, which must be cleaned and kept (data/text.py's policy)
ODD_CAPTIONS = [lambda c: c + " \udcff", lambda c: c + "\x07\x1b", lambda c: c + " " + "x" * 100_000]


def write_corpus(folder: str, docs: int, bad_fraction: float, seed: int):
    """A shapes image folder with bad records mixed in; -> {reason: count}, {kind: count}."""
    from PIL import Image

    from cm3leon_jax.data import shapes

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    num_bad = round(docs * bad_fraction)
    bad_at = set(rng.sample(range(docs), num_bad))
    kinds = BAD_FILES + BAD_LINES
    by_reason, by_kind = {}, {}
    lines, j = [], 0
    for i, ex in enumerate(shapes.generate(seed, docs)):
        name = f"{i:05d}.png"
        if i not in bad_at:
            Image.fromarray(ex.image).save(os.path.join(folder, name), compress_level=1)
            caption = ODD_CAPTIONS[i % 30](ex.caption) if i % 30 < len(ODD_CAPTIONS) else ex.caption
            lines.append(json.dumps({"file": name, "caption": caption}))
            continue
        kind, make, reason = kinds[j % len(kinds)]
        j += 1
        if (kind, make, reason) in BAD_FILES:
            make(os.path.join(folder, name), rng)
            lines.append(json.dumps({"file": name, "caption": ex.caption}))
        else:
            Image.fromarray(ex.image).save(os.path.join(folder, name), compress_level=1)
            lines.append(make(name))
        by_reason[reason] = by_reason.get(reason, 0) + 1
        by_kind[kind] = by_kind.get(kind, 0) + 1
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return dict(sorted(by_reason.items())), dict(sorted(by_kind.items()))


def make_models(out: str) -> dict:
    """Random-weight VQ-GAN, BPE and CLIP (the tests' helpers), made once."""
    sys.path.insert(0, os.path.join(REPO, "tests", "data"))
    sys.path.insert(0, os.path.join(REPO, "tests", "retrieval"))
    from task_data import TINY_TEXT_VOCAB, make_bpe, make_vq_dir
    from tiny_clip import make_clip_dir

    return {"vqgan_dir": make_vq_dir(os.path.join(out, "vqgan"), **SHAPES_VQ),
            "text_tokenizer": make_bpe(os.path.join(out, "text"), TINY_TEXT_VOCAB),
            "clip_dir": make_clip_dir(os.path.join(out, "clip"))}


def build_data(folder: str, out: str, models: dict) -> dict:
    from cm3leon_jax.data.task_data_builder import build_task_data

    return build_task_data(f"image_folder:{folder}", os.path.join(out, "data"), **models, k=16, progress=False)


# ---- training -------------------------------------------------------------------------------------------

def train_command(model_dir: str, data_dir: str, args) -> list:
    return [sys.executable, "-m", "cm3leon_jax.cli", "train", "--gin_file=gin/cm3leon_tiny.gin",
            f"--model_dir={model_dir}", f"--gin.shapes_data_dir.path={data_dir!r}",
            f"--gin.TRAIN_STEPS={args.steps}", f"--gin.BATCH_SIZE={args.batch}",
            f"--gin.TASK_FEATURE_LENGTHS={{'targets': {args.length}}}",
            f"--gin.train.checkpoint_every={args.checkpoint_every}", "--gin.train.keep_checkpoints=2",
            "--gin.train.log_every=1"]


def run_to_end(cmd: list, log: str):
    """Runs `cmd` to the end; -> (seconds, seconds to its first logged step)."""
    t, first = time.time(), None
    start = os.path.getsize(log) if os.path.exists(log) else 0
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(0.5)
            if first is None:
                with open(log) as r:
                    r.seek(start)
                    if any(line.startswith("step ") for line in r):
                        first = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(f"soak: `{' '.join(cmd)}` exited with {proc.returncode}; see {log}")
    return time.time() - t, first


def _logged_step(log: str, start: int) -> int:
    """The last `step N/...` line written to `log` after byte `start` (0 if none)."""
    last = 0
    with open(log) as r:
        r.seek(start)
        for line in r:
            if line.startswith("step "):
                last = int(line.split()[1].split("/")[0])
    return last


def run_with_kills(cmd: list, log: str, kills: int, steps: int, rng: random.Random) -> list:
    """Starts `cmd`, SIGKILLs it `kills` times, restarting it after each kill
    with the same command, then lets it finish. Each kill comes at a random
    moment: once the run has logged the next of `kills` distinct steps drawn
    at random from the first 80% of training, plus a random 0-1.5 s (so kills
    land inside steps and saves, and the load on the machine does not decide
    whether they happen). -> [(step logged at the kill, seconds since that
    start)]."""
    kills_done = []
    targets = sorted(rng.sample(range(1, max(kills + 1, int(0.8 * steps))), kills))
    with open(log, "a") as f:
        for k in range(kills + 1):
            start = os.path.getsize(log)
            t = time.time()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            if k == kills:
                if proc.wait() != 0:
                    raise SystemExit(f"soak: the last restart exited with {proc.returncode}; see {log}")
                break
            resume = latest_step(cmd) or 0
            target, jitter = targets[k], rng.uniform(0.0, 1.5)
            while proc.poll() is None and _logged_step(log, start) < target:
                time.sleep(0.2)
            if proc.poll() is not None:
                raise SystemExit(f"soak: the run exited ({proc.returncode}) before kill {k + 1}; see {log}")
            time.sleep(jitter)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills_done.append((_logged_step(log, start), round(time.time() - t, 1)))
            say(f"  kill {k + 1}/{kills}: at step {kills_done[-1][0]} (+{jitter:.1f} s; resumed from "
                f"{resume}; the latest checkpoint is now {latest_step(cmd)})")
    return kills_done


def _count_lines(log: str, prefix: str) -> int:
    with open(log) as r:
        return sum(line.startswith(prefix) for line in r)


def _model_dir(cmd: list) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith("--model_dir="))


def latest_step(cmd: list):
    d = os.path.join(_model_dir(cmd), "checkpoints")
    steps = [int(s) for s in os.listdir(d) if s.isdigit()] if os.path.isdir(d) else []
    return max(steps) if steps else None


def final_state(model_dir: str, step: int):
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.join(model_dir, "checkpoints", str(step), "state"))


def bitwise_equal(a, b) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    if [p for p, _ in la] != [p for p, _ in lb]:
        return False
    return all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
               for (_, x), (_, y) in zip(la, lb))


def main():
    p = make_parser(__doc__)
    p.add_argument("--docs", type=int, default=400, help="documents in the image folder, bad ones included")
    p.add_argument("--bad_fraction", type=float, default=0.05)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--checkpoint_every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="work dir (default: a new temporary one, kept)")
    args = p.parse_args()
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="soak_"))
    os.makedirs(out, exist_ok=True)
    t0 = time.time()

    folder = os.path.join(out, "folder")
    if os.path.exists(folder):
        raise SystemExit(f"soak: {out} holds an earlier soak's data; give a new --out")
    injected, injected_kinds = write_corpus(folder, args.docs, args.bad_fraction, args.seed)
    say(f"image folder: {args.docs} records, {sum(injected.values())} bad ({injected_kinds})")
    models = make_models(out)
    report = build_data(folder, out, models)
    skipped = report["prepare"]["skipped"]
    say(f"task data: {report['prepare']['written']} documents written, skipped {skipped} "
        f"({time.time() - t0:.0f} s)")
    data_dir = report["data_dir"]
    rerun = build_data(folder, out, models)["prepare"]
    say(f"rerun of prepare: {rerun['new_records']} new records")

    for run in ("uninterrupted", "killed"):  # this script's own runs, from an earlier call on --out
        shutil.rmtree(os.path.join(out, run), ignore_errors=True)
    ref_cmd = train_command(os.path.join(out, "uninterrupted"), data_dir, args)
    say("uninterrupted run: " + " ".join(ref_cmd[1:]))
    ref_seconds, first_step = run_to_end(ref_cmd, os.path.join(out, "uninterrupted.log"))
    say(f"  {ref_seconds:.0f} s (first step logged after {first_step:.0f} s)")

    kill_cmd = train_command(os.path.join(out, "killed"), data_dir, args)
    rng = random.Random(args.seed)
    kill_times = run_with_kills(kill_cmd, os.path.join(out, "killed.log"), args.kills, args.steps, rng)

    ref_step, kill_step = latest_step(ref_cmd), latest_step(kill_cmd)
    ref_state = final_state(_model_dir(ref_cmd), ref_step)
    kill_state = final_state(_model_dir(kill_cmd), kill_step)
    result = {
        "benchmark": "soak",
        "kills": len(kill_times),
        "kills_at": [{"step": st, "seconds_after_start": sec} for st, sec in kill_times],
        "final_step": kill_step,
        # each restart after a SIGKILL finds the dead run's writer.lock (model_dir_lock)
        "stale_locks_taken_over": _count_lines(os.path.join(out, "killed.log"), "notice: taking over"),
        "uninterrupted_final_step": ref_step,
        "params_bitwise_equal": ref_step == kill_step and bitwise_equal(ref_state["params"], kill_state["params"]),
        "state_bitwise_equal": ref_step == kill_step and bitwise_equal(ref_state, kill_state),
        "skipped_by_reason": skipped,
        "injected_bad": injected,
        "injected_bad_kinds": injected_kinds,
        "skips_match": skipped == injected,
        "documents_written": report["prepare"]["written"],
        "good_records": args.docs - sum(injected.values()),
        "rerun_new_records": rerun["new_records"],
        "uninterrupted_seconds": round(ref_seconds, 1),
        "first_step_seconds": None if first_step is None else round(first_step, 1),
        "minutes": round((time.time() - t0) / 60, 2),
        "out": out,
        "config": {k: getattr(args, k) for k in ("docs", "bad_fraction", "steps", "batch", "length",
                                                   "checkpoint_every", "seed")},
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
