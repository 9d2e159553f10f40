"""`cm3leon demo`: the embedded end-to-end run, stage by stage.

The demo is only wiring: every stage runs the project's own commands with
the settings `gin/demo.gin` gives (`demo.*` bindings), in this order:

  1. corpus     the shapes corpus as an image folder (images + captions.jsonl),
                and a held-out set from another seed (real images for FID)
  2. vqgan      `cm3leon tokenizer train-image`   (the image tokenizer)
  3. clip       `cm3leon clip train`              (the retriever and the BPE)
  4. task_data  `cm3leon task-data` = `prepare` + `embed` + `index build` +
                `index neighbours`                 (demo_out/data)
  5. train      `cm3leon train` on shapes_cm3_retrieval
  6. generate   the ablation settings' samples for the held-out captions
                (the code of `cm3leon generate`, one process for all settings)
  7. evaluate   checker accuracy, CLIP-FID, CLIP score per setting
                (the code of `cm3leon eval shapes / fid / clip_score`)
  8. report     demo_out/report.md, grids and plots (demo/report.py)

Stages 2-5 run as child processes (`python -m cm3leon_jax.cli ...`, demo/child_process.py); their
output goes to the terminal (prefixed with the stage's name while stages 1-3
run at once) and to demo_out/logs/STAGE.log. A child gets SIGTERM if the
demo dies, so no trainer outlives it. A finished stage
writes `demo_out/stages/NAME.json`; a rerun skips finished stages and
reruns the interrupted one, whose command resumes by itself (the trainers
from their latest checkpoint, task-data per finished shard and stage,
generation per finished setting). Delete a stage's JSON file to redo it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import gin

from cm3leon_jax import gin_utils
from cm3leon_jax.demo.child_process import Command, cli_command
from cm3leon_jax.demo.stages import GROUPS, STAGE_DIR, STAGE_TITLES, STAGES
from cm3leon_jax.demo.train_budget import minutes_before_train, train_budget_minutes  # noqa: F401


# Decodings that take the argmax at every step: the same image for every seed.
DETERMINISTIC_DECODINGS = ("cd_k", "greedy")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One decoding setting of the ablations: a `cm3leon generate` call."""
    name: str
    decoding: str
    cfg_scale: float
    num_retrieved: int
    num_samples: int

    def generate_flags(self) -> List[str]:
        return [f"--decoding={self.decoding}", f"--cfg_scale={self.cfg_scale:g}",
                f"--num_retrieved={self.num_retrieved}", f"--num_samples={self.num_samples}"]


def ablation_settings(retrieved: Sequence[int], cfg_scales: Sequence[float], decodings: Sequence[str],
                      rerank_samples: int, base_decoding: str, base_cfg: float, base_retrieved: int) -> Dict:
    """The ablation families around one base setting: (a) retrieved
    documents and (b) CFG scale, one sample per caption; (c) decoding and
    (d) CLIP reranking share one run per decoding with `rerank_samples`
    samples per caption ((c) compares their mean and best-of-N accuracy, (d)
    sample 0, exactly what one sample per caption gives, against the best of
    N). A deterministic decoding (CD-K, greedy: the argmax at every step)
    draws one image per caption, since its N would be N copies of it.
    Returns {"settings": [Setting] (unique), "tables": {family: [name]}}."""
    def one(decoding, cfg, k, n):
        return Setting(f"{decoding}_cfg{cfg:g}_r{k}_n{n}", decoding, float(cfg), int(k), int(n))

    reranked = [one(d, base_cfg, base_retrieved, 1 if d in DETERMINISTIC_DECODINGS else rerank_samples)
                for d in decodings]
    tables = {
        "retrieval": [one(base_decoding, base_cfg, k, 1) for k in retrieved],
        "cfg": [one(base_decoding, c, base_retrieved, 1) for c in cfg_scales],
        "decoding": reranked,
        "rerank": reranked,
    }
    settings: Dict[str, Setting] = {}
    for rows in tables.values():
        for s in rows:
            settings.setdefault(s.name, s)
    return {"settings": list(settings.values()), "tables": {k: [s.name for s in v] for k, v in tables.items()}}


