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

from cm3leon_jax import paths as paths_lib

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
