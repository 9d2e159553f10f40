"""`cm3leon demo`: the ablation plan, and a miniature of the whole run that is
killed (SIGKILL, the whole process group) while training and run again: the
finished stages are kept, training resumes from its checkpoint, and the
report, grids and plots are written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cm3leon_jax.demo import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ablation_plan_has_each_family_around_one_base():
    plan = pipeline.ablation_settings(retrieved=(0, 1, 2), cfg_scales=(1, 3, 5, 7), decodings=("top_p", "cd_k",
                                                                                               "mixed"),
                                      rerank_samples=8, base_decoding="top_p", base_cfg=3, base_retrieved=2)
    by_name = {s.name: s for s in plan["settings"]}
    assert len(by_name) == len(plan["settings"])  # unique
    t = plan["tables"]
    assert [by_name[n].num_retrieved for n in t["retrieval"]] == [0, 1, 2]
    assert [by_name[n].cfg_scale for n in t["cfg"]] == [1.0, 3.0, 5.0, 7.0]
    assert [by_name[n].decoding for n in t["decoding"]] == ["top_p", "cd_k", "mixed"]
    assert all(by_name[n].cfg_scale == 3 for n in t["decoding"])
    # CD-K takes the argmax at every step: its 8 samples would be one image 8 times
    assert [by_name[n].num_samples for n in t["decoding"]] == [8, 1, 8]
    assert t["rerank"] == t["decoding"]  # (d) reads sample 0 and the best of 8 of (c)'s runs
    # the base setting is one run shared by (a) and (b)
    base = "top_p_cfg3_r2_n1"
    assert base in t["retrieval"] and base in t["cfg"]
    # 3 retrieval + 3 more CFG scales + 3 reranked decodings
    assert len(by_name) == 3 + 3 + 3
    assert by_name[base].generate_flags() == ["--decoding=top_p", "--cfg_scale=3", "--num_retrieved=2",
                                              "--num_samples=1"]


def test_an_interrupted_training_is_not_a_finished_stage(tmp_path):
    """`cm3leon train` exits 0 after a SIGTERM (checkpoint saved, as on a
    preempted pod). The demo once took that for a finished training, wrote
    the stage marker and sampled the half-trained model; a rerun then never
    resumed it."""
    c = pipeline.DemoConfig(out_dir=str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.gin").write_text("TRAIN_STEPS = 100\ntrain.train_steps = %TRAIN_STEPS\n")
    rows = [{"step": s, "loss": 2.0 - s / 100} for s in range(10, 50, 10)]
    (model / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RuntimeError, match="stopped at step 40 of 100"):
        pipeline.result_train(c)
    rows += [{"step": s, "loss": 1.0} for s in range(50, 110, 10)]
    (model / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pipeline.result_train(c) == {"model_dir": str(model), "steps": 100, "final_loss": 1.0}


def test_the_training_stage_gets_its_environment_and_shows_it(tmp_path):
    """`demo.train_env` reaches the `cm3leon train` child only, and its log
    shows the command as a user would retype it."""
    from cm3leon_jax.demo.child_process import Command

    c = pipeline.DemoConfig(out_dir=str(tmp_path), train_env={"MALLOC_ARENA_MAX": "1"})
    assert pipeline.stage_env(c, "train") == {"MALLOC_ARENA_MAX": "1"}
    assert pipeline.stage_env(c, "vqgan") == {} and pipeline.stage_env(c, "clip") == {}
    probe = [sys.executable, "-c", "import os; print('arena', os.environ.get('MALLOC_ARENA_MAX'))"]
    for stage in ("train", "clip"):
        Command(stage, probe, str(tmp_path / "logs"), prefix=False, env=pipeline.stage_env(c, stage)).wait()
    train_log = (tmp_path / "logs" / "train.log").read_text().splitlines()
    assert train_log[0].startswith("$ MALLOC_ARENA_MAX=1 ") and train_log[1] == "arena 1"
    clip_log = (tmp_path / "logs" / "clip.log").read_text().splitlines()
    assert clip_log[0].startswith(f"$ {sys.executable}") and clip_log[1] == f"arena {os.environ.get('MALLOC_ARENA_MAX')}"
    with pytest.raises(ValueError, match="demo.train_env must map variable names"):
        pipeline.stage_env(pipeline.DemoConfig(train_env={"NOT A NAME": "1"}), "train")


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo stage 'trian'"):
        pipeline.run(pipeline.DemoConfig(out_dir=str(tmp_path)), only=["trian"])


MINI_GIN = """
include 'gin/demo.gin'
demo.corpus_docs = 240
demo.heldout_captions = 4
demo.vqgan_bindings = ['train_vqgan.train_steps = 4', 'train_vqgan.checkpoint_every = 2',
                       'train_vqgan.eval_images = 8', 'train_vqgan.warmup_steps = 2']