def _fmt_seconds(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s"


@gin.configurable("demo")
@dataclasses.dataclass
class DemoConfig:
    """Everything `gin/demo.gin` sets; see that file for the choices."""
    out_dir: str = "demo_out"
    corpus_docs: int = 20000
    corpus_seed: int = 0
    corpus_shape_weights: Optional[Sequence[float]] = None
    heldout_captions: int = 200
    heldout_seed: int = 777
    vqgan_gin: str = "gin/vqgan_shapes.gin"
    vqgan_bindings: Sequence[str] = ()
    clip_gin: str = "gin/clip_shapes.gin"
    clip_bindings: Sequence[str] = ()
    task_data_flags: Sequence[str] = ()
    train_gin: str = "gin/cm3leon_tiny.gin"
    train_bindings: Sequence[str] = ()
    # Environment variables for the `cm3leon train` child only (e.g. glibc
    # malloc settings, which must be set at process start); see gin/demo.gin.
    train_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    time_budget_minutes: Optional[float] = None
    minutes_after_train: float = 5.0
    retrieved: Sequence[int] = (0, 1, 2)
    cfg_scales: Sequence[float] = (1.0, 3.0, 5.0, 7.0)
    decodings: Sequence[str] = ("top_p", "cd_k", "mixed")
    rerank_samples: int = 8
    base_decoding: str = "top_p"
    base_cfg: float = 3.0
    base_retrieved: int = 2
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    batch_rows: int = 64
    grid_prompts: int = 8
    progress: bool = True

    def path(self, *parts: str) -> str:
        return os.path.abspath(os.path.join(self.out_dir, *parts))

    @property
    def ablations(self) -> Dict:
        return ablation_settings(self.retrieved, self.cfg_scales, self.decodings, self.rerank_samples,
                                 self.base_decoding, self.base_cfg, self.base_retrieved)


# ---- stages ---------------------------------------------------------------------------------------


def stage_corpus(c: DemoConfig) -> dict:
    """Writes the training corpus and the held-out set as image folders
    (00000.png ... + captions.jsonl). Held-out pairs come from another seed,
    so none is in the training data or the memory bank. With
    `demo.corpus_shape_weights` the training corpus is its stream thinned by
    the number of shapes (`shapes_corpus.kept_indices`); the held-out set never is."""
    from cm3leon_jax.data import shapes_corpus

    out = {}
    for name, seed, num in (("corpus", c.corpus_seed, c.corpus_docs), ("heldout", c.heldout_seed,
                                                                         c.heldout_captions)):
        weights = c.corpus_shape_weights if name == "corpus" else None
        shapes_corpus.write_corpus(c.path(name), seed, num, progress=c.progress, desc=name,
                                   shape_count_weights=weights)
        out[name] = {"dir": c.path(name), "seed": seed, "documents": num}
        if weights is not None:
            out[name]["shape_count_weights"] = [float(w) for w in weights]
    with open(os.path.join(c.path("corpus"), "captions.jsonl")) as f:
        seen = {json.loads(line)["caption"] for line in f}
    with open(os.path.join(c.path("heldout"), "captions.jsonl")) as f:
        held = [json.loads(line)["caption"] for line in f]
    with open(c.path("heldout", "prompts.txt"), "w") as f:  # for `cm3leon generate --prompts_file`
        f.write("\n".join(held) + "\n")
    out["heldout"]["captions_also_in_corpus"] = sum(h in seen for h in held)
    return out


def command_vqgan(c: DemoConfig) -> List[str]:
    return cli_command("tokenizer", "train-image", f"--gin_file={c.vqgan_gin}", f"--model_dir={c.path('vqgan')}",
                *[f"--gin.{b}" for b in c.vqgan_bindings])


def result_vqgan(c: DemoConfig) -> dict:
    with open(c.path("vqgan", "eval.json")) as f:
        return json.load(f)


def command_clip(c: DemoConfig) -> List[str]:
    return cli_command("clip", "train", f"--gin_file={c.clip_gin}", f"--model_dir={c.path('clip')}",
                *[f"--gin.{b}" for b in c.clip_bindings])


def result_clip(c: DemoConfig) -> dict:
    with open(c.path("clip", "eval.json")) as f:
        return json.load(f)


def command_task_data(c: DemoConfig) -> List[str]:
    return cli_command("task-data", f"--source=image_folder:{c.path('corpus')}", f"--out={c.path('data')}",
                f"--vqgan_dir={c.path('vqgan')}", f"--text_tokenizer={c.path('clip', 'text_tokenizer')}",
                f"--clip_dir={c.path('clip')}", *list(c.task_data_flags),
                *(["--no_progress"] if not c.progress else []))


def result_task_data(c: DemoConfig) -> dict:
    with open(c.path("data", "prepared", "prepared.json")) as f:
        man = json.load(f)
    return {"documents": man["count"], "skipped": man.get("skipped", {}), "data_dir": c.path("data")}


def command_train(c: DemoConfig) -> List[str]:
    """`cm3leon train` on the task data; the unified vocabulary's text block
    is sized to the BPE the data was prepared with (the CLIP's). With a demo
    time budget, the trainer gets what is left of it
    (`train.time_budget_minutes`; TRAIN_STEPS is then the most steps)."""
    with open(c.path("data", "prepared", "prepared.json")) as f:
        text_vocab = json.load(f)["settings"]["vocabulary"]["text_vocab_size"]
    budget = train_budget_minutes(c)
    return cli_command("train", f"--gin_file={c.train_gin}", f"--model_dir={c.path('model')}",
                f"--gin.shapes_data_dir.path={c.path('data')!r}",
                f"--gin.UnifiedVocabulary.text_vocab_size={int(text_vocab)}",
                *[f"--gin.{b}" for b in c.train_bindings],
                *([f"--gin.train.time_budget_minutes={budget:.2f}"] if budget is not None else []))


def stage_env(c: DemoConfig, name: str) -> Dict[str, str]:
    """The environment variables a command stage's child gets beyond the
    demo's own: `demo.train_env` for the decoder's training, none for the
    others."""
    if name != "train":
        return {}
    env = dict(c.train_env or {})
    for k, v in env.items():
        if not (isinstance(k, str) and k.isidentifier() and isinstance(v, (str, int))):
            raise ValueError(f"demo.train_env must map variable names to strings, got {k!r}: {v!r}")
    return {k: str(v) for k, v in env.items()}


def planned_train_steps(model_dir: str) -> Optional[int]:
    """The step `cm3leon train` stops at: its time budget's decision
    (time_budget.json) when it made one, else from the config.gin it wrote
    (`train.train_steps`, usually through `TRAIN_STEPS`); None when not found."""
    from cm3leon_jax.train import time_budget

    plan = time_budget.read_plan(model_dir)
    if plan is not None:
        return plan.train_steps
    try:
        bindings = gin_utils.read_written_bindings(os.path.join(model_dir, "config.gin"))
    except OSError:
        return None
    steps = gin_utils.written_value(bindings, "train.train_steps")
    if steps is None:
        steps = gin_utils.written_value(bindings, "TRAIN_STEPS")
    return steps if isinstance(steps, int) else None


def result_train(c: DemoConfig) -> dict:
    """The finished training's steps and last loss. A trainer that exits 0
    before its last step (SIGTERM: it saves a checkpoint and stops, as on a
    preempted pod) has not finished the stage: RuntimeError, no stage
    marker, so a rerun resumes the training instead of sampling a half-trained
    model."""
    from cm3leon_jax.demo import report

    from cm3leon_jax.train import time_budget

    curve = report.read_loss_curve(c.path("model"))
    steps = curve[-1][0] if curve else 0
    plan = time_budget.read_plan(c.path("model"))
    planned = plan.train_steps if plan is not None else planned_train_steps(c.path("model"))
    if planned is not None and steps < planned:
        raise RuntimeError(f"stage train: `cm3leon train` stopped at step {steps} of {planned} (interrupted); "
                           "rerun the same `cm3leon demo` command to resume it from its last checkpoint")
    out = {"model_dir": c.path("model"), "steps": steps, "final_loss": curve[-1][1] if curve else None}
    if plan is not None:
        out["time_budget"] = {"minutes": round(plan.budget_seconds / 60.0, 2), "step_seconds": plan.step_seconds,
                              "max_train_steps": plan.max_train_steps}
    return out


def heldout_prompts(c: DemoConfig) -> List[str]:
    with open(c.path("heldout", "prompts.txt")) as f:
        return [line.strip() for line in f if line.strip()]


def stage_generate(c: DemoConfig) -> dict:
    """Every ablation setting's samples for every held-out caption, in
    demo_out/samples/NAME/ (the layout of `cm3leon generate --out`). A
    setting whose samples.json exists and was drawn with this very
    checkpoint (`generate.checkpoint_identity`) is kept (resumable per
    setting); one drawn with another is drawn again."""
    import gin as gin_lib

    from cm3leon_jax.sampling import generate as gen_lib
    from cm3leon_jax.sampling.sampler import SamplingSettings

    prompts = heldout_prompts(c)
    bundle = gen_lib.load_model(c.path("model"))
    gin_lib.clear_config()  # load_model parsed the model's config.gin; the demo's own is no longer needed
    g = gen_lib.Generator(bundle)
    done = {}
    todo = c.ablations["settings"]
    current = gen_lib.checkpoint_identity(bundle.model_dir, bundle.step)
    for k, s in enumerate(todo):
        out = c.path("samples", s.name)
        if os.path.isfile(os.path.join(out, "samples.json")):
            with open(os.path.join(out, "samples.json")) as f:
                drawn_with = json.load(f).get("checkpoint")
            if drawn_with == current:
                print(f"  [{k + 1}/{len(todo)}] {s.name}: done earlier", flush=True)
                done[s.name] = out
                continue
            print(f"  [{k + 1}/{len(todo)}] {s.name}: samples of another checkpoint "
                  f"({(drawn_with or {}).get('path', 'unrecorded')}); drawing them again with "
                  f"{current['path']}", flush=True)
        t = time.time()
        settings = SamplingSettings(s.decoding, temperature=c.temperature, top_p=c.top_p, cfg_scale=s.cfg_scale)
        gen_lib.write_samples(g, prompts, out + ".partial", settings, num_samples=s.num_samples, seed=c.seed,
                              num_retrieved=s.num_retrieved, batch_rows=c.batch_rows)
        if os.path.isdir(out):
            import shutil

            shutil.rmtree(out)
        os.replace(out + ".partial", out)
        _check_samples_dir(out)
        done[s.name] = out
        print(f"  [{k + 1}/{len(todo)}] {s.name}: {len(prompts) * s.num_samples} images in "
              f"{_fmt_seconds(time.time() - t)}", flush=True)
    return {"prompts": len(prompts), "settings": done, "model_step": bundle.step}


def _check_samples_dir(out: str) -> None:
    """Every file samples.json lists (relative names: the rename keeps them) is there."""
    with open(os.path.join(out, "samples.json")) as f:
        rows = json.load(f)["prompts"]
    missing = [s["file"] for r in rows for s in r["samples"] if not os.path.isfile(os.path.join(out, s["file"]))]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} sample files missing after generation (e.g. {missing[0]})")


