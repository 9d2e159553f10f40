"""Orbax checkpoints: async saves every N steps keeping K, the input
iterator's state saved beside the train state, restore from the latest
*good* checkpoint (a corrupt one is moved aside with a warning, never
deleted).

A save that the disk refuses (no space, quota, I/O error, read-only) raises
`CheckpointWriteError`, one line naming the step, the directory, the cause
and the step a rerun resumes from, wherever Orbax surfaces it: in `save`, or
for an async save at the next `save`, `wait` or `close`. Orbax writes a step
into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once its arrays
are written (on GCS: `commit_success.txt` last), so a half-written step is
not listed as a checkpoint; its leftovers are removed when the next run opens
the directory as its writer (`cleanup_tmp_directories`). A step that was committed before a
late write of it failed (Orbax's step metadata) is renamed
`<step>.write-failed-<time>`, so the resume point is the step before it."""
from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath

from cm3leon_jax import disk_faults
from cm3leon_jax import paths as paths_lib

log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"


class CheckpointCorruptError(RuntimeError):
    pass


class CheckpointWriteError(RuntimeError):
    """The file system refused a checkpoint write; the checkpoints before it
    are untouched."""

    def __init__(self, step: int, directory, cause: str, last_good: Optional[int], errno_: Optional[int]):
        self.step, self.directory, self.cause, self.last_good = step, str(directory), cause, last_good
        fix = disk_faults.advice(errno_)
        resume = (f"training resumes from step {last_good}" if last_good is not None
                  else "no checkpoint was written yet, training starts again from step 0")
        super().__init__(f"cannot write checkpoint step {step} to {self.directory}: {cause}; {fix}: {resume}")


# What the background work of a failed save reports as it is abandoned: its
# tensorstore writes complete after Orbax closed their event loop.
_ABANDONED = ("Event loop is closed", "cannot schedule new futures after")


class _QuietDiskFaults(logging.Filter):
    """Drops Orbax's own log records of a disk fault (each background thread
    logs the same error with a traceback); the trainer reports it once, as a
    `CheckpointWriteError`."""

    after_fault = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname or record.levelno < logging.ERROR:
            return True
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += " " + str(record.exc_info[1])
            if disk_faults.disk_fault(record.exc_info[1]) is not None:
                return False
        if self.after_fault and any(w in text for w in _ABANDONED):
            return False
        return not disk_faults.mentions_disk_fault(text)


_QUIET = _QuietDiskFaults()