demo.clip_bindings = ['train_clip.train_steps = 2', 'train_clip.checkpoint_every = 1', 'train_clip.batch_size = 16',
                      'train_clip.train_examples = 256', 'train_clip.eval_pool = 32', 'train_clip.eval_queries = 8',
                      'train_clip.warmup_steps = 2']
demo.task_data_flags = ['--records_per_shard=100', '--k=8']
demo.train_bindings = ['TRAIN_STEPS = 25', 'train.checkpoint_every = 5', 'train.log_every = 5',
                       'BATCH_SIZE = 2', 'WARMUP_STEPS = 2']
demo.retrieved = [0, 2]
demo.cfg_scales = [1.0, 3.0]
demo.decodings = ['top_p', 'cd_k']
demo.rerank_samples = 2
demo.batch_rows = 8
demo.grid_prompts = 2
"""


def _demo(out_dir: str, gin_file: str, log, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "cm3leon_jax.cli", "demo", f"--gin_file={gin_file}",
                             f"--out_dir={out_dir}", "--no_progress"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, **kw)


def _checkpoint_steps(model_dir: str):
    d = os.path.join(model_dir, "checkpoints")
    return sorted(int(p) for p in os.listdir(d) if p.isdigit()) if os.path.isdir(d) else []


@pytest.mark.slow
def test_mini_demo_killed_in_training_resumes_and_writes_the_report(tmp_path):
    gin_file = tmp_path / "mini.gin"
    gin_file.write_text(MINI_GIN)
    out = tmp_path / "out"
    model_dir = out / "model"
    log1 = open(tmp_path / "run1.log", "w")
    proc = _demo(str(out), str(gin_file), log1, start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = _checkpoint_steps(str(model_dir))
            if steps and steps[-1] >= 10:  # training is under way with a committed checkpoint
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the demo ended before training was checkpointed:\n" + \
            (tmp_path / "run1.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the demo and its trainer, no warning
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
    first = (tmp_path / "run1.log").read_text()
    finished_before = {s for s in pipeline.STAGES if (out / "stages" / f"{s}.json").exists()}
    assert finished_before == {"corpus", "vqgan", "clip", "task_data"}, first[-3000:]
    corpus_mtime = os.path.getmtime(out / "corpus" / "captions.jsonl")
    killed_at = _checkpoint_steps(str(model_dir))[-1]

    with open(tmp_path / "run2.log", "w") as log2:
        rc = _demo(str(out), str(gin_file), log2).wait(timeout=900)
    second = (tmp_path / "run2.log").read_text()
    assert rc == 0, second[-4000:]
    for stage in ("shapes corpus", "VQ-GAN image tokenizer", "CLIP retriever", "prepare + embed + index"):
        assert f"{stage}: finished earlier" in second, second[:3000]
    assert os.path.getmtime(out / "corpus" / "captions.jsonl") == corpus_mtime  # not rewritten
    assert "resumed from step" in second
    # gin/demo.gin's allocator settings reach the trainer, shown in its log
    train_cmd = (out / "logs" / "train.log").read_text().splitlines()[0]
    assert train_cmd.startswith("$ MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 "
                                "cm3leon train "), train_cmd
    resumed = int(second.split("resumed from step")[1].split()[0])
    assert 5 <= resumed <= killed_at
    assert _checkpoint_steps(str(model_dir))[-1] == 25

    for name in ("report.md", "grid_settings.png", "grid_rerank.png", "loss_curve.png", "accuracy_vs_cfg.png",
                 "results.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results["tables"]) == {"retrieval", "cfg", "decoding", "rerank"}
    for name, e in results["evals"].items():
        n = e["setting"]["num_samples"]
        assert e["shapes"]["num_samples"] == 4 * n and e["shapes"]["num_prompts"] == 4
        assert 0.0 <= e["shapes"]["accuracy"] <= 1.0
        assert e["clip_fid_all"] >= 0.0
        assert f"| {name}" not in report  # rows carry labels, not internal names
    assert "(a) Retrieved documents" in report and "(d) CLIP reranking: 1 vs 2" in report
    for e in results["evals"].values():
        assert e["clip_fid_first_sample"] >= 0.0 and e["clip_fid_top_ranked"] >= 0.0
    assert "cm3leon generate --model_dir=" in report
    # the report's reproduce command gives the same samples as the demo's in-process generation
    json_line = json.loads(second.strip().splitlines()[-1])
    assert json_line["report"] == str(out / "report.md")

    # a setting drawn with another checkpoint (say, the model dir was
    # retrained or relinked) is drawn again; the others are kept
    names = sorted(results["evals"])
    stale = out / "samples" / names[0] / "samples.json"
    rows = json.loads(stale.read_text())
    rows["checkpoint"] = dict(rows["checkpoint"], path="/elsewhere/checkpoints/25")
    stale.write_text(json.dumps(rows))
    with open(tmp_path / "run3.log", "w") as log3:
        rc = subprocess.run([sys.executable, "-m", "cm3leon_jax.cli", "demo", f"--gin_file={gin_file}",
                             f"--out_dir={out}", "--no_progress", "--only", "generate"], cwd=REPO,
                            stdout=log3, stderr=subprocess.STDOUT, timeout=600).returncode
    third = (tmp_path / "run3.log").read_text()
    assert rc == 0, third[-3000:]
    assert f"{names[0]}: samples of another checkpoint (/elsewhere/checkpoints/25)" in third, third[-3000:]
    assert all(f"{n}: done earlier" in third for n in names[1:]), third[-3000:]
    assert json.loads(stale.read_text())["checkpoint"]["path"] == os.path.realpath(model_dir / "checkpoints" / "25")


def test_checkpoint_identity_follows_links_and_retraining(tmp_path):
    from cm3leon_jax.sampling.generate import checkpoint_identity

    real = tmp_path / "runs" / "a" / "model"
    (real / "checkpoints" / "9").mkdir(parents=True)
    other = tmp_path / "runs" / "b" / "model"
    (other / "checkpoints" / "9").mkdir(parents=True)
    link = tmp_path / "model"
    link.symlink_to(real)
    first = checkpoint_identity(str(link), 9)
    assert first["path"] == os.path.realpath(real / "checkpoints" / "9") and first["step"] == 9
    assert checkpoint_identity(str(real), 9) == first
    link.unlink()
    link.symlink_to(other)  # relinked to another run's model: the same path and step, another checkpoint
    assert checkpoint_identity(str(link), 9) != first
    os.rmdir(real / "checkpoints" / "9")
    time.sleep(0.01)
    (real / "checkpoints" / "9").mkdir()  # retrained into the same dir
    again = checkpoint_identity(str(real), 9)
    assert again["path"] == first["path"] and again["written_ns"] != first["written_ns"]