def stage_evaluate(c: DemoConfig) -> dict:
    """Per setting: shapes-checker accuracy (with its breakdown by fact and
    by number of shapes), CLIP-FID against the held-out real images (all
    samples, and the top-ranked one per caption), CLIP score. Writes
    demo_out/samples/NAME/eval.json, and the tokenizer's ceiling (the
    checker on the VQ-GAN reconstructions of the held-out images) to
    demo_out/samples/tokenizer_ceiling.json."""
    from cm3leon_jax.eval import fid, samples, shapes_breakdown

    ceiling = shapes_breakdown.tokenizer_ceiling(c.path("vqgan"), c.path("heldout"))
    with open(c.path("samples", "tokenizer_ceiling.json"), "w") as f:
        json.dump(ceiling, f, indent=1)
    print(f"  tokenizer ceiling (VQ-GAN reconstructions of the held-out images): accuracy "
          f"{ceiling['accuracy']:.3f}", flush=True)
    extractor = fid.ClipFeatures(c.path("clip"))
    real = fid.feature_statistics(fid.directory_features(c.path("heldout"), extractor, progress=False)[0])
    results = {}
    for s in c.ablations["settings"]:
        out = c.path("samples", s.name)
        r = {"setting": dataclasses.asdict(s), "shapes": samples.shapes_accuracy(out),
             "clip_score": samples.clip_score(out, c.path("clip"), encoder=extractor.encoder)}
        for which in ("all", "top_ranked", "first_sample"):
            feats, _ = fid.directory_features(out, extractor, progress=False,
                                              files=samples.sample_files(out, which=which))
            r[f"clip_fid_{which}"] = fid.frechet_distance(*real, *fid.feature_statistics(feats))
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(r, f, indent=1)
        results[s.name] = r
        print(f"  {s.name}: accuracy {r['shapes']['accuracy']:.3f} (best of {s.num_samples}: "
              f"{r['shapes']['top_ranked_accuracy']:.3f}), CLIP-FID {r['clip_fid_top_ranked']:.4f}",
              flush=True)
    return {"settings": sorted(results), "tokenizer_ceiling": ceiling["accuracy"]}


