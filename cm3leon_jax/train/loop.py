"""The step loop of the single-device trainers (`cm3leon tokenizer
train-image`, `cm3leon clip train`): run the jitted step, log every
`log_every` steps to the shared metrics writers and progress line, stop on a
non-finite loss, checkpoint every `checkpoint_every` steps and at the end.

Batches are a pure function of the step in both trainers (`make_batch(step)`),
so a resumed run continues exactly from the restored step with nothing but
the step. JAX's asynchronous dispatch already overlaps building batch s + 1 on
the host with step s on the device: the loop only waits at log points. The
decoder trainer has its own loop (mesh, iterator state, SIGTERM, deferred
finiteness checks)."""
from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import numpy as np

from cm3leon_jax import checkpoints as ckpt_lib
from cm3leon_jax.train import metrics as metrics_lib


def restore_or_init(init: Callable[[], Any], model_dir: str, checkpoint_every: int, keep_checkpoints: int,
                    quiet: bool):
    """(checkpointer, state, start step): the latest good checkpoint of
    `model_dir` restored onto one device, else `jax.jit(init)()` at step 0.
    A corrupt latest checkpoint is moved aside and the one before it used
    (`Checkpointer.restore_latest_good`)."""
    abstract = jax.eval_shape(init)
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(model_dir), checkpoint_every, keep_checkpoints,
                                 writer=True)
    restored = ckpt.restore_latest_good(target)
    if restored is None:
        # The fresh state is committed to the device a restored one lands on,
        # so a run and its resumption trace the same step program (one
        # compile, then JAX's compilation cache, not two).
        options = None
        if jax.default_backend() == "cpu":
            # Initialisation runs once: its many unrolled random-bit
            # generators take XLA:CPU seconds to optimise and gain nothing
            # from it (the VQ-GAN's: 10 s -> 3.4 s; values equal to 1 ulp).
            options = {"xla_backend_optimization_level": 0}
        return ckpt, jax.jit(init, out_shardings=replicated, compiler_options=options)(), 0
    start, state, _ = restored
    if not quiet:
        print(f"resumed from step {start}", flush=True)
    return ckpt, state, start


def run_steps(*, state: Any, start_step: int, train_steps: int, make_batch: Callable[[int], tuple],
              step_fn: Callable, ckpt, writer, examples_per_step: int, log_every: int,
              checkpoint_every: int, quiet: bool, what: str, lr_binding: str,
              speed_key: str = "examples_per_sec") -> Tuple[Any, int]:
    """Runs `state, metrics = step_fn(state, *make_batch(step))` from
    `start_step` to `train_steps`; returns (final state, steps done).

    `what` names the model in the non-finite-loss error and `lr_binding` the
    gin binding to lower. Checkpoints record the examples consumed. The
    checkpointer and writer are closed / flushed on the way out, whatever
    happens; a checkpoint the disk refused stops the loop with
    `checkpoints.CheckpointWriteError`."""
    progress = metrics_lib.Progress(train_steps, start_step)
    clock = metrics_lib.Throughput(examples_per_step, 0.0, 0.0, 1)
    step = start_step
    try:
        while step < train_steps:
            state, metrics = step_fn(state, *make_batch(step))
            step += 1
            clock.tick()
            if step % log_every == 0 or step == train_steps:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not np.isfinite(row["loss"]):
                    raise FloatingPointError(f"non-finite {what} loss at step {step}; lower {lr_binding}")
                speed = clock.measure()
                row[speed_key] = speed["tokens_per_sec"]
                row["step_time_sec"] = speed["step_time_sec"]
                writer.write_scalars(step, row)
                progress.report(step, row, not quiet)
            if step % checkpoint_every == 0 or step == train_steps:
                ckpt.save(step, state, {"examples_consumed": step * examples_per_step}, force=True)
    finally:
        try:
            ckpt.close()  # CheckpointWriteError when the last save could not be written
        finally:
            writer.flush()
    return state, step
