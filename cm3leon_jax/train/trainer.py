"""The T5X-style training loop, configured by gin (gin/runs/pretrain.gin).

Sharded state (jax.jit + NamedSharding over the gin mesh), Orbax checkpoints
with the input iterator's state, automatic resume from the latest good
checkpoint, SIGTERM -> checkpoint -> clean exit, non-finite loss -> stop with
a message naming the step and the last good checkpoint, metrics to
TensorBoard and metrics.jsonl, a progress line with ETA.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Mapping, Optional

import gin
import jax
import numpy as np

from cm3leon_jax import distributed as distributed_lib
from cm3leon_jax import model_dir_lock
from cm3leon_jax import partitioning
from cm3leon_jax import paths as paths_lib
from cm3leon_jax.models.decoder import Decoder
from cm3leon_jax.models.decoder_config import DecoderConfig
from cm3leon_jax import checkpoints as ckpt_lib
from cm3leon_jax.train import metrics as metrics_lib
from cm3leon_jax.train import optimizer as opt_lib
from cm3leon_jax.train import state as state_lib
from cm3leon_jax.train import time_budget as budget_lib
from cm3leon_jax.train.step import make_train_step

log = logging.getLogger(__name__)

# Fault injection for the resume test: the process SIGKILLs itself right
# after this step (a real, uncatchable kill, like a lost VM).
FAULT_SIGKILL_ENV = "CM3LEON_FAULT_SIGKILL_AFTER_STEP"


BATCH_HASHES_FILE = "batch_hashes.jsonl"


def batch_hash(batch: Mapping[str, np.ndarray]) -> str:
    """sha256 over a batch's features (sorted names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for k in sorted(batch):
        a = np.ascontiguousarray(batch[k])
        h.update(f"{k}:{a.shape}:{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def batch_hashes_path(model_dir: str, process_index: Optional[int] = None) -> str:
    """model_dir/batch_hashes.jsonl for process 0; other hosts of a multi-host
    run hash their own shard into batch_hashes.process<i>.jsonl."""
    i = jax.process_index() if process_index is None else process_index
    name = BATCH_HASHES_FILE if i == 0 else BATCH_HASHES_FILE.replace(".jsonl", f".process{i}.jsonl")
    return os.path.join(model_dir, name)


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class TrainStepBuild:
    """What `build_train_step` makes: the abstract TrainState and its
    shardings, a jitted sharded init, and the jitted train step
    `(state, batch) -> (state, metrics)` with its input shardings (the state
    is donated). `cm3leon compile` lowers this same `jit_step` for a TPU
    topology (train/compile.py)."""

    model: Decoder
    schedule: Any
    abstract: Any
    shardings: Any
    sharded_init: Any
    jit_step: Any
    batch_sharding: Any


def build_train_step(model_config: DecoderConfig, train_steps: int, seq_len: int, mesh, rules,
                     num_microbatches: int = 1, z_loss: float = 0.0, seed: int = 0) -> TrainStepBuild:
    """The decoder, the gin optimizer and LR schedule, the sharded state and
    the jitted train step over `mesh` (any mesh: CPU devices, or TPU devices
    of a topology description for ahead-of-time compilation)."""
    model = Decoder(model_config)
    schedule = opt_lib.learning_rate_schedule(total_steps=train_steps)
    tx = opt_lib.adamw(schedule)
    abstract, shardings, sharded_init = state_lib.abstract_state(model, tx, seq_len, seed, mesh, rules)
    step_fn = make_train_step(model.apply, tx, schedule, num_microbatches, z_loss)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    jit_step = jax.jit(step_fn, in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, partitioning.replicated(mesh)),
                       donate_argnums=(0,))
    jit_step = partitioning.RulesInForce(jit_step, mesh, rules)
    return TrainStepBuild(model, schedule, abstract, shardings, sharded_init, jit_step, batch_sharding)


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints at the end of the step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._old = None
        return self

    def _handler(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@gin.configurable
@model_dir_lock.writes_model_dir(before=distributed_lib.initialize_distributed)
def train(*,
          model_dir: str = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          model_config: Optional[DecoderConfig] = None,
          num_microbatches: int = 1,
          z_loss: float = 0.0,
          seed: int = 0,
          data_seed: Optional[int] = None,
          checkpoint_every: int = 1000,
          keep_checkpoints: Optional[int] = 3,
          async_checkpoints: bool = True,
          log_every: int = 10,
          peak_flops_per_device: Optional[float] = None,
          record_batch_hashes: bool = False,
          init_checkpoint: Optional[str] = None,
          time_budget_minutes: Optional[float] = None,
          budget_skip_steps: int = 10,
          budget_calibration_steps: int = 100,
          quiet: bool = False) -> dict:
    """Trains the decoder; returns the last logged metrics.

    Args:
      model_dir: checkpoints/, metrics.jsonl, TensorBoard events, config.gin.
      mixture_or_task_name: a registered SeqIO task or mixture.
      task_feature_lengths: {"targets": L}; sequences are packed to L. SFT
        tasks: {"inputs": Li, "targets": Lt}, packed to Li + Lt.
      train_steps: the step to stop at (a resumed run continues to it).
      batch_size: global sequences per step (split over hosts and microbatches).
      num_microbatches: gradient accumulation; the update equals one big batch.
      z_loss: weight of log(Z)^2 (PaLM's auxiliary loss); 0 disables it.
      peak_flops_per_device: for MFU; None measures a jitted matmul at start.
      record_batch_hashes: append {"step", "sha256"} of every input batch
        (this host's, before sharding) to model_dir/batch_hashes.jsonl, to
        check that a resumed run reads exactly the batches of an
        uninterrupted one.
      init_checkpoint: fine-tuning: a fresh run (no checkpoint in model_dir
        yet) starts from these params (a model dir or checkpoint dir; not
        its optimizer state or step); a resumed run ignores it.
      time_budget_minutes: wall-clock budget of this command; `train_steps`
        becomes the most steps it may take. After `budget_skip_steps` steps
        it times `budget_calibration_steps` more, picks the step to stop at
        so the run ends within the budget, writes the decision to
        MODEL_DIR/time_budget.json and decays the LR to that step
        (train/time_budget.py). A resumed run keeps the decision. None: train
        `train_steps` steps.
    """
    t_enter = time.perf_counter()
    # Multi-host: jax.distributed.initialize before anything touches devices
    # (a no-op for single-process runs and when `cm3leon train` already did it).
    distributed_lib.initialize_distributed()
    model_config = model_config or DecoderConfig()
    from cm3leon_jax.data.pipeline import TrainIterator, check_vocabulary, decoder_length

    seq_len = decoder_length(mixture_or_task_name, task_feature_lengths)
    if seq_len > model_config.max_length:
        raise ValueError(f"TASK_FEATURE_LENGTHS {dict(task_feature_lengths)} ({seq_len} tokens) exceeds "
                         f"DecoderConfig.max_length="
                         f"{model_config.max_length}")
    if batch_size % num_microbatches:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by "
                         f"train.num_microbatches={num_microbatches}")
    is_chief = jax.process_index() == 0
    paths_lib.makedirs(model_dir)  # local dir or gs:// (paths.py)

    if time_budget_minutes is not None and not time_budget_minutes > 0:
        raise ValueError(f"train.time_budget_minutes must be a positive number of minutes or None, got "
                         f"{time_budget_minutes!r}")
    mesh = partitioning.create_mesh()
    rules = partitioning.logical_axis_rules()
    built = build_train_step(model_config, train_steps, seq_len, mesh, rules, num_microbatches, z_loss, seed)
    abstract, shardings, sharded_init = built.abstract, built.shardings, built.sharded_init
    target = ckpt_lib.abstract_with_sharding(abstract, shardings)

    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(model_dir), checkpoint_every,
                                 keep_checkpoints, async_checkpoints, writer=True)
    restored = ckpt.restore_latest_good(target)
    if restored is None:
        state, start_step, last_good = sharded_init(), 0, None
        if init_checkpoint:
            params = ckpt_lib.restore_params(init_checkpoint, target.params)
            state = state.replace(params=params)
            _say(quiet, f"initialised params from {ckpt_lib.resolve_init_checkpoint(init_checkpoint)}")
    else:
        start_step, state, data_state = restored
        last_good = start_step
        if int(data_state.get("batches_consumed", start_step)) != start_step:
            raise ckpt_lib.CheckpointCorruptError(
                f"checkpoint {start_step}: iterator state says {data_state.get('batches_consumed')} "
                "batches were consumed; expected one per step")
        _say(quiet, f"resumed from step {start_step} ({ckpt.directory / str(start_step)})")

    # A time budget's decision holds for the run that made it: a resumed run
    # keeps it (and its LR schedule); a fresh one drops any left behind.
    plan, stop_at = None, train_steps
    if restored is None:
        if is_chief:
            budget_lib.remove_plan(model_dir)
    else:
        plan = budget_lib.read_plan(model_dir)
    if plan is not None:
        stop_at = min(plan.train_steps, train_steps)
        _say(quiet, f"time budget: {budget_lib.plan_path(model_dir)} planned {plan.train_steps} steps "
                    f"(of at most {plan.max_train_steps}); stopping at step {stop_at}")
        if stop_at != train_steps:
            built = build_train_step(model_config, stop_at, seq_len, mesh, rules, num_microbatches, z_loss, seed)

    check_vocabulary(mixture_or_task_name, model_config.vocab_size)
    data = TrainIterator(mixture_or_task_name, task_feature_lengths, batch_size,
                         seed if data_seed is None else data_seed,
                         shard_index=jax.process_index(), num_shards=jax.process_count(),
                         start_batch=start_step)
    if restored is not None:
        # The iterator state is saved once (by process 0, Orbax's JsonSave), so
        # its shard_index is process 0's; every other field is the same on all
        # hosts (the batches are consumed in lockstep).
        problem = TrainIterator.check_resumable(
            {k: v for k, v in data_state.items() if k != "shard_index"}, data.spec)
        if problem:
            raise ValueError(f"cannot resume {model_dir}: {problem}")

    jit_step = built.jit_step

    writer = metrics_lib.create_writer(model_dir, is_chief)
    if start_step == 0 and is_chief:
        counts = model_config.param_counts()
        writer.write_hparams({"params_total": counts["total"], "seq_len": seq_len,
                              "batch_size": batch_size, "num_devices": jax.device_count()})
    peak = peak_flops_per_device or metrics_lib.measure_peak_flops()
    throughput = metrics_lib.Throughput(batch_size * seq_len, model_config.train_flops_per_token(seq_len),
                                        peak, jax.device_count())
    progress = metrics_lib.Progress(stop_at, start_step)
    calibration = None
    if (time_budget_minutes is not None and plan is None
            and start_step + budget_skip_steps + budget_calibration_steps < train_steps):
        calibration = budget_lib.Calibration(start_step, budget_skip_steps, budget_calibration_steps,
                                             time.perf_counter())
    fault_step = int(os.environ.get(FAULT_SIGKILL_ENV, "0") or 0)

    hashes = paths_lib.open(batch_hashes_path(model_dir), "a") if record_batch_hashes else None
    pending = []  # (step, metrics on device) not yet checked for finiteness
    last = {}
    step = start_step

    def check_pending():
        nonlocal last
        fetched = jax.device_get(pending)
        pending.clear()
        for s, m in fetched:
            if not math.isfinite(float(m["loss"])) or not math.isfinite(float(m["grad_norm"])):
                where = (f"step {last_good} ({ckpt.directory / str(last_good)})" if last_good is not None
                         else "none (no checkpoint was written yet)")
                raise NonFiniteLossError(
                    f"non-finite loss at step {s} (loss={float(m['loss'])}, grad_norm="
                    f"{float(m['grad_norm'])}); stopping. Last good checkpoint: {where}. "
                    "Lower the learning rate, enable z_loss or check the input data.")
        if fetched:
            last = {k: float(np.asarray(v)) for k, v in fetched[-1][1].items()}
            return fetched[-1][0]
        return None

    with mesh, _Preemption() as preempt:
        try:
            while step < stop_at:
                local = next(data)
                if hashes is not None:
                    hashes.write(json.dumps({"step": step + 1, "sha256": batch_hash(local)}) + "\n")
                    hashes.flush()
                batch = partitioning.global_batch_from_local(local, mesh, rules)
                state, metrics = jit_step(state, batch)
                step += 1
                if calibration is not None and calibration.needs_sync(step):
                    jax.block_until_ready(metrics)
                    step_seconds = calibration.tick(step, time.perf_counter())
                    if step_seconds is not None:
                        stop_at = _plan_from_budget(model_dir, step, train_steps, time_budget_minutes,
                                                    time.perf_counter() - t_enter, step_seconds,
                                                    calibration.compile_seconds(step_seconds), is_chief, quiet)
                        if stop_at != train_steps:
                            jit_step = build_train_step(model_config, stop_at, seq_len, mesh, rules,
                                                        num_microbatches, z_loss, seed).jit_step
                        progress.total, calibration = stop_at, None
                throughput.tick()
                pending.append((step, metrics))
                if step % log_every == 0 or step == stop_at or preempt.requested:
                    check_pending()
                    row = dict(last, **throughput.measure())
                    writer.write_scalars(step, row)
                    progress.report(step, row, is_chief and not quiet)
                if step % checkpoint_every == 0 or step == stop_at or preempt.requested:
                    check_pending()  # never checkpoint a state that saw a NaN
                    ckpt.save(step, state, data.state(), force=True)
                    last_good = step
                if preempt.requested:
                    ckpt.wait()
                    _say(quiet, f"SIGTERM: saved checkpoint at step {step}; exiting")
                    break
                if fault_step and step == fault_step:
                    sys.stdout.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            if hashes is not None:
                hashes.close()
            try:
                ckpt.close()  # CheckpointWriteError when the last save could not be written
            finally:
                writer.flush()
                writer.close()
    return dict(last, step=step, preempted=preempt.requested)


def _plan_from_budget(model_dir: str, step: int, max_steps: int, budget_minutes: float, elapsed: float,
                      step_seconds: float, overhead: float, is_chief: bool, quiet: bool) -> int:
    """Decides (on process 0; every host gets its answer) and records the
    step a budgeted run stops at."""
    stop_at = budget_lib.plan_steps(step=step, max_steps=max_steps, budget_seconds=60.0 * budget_minutes,
                                    elapsed_seconds=elapsed, step_seconds=step_seconds,
                                    overhead_seconds=overhead)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        stop_at = int(multihost_utils.broadcast_one_to_all(np.int32(stop_at)))
    if is_chief:
        budget_lib.write_plan(model_dir, budget_lib.Plan(
            train_steps=stop_at, max_train_steps=max_steps, budget_seconds=60.0 * budget_minutes,
            step_seconds=round(step_seconds, 5), decided_at_step=step, elapsed_seconds=round(elapsed, 1)))
    _say(quiet, f"time budget {budget_minutes:g} min: {step_seconds:.3f} s a step after {elapsed:.0f} s; "
                f"training {stop_at} steps (at most {max_steps})")
    return stop_at


def _say(quiet: bool, msg: str):
    if not quiet and jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