def _quiet_abandoned_writes():
    """After a failed save: tensorstore reports (as an unraisable exception)
    each abandoned write's callback that finds its event loop closed; those
    tracebacks say nothing the one-line error does not."""
    _QUIET.after_fault = True
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    previous = sys.unraisablehook
    if getattr(previous, "_cm3leon_quiet", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and any(w in str(unraisable.exc_value)
                                                                    for w in _ABANDONED):
            return
        previous(unraisable)

    hook._cm3leon_quiet = True
    sys.unraisablehook = hook


def _join_orbax_threads(timeout: float = 120.0):
    """Waits (at most `timeout` s) for Orbax's background threads, which a
    failed save leaves running, so none is cut off at interpreter exit."""
    deadline = time.time() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax"):
            try:
                t.join(max(0.0, deadline - time.time()))
            except Exception:  # noqa: BLE001 - Orbax's threads re-raise their error on join: reported already
                pass


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with two items per step:
    `state` (the sharded TrainState, StandardSave) and `data` (the input
    iterator's JSON state)."""

    def __init__(self, directory: str, save_every: int, keep: Optional[int],
                 async_save: bool = True, writer: bool = False):
        """`writer`: the trainer, which holds the model dir's writer lock
        (model_dir_lock): it removes what a failed or killed save left
        half-written. A reader never does (it could be a live run's save)."""
        self.directory = epath.Path(directory)
        self.save_every = save_every
        self.keep = keep
        self.async_save = async_save
        self.writer = writer
        for name in ("absl", "orbax"):
            if _QUIET not in logging.getLogger(name).filters:
                logging.getLogger(name).addFilter(_QUIET)
        self._mgr = self._make_manager()
        self._pending: Optional[int] = None  # submitted, not yet known to be on disk
        self._failed: Optional[CheckpointWriteError] = None
        self.last_written = self.latest_step()

    def _make_manager(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            save_interval_steps=self.save_every,
            enable_async_checkpointing=self.async_save,
            create=True,
            # a step left half-written by a failed or killed save
            cleanup_tmp_directories=self.writer,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    # -- saving --------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Starts saving `step` (async: returns once the arrays are copied).
        CheckpointWriteError if this save, or an earlier async one, could not
        be written."""
        self._settle()
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                     DATA: ocp.args.JsonSave(data_state)})
        try:
            saved = self._mgr.save(step, args=args, force=force)
        except Exception as e:  # noqa: BLE001 - only disk faults are turned into one line
            self._fail(step, e)
        if saved:
            self._pending = step
            if not self.async_save:
                self._settle()
        return saved

    def wait(self):
        self._settle()

    def close(self):
        """Waits for the last save; CheckpointWriteError if it failed. Orbax's
        resources are released either way."""
        try:
            self._settle()
        finally:
            try:
                self._mgr.close()
            except Exception:  # noqa: BLE001 - the failure is reported once, by _settle
                if self._failed is None:
                    raise
            if self._failed is not None:
                _join_orbax_threads()
                self._set_aside(self._failed.step)  # its background commit may have finished since

    def _settle(self):
        if self._failed is not None:
            raise self._failed
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self._mgr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(step, e)
        self._mgr.reload()
        if step not in self._mgr.all_steps():
            # Orbax logs (and does not raise) some failures of its final commit
            self._fail(step, OSError(errno.EIO, "the step was not committed (Orbax's log above says why)"))
        self.last_written = step

    def _fail(self, step: int, e: BaseException):
        fault = disk_faults.disk_fault(e)
        if fault is None:
            raise e
        self._failed = CheckpointWriteError(step, self.directory, fault[0], self.last_written, fault[1])
        _quiet_abandoned_writes()
        log.debug("checkpoint write failed", exc_info=e)
        self._set_aside(step)
        raise self._failed from None

    def _set_aside(self, step: int):
        # Orbax may commit a step before a late write of it (its step
        # metadata) fails: a step whose write failed is never a resume point.
        src = self.directory / str(step)
        if jax.process_index() == 0 and src.exists():
            src.rename(self.directory / f"{step}.write-failed-{int(time.time())}")

    # -- restoring -------------------------------------------------------------
    def all_steps(self):
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        """Restore one step into arrays with the shardings of `abstract_state`
        (a tree of jax.ShapeDtypeStruct carrying `.sharding`)."""
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                     DATA: ocp.args.JsonRestore()})
        out = self._mgr.restore(step, args=args)
        return out[STATE], out[DATA]

    def restore_latest_good(self, abstract_state: Any):
        """(step, state, data_state) of the newest checkpoint that restores,
        or None when there is none. A checkpoint that fails to restore is
        renamed `<step>.corrupt-<time>` with a warning and the previous one is
        tried."""
        moved = False
        result = None
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
                _check_shapes(state, abstract_state, step)
                result = (step, state, data_state)
                break
            except Exception as e:  # noqa: BLE001 - any failure means unusable
                aside = self._move_aside(step)
                msg = (f"checkpoint at step {step} in {self.directory} could not be restored "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                       f"moved to {aside.name}, trying the previous one")
                log.warning(msg)
                print(f"WARNING: {msg}", flush=True)
                moved = True
        if moved:
            self._mgr.close()
            self._mgr = self._make_manager()
        self.last_written = result[0] if result else None
        return result

    def _move_aside(self, step: int) -> epath.Path:
        src = self.directory / str(step)
        dst = self.directory / f"{step}.corrupt-{int(time.time())}"
        if jax.process_index() == 0 and src.exists():
            src.rename(dst)
        return dst


def _check_shapes(state, abstract_state, step):
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(abstract_state)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointCorruptError(
                f"step {step}: array {got.shape}/{got.dtype} where {want.shape}/{want.dtype} "
                "was expected (was the model config changed?)")


def abstract_with_sharding(abstract_tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, shardings)


def checkpoint_dir(model_dir: str) -> str:
    # orbax wants absolute paths; a gs:// URL is kept as it is
    return paths_lib.abspath(os.path.join(model_dir, "checkpoints"))


def _latest_step_dir(directory: str) -> Optional[str]:
    steps = sorted((int(p) for p in paths_lib.listdir(directory) if p.isdigit()), reverse=True) \
        if paths_lib.isdir(directory) else []
    return os.path.join(directory, str(steps[0])) if steps else None


def resolve_init_checkpoint(path: str) -> str:
    """The state dir (`.../checkpoints/N/state`) of an init checkpoint given as
    a model dir (its latest step), a `checkpoints/` dir (its latest step), a
    step dir (`checkpoints/N`) or the state dir itself."""
    path = paths_lib.abspath(path)
    candidates = []
    for base in (os.path.join(path, "checkpoints"), path):
        step_dir = _latest_step_dir(base)
        if step_dir:
            candidates.append(os.path.join(step_dir, STATE))
    candidates += [os.path.join(path, STATE), path]
    for c in candidates:
        if paths_lib.isdir(c) and (paths_lib.isfile(os.path.join(c, "_METADATA"))
                                   or paths_lib.isfile(os.path.join(c, "manifest.ocdbt"))):
            return c
    raise ValueError(f"--init_checkpoint {path!r} holds no checkpoint: give a `cm3leon train` model dir, its "
                     "checkpoints/ dir or one checkpoints/STEP dir")


def restore_params(path: str, abstract_params: Any) -> Any:
    """Only the params of a saved TrainState (not its optimizer state or
    step), placed with the shardings of `abstract_params` (ShapeDtypeStructs
    with `.sharding`), read by Orbax's partial restore. ValueError naming the
    first array whose shape differs (another model config)."""
    state_dir = resolve_init_checkpoint(path)
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(state_dir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        saved = tree["params"]
    except Exception as e:  # noqa: BLE001 - unreadable metadata: a corrupt checkpoint
        raise ValueError(f"init checkpoint {state_dir!r} is unreadable ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    flat_saved = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    for key, want in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        name = jax.tree_util.keystr(key)
        got = flat_saved.get(name)
        if got is None or tuple(got.shape) != tuple(want.shape):
            raise ValueError(
                f"init checkpoint {state_dir!r} does not fit this model: params{name} is "
                f"{None if got is None else tuple(got.shape)} there and {tuple(want.shape)} here. Use the "
                "pretrained model's DecoderConfig and UnifiedVocabulary (`cm3leon finetune` reads them from "
                "the init model dir's config.gin)")
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_params)
    out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
    return out["params"]
