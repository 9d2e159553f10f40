"""`train.time_budget_minutes`: the step count from a wall-clock budget
(train/time_budget.py), worked by hand, then through `cm3leon train`: a run
out of time stops at its decision and a resumed run keeps it; a budget
larger than the run changes nothing, bit for bit."""
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import SMALL, read_metrics, run_cli
from cm3leon_jax.demo import pipeline
from cm3leon_jax.train import time_budget


def test_plan_steps_by_hand():
    # 600 s budget, 50 s gone, 10 s to recompile: 540 s left at 0.5 s a step = 1,080 more steps
    assert time_budget.plan_steps(step=110, max_steps=10_000, budget_seconds=600, elapsed_seconds=50,
                                  step_seconds=0.5, overhead_seconds=10) == 1190
    # capped at the configured steps
    assert time_budget.plan_steps(step=110, max_steps=1000, budget_seconds=600, elapsed_seconds=50,
                                  step_seconds=0.5) == 1000
    # out of time: stop where it is
    assert time_budget.plan_steps(step=110, max_steps=1000, budget_seconds=60, elapsed_seconds=90,
                                  step_seconds=0.5) == 110
    # a partial step does not count: 0.9 s left at 0.5 s a step is 1 step
    assert time_budget.plan_steps(step=7, max_steps=100, budget_seconds=10, elapsed_seconds=9.1,
                                  step_seconds=0.5) == 8
    with pytest.raises(ValueError, match="step_seconds"):
        time_budget.plan_steps(step=1, max_steps=2, budget_seconds=1, elapsed_seconds=0, step_seconds=0)
    with pytest.raises(ValueError, match="budget"):
        time_budget.plan_steps(step=1, max_steps=2, budget_seconds=0, elapsed_seconds=0, step_seconds=1)


def test_calibration_times_the_steps_after_the_skipped_ones():
    cal = time_budget.Calibration(start_step=40, skip_steps=2, count=4, now=100.0)
    assert [s for s in range(40, 50) if cal.needs_sync(s)] == [41, 42, 46]
    clock = {41: 130.0, 42: 131.0, 43: 132.0, 44: 133.5, 45: 134.0, 46: 137.0}  # step 41 compiles: 30 s
    got = [cal.tick(s, t) for s, t in clock.items()]
    assert got[:-1] == [None] * 5 and got[-1] == pytest.approx((137.0 - 131.0) / 4)
    assert cal.compile_seconds(1.5) == pytest.approx(28.5)
    with pytest.raises(ValueError, match="calibration"):
        time_budget.Calibration(start_step=0, skip_steps=0, count=4, now=0.0)


def test_plan_round_trip_and_bad_file(tmp_path):
    plan = time_budget.Plan(train_steps=900, max_train_steps=4000, budget_seconds=600.0, step_seconds=0.5,
                            decided_at_step=110, elapsed_seconds=50.0)
    time_budget.write_plan(str(tmp_path), plan)
    assert time_budget.read_plan(str(tmp_path)) == plan
    assert pipeline.planned_train_steps(str(tmp_path)) == 900  # the demo's "finished?" check reads it
    (tmp_path / time_budget.PLAN_FILE).write_text(json.dumps({"train_steps": 3}))
    with pytest.raises(ValueError, match="not a time-budget plan"):
        time_budget.read_plan(str(tmp_path))
    time_budget.remove_plan(str(tmp_path))
    assert time_budget.read_plan(str(tmp_path)) is None


def test_demo_gives_training_what_the_earlier_stages_left(tmp_path):
    c = pipeline.DemoConfig(out_dir=str(tmp_path), time_budget_minutes=30.0, minutes_after_train=5.0)
    stages = tmp_path / "stages"
    stages.mkdir()
    # corpus, VQ-GAN and CLIP run at once (the longest, 9 min, counts), then task data 1 min
    for name, seconds in (("corpus", 90), ("vqgan", 540), ("clip", 480), ("task_data", 60)):
        (stages / f"{name}.json").write_text(json.dumps({"seconds": seconds}))
    assert pipeline.minutes_before_train(c) == pytest.approx(10.0)
    assert pipeline.train_budget_minutes(c) == pytest.approx(15.0)
    c.time_budget_minutes = 12.0  # less than nothing left: one minute
    assert pipeline.train_budget_minutes(c) == 1.0
    c.time_budget_minutes = None
    assert pipeline.train_budget_minutes(c) is None


def _params(model_dir, step):
    restored = ocp.StandardCheckpointer().restore(str(model_dir / "checkpoints" / str(step) / "state"))
    return jax.tree.leaves(jax.tree.map(np.asarray, restored["params"]))


@pytest.mark.slow
def test_a_run_out_of_time_stops_at_its_decision_and_a_resume_keeps_it(tmp_path):
    # 0.6 s cannot even cover the compile: the run stops at the decision step (2 skipped + 3 timed)
    args = ["train", *SMALL, "--gin.TRAIN_STEPS=100000", "--gin.train.checkpoint_every=100000",
            "--gin.train.budget_skip_steps=2", "--gin.train.budget_calibration_steps=3",
            f"--model_dir={tmp_path}"]
    proc = run_cli(args + ["--gin.train.time_budget_minutes=0.01"])
    assert "training 5 steps (at most 100000)" in proc.stderr, proc.stderr[-2000:]
    plan = time_budget.read_plan(str(tmp_path))
    assert (plan.train_steps, plan.max_train_steps, plan.decided_at_step) == (5, 100000, 5)
    assert plan.step_seconds > 0 and plan.budget_seconds == pytest.approx(0.6)
    assert max(r["step"] for r in read_metrics(tmp_path)) == 5
    assert (tmp_path / "checkpoints" / "5").exists()
    # run again with a large budget: the decision stands, nothing more is trained
    proc = run_cli(args + ["--gin.train.time_budget_minutes=1000"])
    assert "resumed from step 5" in proc.stderr and "planned 5 steps" in proc.stderr, proc.stderr[-2000:]
    assert max(r["step"] for r in read_metrics(tmp_path)) == 5


@pytest.mark.slow
def test_a_budget_larger_than_the_run_changes_nothing(tmp_path):
    common = ["train", *SMALL, "--gin.TRAIN_STEPS=12", "--gin.train.checkpoint_every=12"]
    run_cli(common + [f"--model_dir={tmp_path / 'plain'}"])
    run_cli(common + ["--gin.train.time_budget_minutes=100", "--gin.train.budget_skip_steps=2",
                      "--gin.train.budget_calibration_steps=3", f"--model_dir={tmp_path / 'budget'}"])
    assert time_budget.read_plan(str(tmp_path / "budget")).train_steps == 12
    for a, b in zip(_params(tmp_path / "plain", 12), _params(tmp_path / "budget", 12)):
        assert np.array_equal(a, b)
