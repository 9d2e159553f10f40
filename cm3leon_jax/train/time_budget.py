"""Training steps from a wall-clock budget: `train.time_budget_minutes`.

A preset that must finish in a given time on machines of unknown speed (the
demos: `make demo` in 30 minutes, `demo_full` in 2 hours, on whatever 2-core
CPU runs them) cannot fix its step count: a fast machine would waste its
time, a slow one overrun. With a budget, `train.train_steps` is the most
steps the run may take, and the trainer picks the step count itself:

1. it trains `calibration_steps` steps after `skip_steps` warm-up steps
   (the first one compiles), timing them;
2. `plan_steps` turns the measured seconds a step and the seconds already
   spent into the step to stop at, capped at `train.train_steps`;
3. it writes that decision to `MODEL_DIR/time_budget.json` and rebuilds its
   LR schedule for the planned steps (the decay ends at the planned step,
   as if the run had been given that step count from the start).

A resumed run reads the decision and keeps it (the budget is not measured
again), so an interrupted run ends where the uninterrupted one would have.

Assumptions (the choice is ours; nothing in the paper):
- The steps before the decision follow the schedule of `train.train_steps`.
  They are within or just past the warm-up, where the two schedules agree
  or differ by a few parts in 10^5 of the peak LR.
- The time to compile the rebuilt step (measured as the first step's time
  over a normal step's) is taken out of the budget before planning.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

from cm3leon_jax import paths as paths_lib

PLAN_FILE = "time_budget.json"


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's decision: stop at `train_steps` (of at most `max_train_steps`)."""
    train_steps: int
    max_train_steps: int
    budget_seconds: float
    step_seconds: float
    decided_at_step: int
    elapsed_seconds: float


def plan_steps(*, step: int, max_steps: int, budget_seconds: float, elapsed_seconds: float,
               step_seconds: float, overhead_seconds: float = 0.0) -> int:
    """The step to stop at: `step` plus as many steps of `step_seconds` as
    fit in what is left of the budget after `elapsed_seconds` and
    `overhead_seconds`; never below `step`, never above `max_steps`."""
    if step_seconds <= 0 or not math.isfinite(step_seconds):
        raise ValueError(f"step_seconds must be a positive number, got {step_seconds}")
    if budget_seconds <= 0:
        raise ValueError(f"the time budget must be positive, got {budget_seconds} s")
    left = budget_seconds - elapsed_seconds - max(0.0, overhead_seconds)
    more = max(0, int(left // step_seconds))
    return max(step, min(int(max_steps), step + more))


def plan_path(model_dir: str) -> str:
    return os.path.join(model_dir, PLAN_FILE)


def read_plan(model_dir: str) -> Optional[Plan]:
    """The decision a run with a budget wrote in `model_dir`, or None."""
    path = plan_path(model_dir)
    if not paths_lib.exists(path):
        return None
    with paths_lib.open(path) as f:
        raw = json.load(f)
    try:
        return Plan(**{k: raw[k] for k in (f.name for f in dataclasses.fields(Plan))})
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a time-budget plan ({e}); delete it to plan again") from e


def remove_plan(model_dir: str) -> None:
    """Drops a decision left by an earlier run (a fresh run plans anew)."""
    if paths_lib.exists(plan_path(model_dir)):
        paths_lib.remove(plan_path(model_dir))


def write_plan(model_dir: str, plan: Plan) -> None:
    """Writes the decision (atomically on a local disk; gs:// objects are
    written whole anyway)."""
    path = plan_path(model_dir)
    tmp = path if paths_lib.is_url(path) else path + ".tmp"
    with paths_lib.open(tmp, "w") as f:
        json.dump(dataclasses.asdict(plan), f, indent=1)
    if tmp != path:
        os.replace(tmp, path)


class Calibration:
    """Times a run's steps `start + skip + 1 ... start + skip + count` (the
    run began at `start`; its first step compiles) and its first step.

    The trainer calls `tick(step, now)` after each step, having waited for
    the step's result (`jax.block_until_ready`) whenever `needs_sync(step)`:
    dispatch is asynchronous, so only a synced clock reads the compute."""

    def __init__(self, start_step: int, skip_steps: int, count: int, now: float):
        if count < 1 or skip_steps < 1:
            raise ValueError(f"time budget calibration needs >= 1 skipped and >= 1 timed step, got "
                             f"skip_steps={skip_steps}, calibration_steps={count}")
        self.start, self.first, self.last = start_step, start_step + skip_steps, start_step + skip_steps + count
        self.first_step_seconds: Optional[float] = None
        self._t_begin, self._t_first = now, None

    def needs_sync(self, step: int) -> bool:
        return step in (self.start + 1, self.first, self.last)

    def tick(self, step: int, now: float) -> Optional[float]:
        """Returns the mean seconds a timed step once `step` is the last
        timed one, else None."""
        if step == self.start + 1:
            self.first_step_seconds = now - self._t_begin
        if step == self.first:
            self._t_first = now
        if step == self.last:
            return (now - self._t_first) / (self.last - self.first)
        return None

    def compile_seconds(self, step_seconds: float) -> float:
        """What the first step took beyond a normal one: the cost of
        compiling a rebuilt step."""
        return max(0.0, (self.first_step_seconds or 0.0) - step_seconds)
