"""Orbax checkpoints: async saves every N steps keeping K, the input
iterator's state saved beside the train state, restore from the latest
*good* checkpoint (a corrupt one is moved aside with a warning, never
deleted)."""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

STATE = "state"
DATA = "data"


class CheckpointCorruptError(RuntimeError):
    pass


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with two items per step:
    `state` (the sharded TrainState, StandardSave) and `data` (the input
    iterator's JSON state)."""

    def __init__(self, directory: str, save_every: int, keep: Optional[int],
                 async_save: bool = True):
        self.directory = epath.Path(directory)
        self.save_every = save_every
        self.keep = keep
        self.async_save = async_save
        self._mgr = self._make_manager()

    def _make_manager(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            save_interval_steps=self.save_every,
            enable_async_checkpointing=self.async_save,
            create=True,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    # -- saving --------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                     DATA: ocp.args.JsonSave(data_state)})
        return self._mgr.save(step, args=args, force=force)

    def wait(self):
        self._mgr.wait_until_finished()

    def close(self):
        self._mgr.wait_until_finished()
        self._mgr.close()

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
    return os.path.abspath(os.path.join(model_dir, "checkpoints"))  # orbax wants absolute paths
