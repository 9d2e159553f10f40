"""The decoder's share of a demo's time budget (`demo.time_budget_minutes`):
what the finished stages before training left, less the minutes kept for
generation, evaluation and the report. The trainer then fits its step count
to that share (`train.time_budget_minutes`, train/time_budget.py)."""
from __future__ import annotations

import json
import os
from typing import Optional

from cm3leon_jax.demo.stages import GROUPS, STAGE_DIR


def minutes_before_train(c) -> float:  # c: a demo.pipeline.DemoConfig
    """Wall minutes the finished stages before training took, from their
    markers (a group's stages run at once: the longest counts)."""
    total = 0.0
    for group in GROUPS[:GROUPS.index(("train",))]:
        seconds = [0.0]
        for name in group:
            marker = c.path(STAGE_DIR, f"{name}.json")
            if os.path.isfile(marker):
                with open(marker) as f:
                    seconds.append(float(json.load(f).get("seconds", 0.0)))
        total += max(seconds)
    return total / 60.0


def train_budget_minutes(c) -> Optional[float]:
    """The decoder's share of `demo.time_budget_minutes`: what the stages
    before it left, less `demo.minutes_after_train` for generation,
    evaluation and the report; at least one minute. None without a budget."""
    if c.time_budget_minutes is None:
        return None
    left = c.time_budget_minutes - minutes_before_train(c) - c.minutes_after_train
    if left < 1.0:
        print(f"  demo.time_budget_minutes={c.time_budget_minutes:g}: only {left:.1f} min left for "
              "training; training for 1 minute", flush=True)
    return max(1.0, left)