def stage_report(c: DemoConfig) -> dict:
    from cm3leon_jax.demo import report

    return report.write_report(c)


# Stages that run as a `cm3leon` child process: (command, result reader).
COMMAND_STAGES = {"vqgan": (command_vqgan, result_vqgan), "clip": (command_clip, result_clip),
                  "task_data": (command_task_data, result_task_data), "train": (command_train, result_train)}
# Stages that run in the demo's own process.
PROCESS_STAGES: Dict[str, Callable[[DemoConfig], dict]] = {
    "corpus": stage_corpus, "generate": stage_generate, "evaluate": stage_evaluate, "report": stage_report}


def _head(name: str) -> str:
    return f"[{STAGES.index(name) + 1}/{len(STAGES)}] {STAGE_TITLES[name]}"


def run(c: DemoConfig, only: Sequence[str] = (), redo: Sequence[str] = ()) -> dict:
    """Runs the stages not yet finished (or `only` these), in order; the
    stages of a group at the same time."""
    for name in list(only) + list(redo):
        if name not in STAGES:
            raise ValueError(f"unknown demo stage {name!r}; the stages are {', '.join(STAGES)}")
    os.makedirs(c.path(STAGE_DIR), exist_ok=True)
    for name in redo:
        if os.path.exists(c.path(STAGE_DIR, f"{name}.json")):
            os.remove(c.path(STAGE_DIR, f"{name}.json"))
    start, results = time.time(), {}

    def marker(name):
        return c.path(STAGE_DIR, f"{name}.json")

    def finish(name, t0, result):
        result = dict(result, seconds=round(time.time() - t0, 1))
        with open(marker(name) + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(marker(name) + ".tmp", marker(name))
        results[name] = result
        print(f"{_head(name)}: done in {_fmt_seconds(result['seconds'])} (total "
              f"{_fmt_seconds(time.time() - start)})", flush=True)

    for group in GROUPS:
        pending = []
        for name in group:
            if only and name not in only:
                continue
            if os.path.isfile(marker(name)) and name not in only:
                with open(marker(name)) as f:
                    results[name] = json.load(f)
                print(f"{_head(name)}: finished earlier ({results[name].get('seconds', 0):.0f} s), kept "
                      f"(delete {os.path.relpath(marker(name))} to redo it)", flush=True)
            else:
                pending.append(name)
        running = []
        try:
            for name in pending:
                if name in COMMAND_STAGES:
                    print(f"{_head(name)} ...", flush=True)
                    running.append((name, time.time(), Command(name, COMMAND_STAGES[name][0](c),
                                                               c.path("logs"), prefix=len(pending) > 1,
                                                               env=stage_env(c, name))))
            for name in pending:
                if name in PROCESS_STAGES:
                    print(f"{_head(name)} ...", flush=True)
                    t0 = time.time()
                    finish(name, t0, PROCESS_STAGES[name](c))
            failure = None
            for name, t0, cmd in running:
                try:
                    cmd.wait()
                    finish(name, t0, COMMAND_STAGES[name][1](c))
                except RuntimeError as e:  # let the other stage of the group finish, then stop
                    failure = failure or e
            if failure:
                raise failure
        except BaseException:
            for _, _, cmd in running:
                cmd.kill()
            raise
    return results
