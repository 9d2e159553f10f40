"""Input pipeline throughput: the shapes_cm3_retrieval SeqIO pipeline vs. the tiny trainer's consumption.

One run measures, in alternating rounds so that both see the same machine
load (each pipeline round on a fresh iterator, so that nothing tf.data
buffered during a trainer round is counted):

  (a) the pipeline: `data.pipeline.TrainIterator` on `shapes_cm3_retrieval`
      (prepared documents -> retrieval augmentation with query dropout, 3
      sets per pair -> CM3 per document -> SeqIO trim + pack with the
      DecoderFeatureConverter -> batches) at gin/cm3leon_tiny.gin's feature
      length and batch size: packed sequences per second;
  (b) the tiny trainer: gin/cm3leon_tiny.gin's jitted train step (the
      trainer's `make_train_step`, AdamW, fp32) on batches drawn from (a)
      beforehand: sequences per second consumed.

The ratio a/b says how many times faster the input is than training needs
(target >= 10). Both count packed rows of the same length, so the ratio is
also the ratio in examples.

Data: `--data_dir` (a `cm3leon task-data` dir, e.g. the demo's
demo_out/data), else one built here (`build_task_data`, the code of
`cm3leon task-data`) on `shapes:--docs` with random-weight models at the
demo's geometry: a VQ-GAN of gin/vqgan_shapes.gin's architecture (64x64 ->
8x8 = 64 codes of 512), a 1,472-id BPE trained on shapes captions, and the
tests' tiny CLIP. Token counts per document are the demo's; only the code
values differ.

The last line printed is one JSON object. Quick run: `--rounds 1 --batches 5
--steps 3 --docs 300`.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from common import make_parser, say

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gin/vqgan_shapes.gin's VQGANConfig
SHAPES_VQ = dict(resolution=64, base_channels=16, channel_multiplier=(1, 1, 2, 4), num_res_blocks=1,
                 latent_channels=64, embed_dim=32, num_embeddings=512, num_groups=8)


def build_data(docs: int, out: str) -> str:
    sys.path.insert(0, os.path.join(REPO, "tests", "data"))
    from task_data import TINY_TEXT_VOCAB, make_bpe, make_vq_dir
    from tiny_clip import make_clip_dir

    from cm3leon_jax.data.task_data_builder import build_task_data

    t = time.time()
    models = {"vqgan_dir": make_vq_dir(os.path.join(out, "vqgan"), **SHAPES_VQ),
              "text_tokenizer": make_bpe(os.path.join(out, "text"), TINY_TEXT_VOCAB),
              "clip_dir": make_clip_dir(os.path.join(out, "clip"))}
    data = os.path.join(out, "data")
    build_task_data(f"shapes:{docs}", data, **models, k=16, progress=False)
    say(f"built {docs}-document task data in {time.time() - t:.1f} s: {data} (kept; reuse it with --data_dir)")
    return data


def main():
    p = make_parser(__doc__)
    p.add_argument("--data_dir", default=None, help="a task-data dir (default: build one, see above)")
    p.add_argument("--docs", type=int, default=2000, help="documents of the data built here")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=150,
                   help="pipeline batches timed per round (SeqIO packs in windows: keep it long)")
    p.add_argument("--steps", type=int, default=10, help="train steps timed per round")
    p.add_argument("--drain", type=int, default=20, help="untimed pipeline batches at the start of a round")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import gin

    from cm3leon_jax import gin_utils
    from cm3leon_jax.data import pipeline, tasks

    tmp = tempfile.mkdtemp(prefix="bench_input_")
    data_dir = os.path.abspath(args.data_dir) if args.data_dir else build_data(args.docs, tmp)
    os.environ[tasks.SHAPES_DATA_ENV] = data_dir
    gin_utils.parse(["gin/cm3leon_tiny.gin"], [f"MODEL_DIR = {tmp!r}"],
                    extra_modules=("cm3leon_jax.data.cm3", "cm3leon_jax.data.retrieval_aug"))
    task = gin.query_parameter("MIXTURE_OR_TASK_NAME/macro.value")
    lengths = gin.query_parameter("TASK_FEATURE_LENGTHS/macro.value")
    batch_size = gin.query_parameter("BATCH_SIZE/macro.value")
    seq_len = lengths["targets"]

    import jax
    import numpy as np

    from cm3leon_jax import partitioning
    from cm3leon_jax.models.decoder import Decoder
    from cm3leon_jax.models.decoder_config import DecoderConfig
    from cm3leon_jax.train import optimizer as opt_lib
    from cm3leon_jax.train import state as state_lib
    from cm3leon_jax.train.step import make_train_step

    cfg = DecoderConfig()
    pipeline.check_vocabulary(task, cfg.vocab_size)
    it = pipeline.TrainIterator(task, lengths, batch_size, args.seed)
    t = time.time()
    first = next(it)
    say(f"pipeline: first batch after {time.time() - t:.1f} s (opens the data, compiles the tf.data graph)")
    fill = [float((first["decoder_segment_ids"] > 0).mean())]
    segs = [float(first["decoder_segment_ids"].max(axis=1).mean())]

    mesh = partitioning.create_mesh()
    rules = partitioning.logical_axis_rules()
    model = Decoder(cfg)
    sched = opt_lib.learning_rate_schedule(total_steps=1000)
    tx = opt_lib.adamw(sched)
    _, shardings, init = state_lib.abstract_state(model, tx, seq_len, args.seed, mesh, rules)
    step = jax.jit(make_train_step(model.apply, tx, sched), in_shardings=(shardings, partitioning.batch_sharding(mesh, rules)),
                   out_shardings=(shardings, partitioning.replicated(mesh)), donate_argnums=(0,))
    state = init()
    train_batches = [next(it) for _ in range(args.steps)]
    with jax.set_mesh(mesh):
        t = time.time()
        state, m = step(state, partitioning.global_batch_from_local(first, mesh, rules))
        jax.block_until_ready(m)
        say(f"trainer: first step (compile) {time.time() - t:.1f} s")

    del it  # a live iterator keeps producing in tf.data's threads during the trainer rounds

    pipe_rates, train_rates = [], []
    for r in range(args.rounds):
        # A fresh iterator per round (seed + round): nothing was buffered while
        # the trainer ran. Its start (the shuffle buffer's fill) and the first
        # `drain` batches are untimed; the next `batches` are the steady state.
        it = pipeline.TrainIterator(task, lengths, batch_size, args.seed + 1 + r)
        for _ in range(args.drain):
            next(it)
        t = time.time()
        for _ in range(args.batches):
            b = next(it)
            fill.append(float((b["decoder_segment_ids"] > 0).mean()))
            segs.append(float(b["decoder_segment_ids"].max(axis=1).mean()))
        pipe_rates.append(args.batches * batch_size / (time.time() - t))
        del it
        with jax.set_mesh(mesh):
            t = time.time()
            for b in train_batches:
                state, m = step(state, partitioning.global_batch_from_local(b, mesh, rules))
            jax.block_until_ready(m)
        train_rates.append(args.steps * batch_size / (time.time() - t))
        say(f"round {r + 1}: pipeline {pipe_rates[-1]:.1f} sequences/s | trainer {train_rates[-1]:.1f} "
            f"sequences/s | ratio {pipe_rates[-1] / train_rates[-1]:.1f}")
    a, b = statistics.median(pipe_rates), statistics.median(train_rates)
    say(f"ratio pipeline/trainer (medians): {a / b:.1f}x (target >= 10x)")
    print(json.dumps({
        "benchmark": "input_pipeline", "task": task, "seq_len": seq_len, "batch_size": batch_size,
        "pipeline_sequences_per_sec": round(a, 2), "trainer_sequences_per_sec": round(b, 2),
        "ratio": round(a / b, 2), "target_ratio": 10, "meets_target": a / b >= 10,
        "pipeline_examples_per_sec": round(a * float(np.mean(segs)), 2),
        "mean_examples_per_sequence": round(float(np.mean(segs)), 3),
        "mean_fill": round(float(np.mean(fill)), 3), "rounds": args.rounds, "data_dir": data_dir,
        "cpu_count": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
