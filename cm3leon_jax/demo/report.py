"""The demo's report: demo_out/report.md with its tables, PNG grids and plots.

Everything is read back from what the stages wrote (stage JSON files, the
model dir's metrics.jsonl, each setting's samples.json and eval.json), so
`cm3leon demo --only=report` rewrites it without running anything else.
"""
from __future__ import annotations

import json
import os
import platform
import textwrap
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

FAMILY_TITLES = {
    "retrieval": "(a) Retrieved documents",
    "cfg": "(b) Classifier-free guidance scale",
    "decoding": "(c) Decoding: top-p vs CD-K vs mixed",
    "rerank": "(d) CLIP reranking: 1 vs {n} samples per caption",
}


def read_loss_curve(model_dir: str) -> List[Tuple[int, float]]:
    """(step, loss) from a `cm3leon train` model dir's metrics.jsonl."""
    path = os.path.join(model_dir, "metrics.jsonl")
    curve = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if "loss" in row and "step" in row:
                    curve[int(row["step"])] = float(row["loss"])  # a resumed run rewrites steps: keep the last
    return sorted(curve.items())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(curve, path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in curve], [v for _, v in curve])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / token)")
    ax.set_title("tiny CM3Leon on shapes_cm3_retrieval")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cfg(scales: Sequence[float], acc: Sequence[float], facts: Sequence[float], path: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(scales, acc, "o-", label="all facts hold (accuracy)")
    ax.plot(scales, facts, "s--", label="share of facts that hold")
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("shapes checker")
    ax.set_ylim(0, 1)
    ax.set_xticks(list(scales))
    ax.set_title("checker accuracy vs CFG scale")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def plot_grid(rows: List[dict], columns: List[str], path: str, title: str) -> None:
    """rows: {"prompt", "images": {column: uint8 image or None}}."""
    plt = _plt()
    n, m = len(rows), len(columns)
    fig, axes = plt.subplots(n, m, figsize=(1.35 * m + 2.6, 1.45 * n + 0.6), squeeze=False)
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            ax = axes[i, j]
            img = row["images"].get(col)
            if img is not None:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=7)
            if j == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(row["prompt"], 26)), fontsize=6, rotation=0, ha="right",
                              va="center", labelpad=4)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _load_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _samples_of(c, name: str) -> List[dict]:
    return _load_json(c.path("samples", name, "samples.json"))["prompts"]


def _retrieved_images(c, report_rows, k: int) -> Dict[int, np.ndarray]:
    """Retrieved documents' images (the VQ-GAN reconstruction stored in the
    prepared dataset) for the grid's prompts."""
    from cm3leon_jax.data.prepared import PreparedDataset

    ids = {d["id"] for r in report_rows for d in r["retrieved"][:k]}
    if not ids:
        return {}
    ds = PreparedDataset(c.path("data", "prepared"), decode_images=True)
    return {i: ds.by_id(i)["image"] for i in sorted(ids)}


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def generate_command(c, s, keep: Optional[int] = None) -> str:
    out = os.path.relpath(c.path("samples", s.name))
    flags = " ".join(s.generate_flags())
    keep_flag = f" --keep={keep}" if keep else ""
    return (f"cm3leon generate --model_dir={os.path.relpath(c.path('model'))} "
            f"--prompts_file={os.path.relpath(c.path('heldout', 'prompts.txt'))} {flags}{keep_flag} "
            f"--top_p={c.top_p:g} --temperature={c.temperature:g} --seed={c.seed} --batch_rows={c.batch_rows} "
            f"--out={out}{'_keep' + str(keep) if keep else ''}")


def write_report(c) -> dict:
    from cm3leon_jax.demo.stages import GROUPS, STAGE_DIR, STAGE_TITLES, STAGES

    out = c.path()
    ab = c.ablations
    settings = {s.name: s for s in ab["settings"]}
    evals = {name: _load_json(c.path("samples", name, "eval.json")) for name in settings}
    missing = [n for n, e in evals.items() if e is None]
    if missing:
        raise ValueError(f"no eval.json for setting(s) {', '.join(missing)}: run the evaluate stage first")
    stages = {name: _load_json(c.path(STAGE_DIR, f"{name}.json")) or {} for name in STAGES}
    files = {}

    # plots
    curve = read_loss_curve(c.path("model"))
    if curve:
        files["loss"] = "loss_curve.png"
        plot_loss(curve, os.path.join(out, files["loss"]))
    cfg_rows = [settings[n] for n in ab["tables"]["cfg"]]
    files["cfg"] = "accuracy_vs_cfg.png"
    plot_cfg([s.cfg_scale for s in cfg_rows], [evals[s.name]["shapes"]["accuracy"] for s in cfg_rows],
             [evals[s.name]["shapes"]["fraction_of_facts"] for s in cfg_rows], os.path.join(out, files["cfg"]))

    # grids: per decoding setting, and one caption's reranked samples
    k = min(c.grid_prompts, stages["generate"].get("prompts", c.grid_prompts))
    real = sorted(f for f in os.listdir(c.path("heldout")) if f.endswith(".png"))[:k]
    columns = grid_columns(c, ab, settings)
    base = settings[ab["tables"]["cfg"][0]]
    with_retrieval = _samples_of(c, ab["tables"]["decoding"][0])[:k]
    retrieved = _retrieved_images(c, with_retrieval, base.num_retrieved)
    runs = {name: _samples_of(c, name)[:k] for _, name, _ in columns}
    rows = []
    for i in range(k):
        images = {"held-out real": _image(os.path.join(c.path("heldout"), real[i]))}
        for j, d in enumerate(with_retrieval[i]["retrieved"]):
            images[f"retrieved {j + 1}"] = retrieved.get(d["id"])
        for label, name, pick in columns:
            key, want = ("sample", 0) if pick == "first" else ("rank", 0)
            sample = next(x for x in runs[name][i]["samples"] if x[key] == want)
            images[label] = _image(c.path("samples", name, sample["file"]))
        rows.append({"prompt": with_retrieval[i]["prompt"], "images": images})
    names = (["held-out real"] + [f"retrieved {j + 1}" for j in range(base.num_retrieved)]
             + [label for label, _, _ in columns])
    files["grid"] = "grid_settings.png"
    plot_grid(rows, names, os.path.join(out, files["grid"]),
              f"held-out captions: the real image, the {base.num_retrieved} documents retrieved for the caption, "
              "and one sample per setting")
    rerank_name = ab["tables"]["rerank"][-1]
    rr = _samples_of(c, rerank_name)[:k]
    rows = [{"prompt": r["prompt"], "images": {f"rank {x['rank'] + 1}": _image(c.path("samples", rerank_name,
                                                                                        x["file"]))
                                               for x in r["samples"]}} for r in rr]
    files["rerank"] = "grid_rerank.png"
    plot_grid(rows, [f"rank {j + 1}" for j in range(settings[rerank_name].num_samples)],
              os.path.join(out, files["rerank"]), f"{_label(settings[rerank_name])}: samples ordered by CLIP score")

    # tables
    from cm3leon_jax.sampling.sampler import SamplingSettings

    cd_defaults = SamplingSettings()
    n_prompts = stages["generate"].get("prompts")
    lines = [
        "# CM3Leon demo report",
        "",
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `cm3leon demo` "
        f"({platform.machine()}, {os.cpu_count()} CPU cores). Every number below was measured in this run; "
        "rerun `make demo` (or `cm3leon demo --gin_file=gin/demo.gin`) to reproduce it.",
        "",
        "## Stages",
        "",
        "| stage | result | time |",
        "|---|---|---:|",
    ]
    for name in STAGES:
        st = stages.get(name) or {}
        lines.append(f"| {STAGE_TITLES[name]} | {_stage_summary(name, st)} | {_minutes(st.get('seconds'))} |")
    # the stages of a group ran at the same time: the wall time is the slowest of each group
    total = sum(max((stages.get(n) or {}).get("seconds", 0.0) for n in group) for group in GROUPS)
    lines += [f"| **total** (wall; corpus, VQ-GAN and CLIP run at once) | | **{_minutes(total)}** |", ""]
    if "loss" in files:
        lines += [f"![training loss]({files['loss']})", ""]
    lines += [
        f"## Ablations on {n_prompts} held-out captions",
        "",
        f"Held-out captions: stream seed {c.heldout_seed} of the shapes generator (the training corpus is seed "
        f"{c.corpus_seed}), so no held-out image-caption pair is in the training data or the memory bank "
        f"({stages['corpus'].get('heldout', {}).get('captions_also_in_corpus', '?')} of the {n_prompts} captions "
        "also occur, with another image, in the corpus: the grammar is small). Sampling seed "
        f"{c.seed}; sample j of caption i draws from its own key, so a setting's sample 0 is exactly what "
        f"`--num_samples=1` gives. Top-p {c.top_p:g}, temperature {c.temperature:g}; CD-K alpha "
        f"{cd_defaults.cd_alpha:g}, k {cd_defaults.cd_k} (the `generate` defaults).",
        "",
        "- **accuracy**: the shapes checker finds every fact the caption states (kinds, colours, sizes, "
        "positions, relations) in the image; **facts**: the mean share of facts that hold;",
        "- **CLIP-FID**: Fréchet distance of the demo CLIP's image embeddings of the samples to those of the "
        f"{n_prompts} real held-out images (lower is better; on this few images FID is biased upwards: compare "
        "rows, not other papers); **CLIP score**: mean cosine similarity of sample and caption.",
        "",
    ]
    best_name, best_acc = None, -1.0
    for family, names in ab["tables"].items():
        title = FAMILY_TITLES[family].format(n=c.rerank_samples)
        lines += [f"### {title}", ""]
        if family == "decoding":
            lines += ["Each decoding draws N samples per caption: the accuracy of a sample (mean over all N) "
                      "and of the best of the N by CLIP score. CD-K takes the token that maximises "
                      "log p_expert - log p_amateur among the allowed ones (no sampling, as the paper "
                      "describes it), so it draws one image per caption (N = 1), and mixed's sample 1 is that "
                      "image (the others top-p).",
                      "",
                      "| setting | accuracy (mean of N) | facts (mean of N) | best of N by CLIP | CLIP-FID (all) | "
                      "CLIP score (all) |", "|---|---:|---:|---:|---:|---:|"]
        elif family == "rerank":
            lines += ["The same runs: sample 0 alone (what `--num_samples=1` gives) against the best of the N.",
                      "", "| setting | 1 sample: accuracy | best of N: accuracy | 1 sample: CLIP-FID | "
                      "best of N: CLIP-FID | best of N: CLIP score |", "|---|---:|---:|---:|---:|---:|"]
        else:
            lines += ["| setting | accuracy | facts | CLIP-FID | CLIP score |", "|---|---:|---:|---:|---:|"]
        for n in names:
            e, s = evals[n], settings[n]
            sh = e["shapes"]
            if family == "decoding":
                lines.append(f"| {_label(s)} | {_fmt(sh['accuracy'])} | {_fmt(sh['fraction_of_facts'])} | "
                             f"{_fmt(sh['top_ranked_accuracy'])} | {_fmt(e['clip_fid_all'], 4)} | "
                             f"{_fmt(e['clip_score']['clip_score'])} |")
                candidates = [(f"{_label(s)}, best of {s.num_samples} by CLIP" if s.num_samples > 1 else _label(s),
                               sh["top_ranked_accuracy"])]
            elif family == "rerank":
                lines.append(f"| {_label(s)} | {_fmt(sh['first_sample_accuracy'])} | "
                             f"**{_fmt(sh['top_ranked_accuracy'])}** | {_fmt(e['clip_fid_first_sample'], 4)} | "
                             f"{_fmt(e['clip_fid_top_ranked'], 4)} | {_fmt(e['clip_score']['top_ranked_clip_score'])} |")
                candidates = []
            else:
                lines.append(f"| {_label(s)} | {_fmt(sh['accuracy'])} | {_fmt(sh['fraction_of_facts'])} | "
                             f"{_fmt(e['clip_fid_all'], 4)} | {_fmt(e['clip_score']['clip_score'])} |")
                candidates = [(_label(s), sh["accuracy"])]
            for cand, acc in candidates:
                if acc > best_acc:
                    best_name, best_acc = cand, acc
        lines.append("")
        if family == "cfg":
            lines += [f"![checker accuracy vs CFG scale]({files['cfg']})", ""]
    lines += breakdown_table(c, ab, settings, evals)
    unguided = [n for n in ab["tables"]["cfg"] if settings[n].cfg_scale == 1.0]
    summary = {"best_setting": best_name, "best_accuracy": best_acc,
               "tokenizer_ceiling": (_load_json(c.path("samples", "tokenizer_ceiling.json")) or {}).get("accuracy")}
    if unguided:
        u = evals[unguided[0]]["shapes"]["accuracy"]
        summary.update(unguided_top_p=unguided[0], unguided_accuracy=u)
        lines += [f"**Best setting: {best_name}, checker accuracy {best_acc:.3f}**, against "
                  f"{u:.3f} for unguided top-p ({_label(settings[unguided[0]])}).", ""]
    lines += ["## Samples", "", f"![samples per setting]({files['grid']})", "",
              f"![reranked samples]({files['rerank']})", "",
              "## Reproduce one row", "",
              "Each row is `cm3leon generate` on the held-out captions, then `cm3leon eval`; for example the "
              "best-of-N rows (`--keep=1` writes only the top-ranked sample):", "", "```"]
    for n in (ab["tables"]["cfg"][0], ab["tables"]["rerank"][-1]):
        s = settings[n]
        keep = 1 if s.num_samples > 1 else None
        d = os.path.relpath(c.path("samples", n)) + (f"_keep{keep}" if keep else "")
        lines += [generate_command(c, s, keep), f"cm3leon eval shapes --samples={d}",
                  f"cm3leon eval fid --real={os.path.relpath(c.path('heldout'))} --fake={d} --features=clip "
                  f"--clip_dir={os.path.relpath(c.path('clip'))}",
                  f"cm3leon eval clip_score --samples={d} --clip_dir={os.path.relpath(c.path('clip'))}", ""]
    lines[-1:] = ["```", ""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"summary": summary, "tables": ab["tables"], "evals": evals}, f, indent=1)
    return {"report": path, "files": sorted(files.values()), **summary}


FACT_COLUMNS = ("kind", "color", "size", "position", "relation", "count")


def breakdown_table(c, ab, settings, evals) -> List[str]:
    """Markdown: per kind of fact and per number of shapes, for each
    setting's sample 0 and each reranked setting's best of N, with the
    tokenizer's ceiling (VQ-GAN reconstructions of the real images) first."""
    rows = []
    ceiling = _load_json(c.path("samples", "tokenizer_ceiling.json"))
    if ceiling:
        rows.append(("**tokenizer ceiling** (reconstructions of the real images)", ceiling))
    for name in dict.fromkeys(n for names in ab["tables"].values() for n in names):
        sh = evals[name]["shapes"]
        if "first_sample" not in sh:  # an eval.json from before the breakdown
            continue
        rows.append((f"{_label(settings[name])}: 1 sample", sh["first_sample"]))
        if settings[name].num_samples > 1:
            rows.append((f"{_label(settings[name])}: best of {settings[name].num_samples}", sh["top_ranked"]))
    if not rows:
        return []
    counts = sorted({k for _, r in rows for k in r["by_shapes"]}, key=int)
    lines = ["### What the checker finds, by fact and by number of shapes", "",
             "Share of stated facts that hold (kind, colour, size and position per stated shape; relation per "
             "stated relation; count per image), and whole-caption accuracy by the number of shapes the caption "
             "names.", "",
             "| setting | accuracy | " + " | ".join(FACT_COLUMNS) + " | "
             + " | ".join(f"{k} shape{'s' if k != '1' else ''}" for k in counts) + " |",
             "|---|" + "---:|" * (1 + len(FACT_COLUMNS) + len(counts))]
    for label, r in rows:
        facts = " | ".join(_fmt(r["facts"].get(f, float("nan"))) for f in FACT_COLUMNS)
        by = " | ".join(_fmt(r["by_shapes"].get(k, {}).get("accuracy", float("nan"))) for k in counts)
        lines.append(f"| {label} | {_fmt(r['accuracy'])} | {facts} | {by} |")
    return lines + [""]


def _label(s) -> str:
    base = {"top_p": "top-p", "cd_k": "CD-K", "mixed": "mixed", "greedy": "greedy"}[s.decoding]
    tail = f", N = {s.num_samples}" if s.num_samples > 1 else ""
    return f"{base}, CFG {s.cfg_scale:g}, {s.num_retrieved} retr.{tail}"


def grid_columns(c, ab, settings) -> List[Tuple[str, str, str]]:
    """(column label, setting name, "first" sample or "best" of N) of the grid:
    unguided top-p, guided top-p without and with retrieval, CD-K, and the
    best of N of each reranked decoding."""
    cols = []
    for n in ab["tables"]["cfg"]:
        if settings[n].cfg_scale == 1.0:
            cols.append(("top-p, no CFG", n, "first"))
    for n in ab["tables"]["retrieval"]:
        s = settings[n]
        if s.num_retrieved in (0, c.base_retrieved):
            cols.append((f"{_label(s).split(', ', 1)[0]}, CFG {s.cfg_scale:g}, {s.num_retrieved} retr.", n, "first"))
    for n in ab["tables"]["rerank"]:
        s = settings[n]
        if s.decoding != c.base_decoding and s.decoding != "mixed":
            cols.append((f"{_label(s).split(', ', 1)[0]}, 1 sample", n, "first"))
        if s.num_samples > 1:
            cols.append((f"{_label(s).split(', ', 1)[0]}, best of {s.num_samples}", n, "best"))
    return cols


def _minutes(seconds) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s"


def _stage_summary(name: str, st: dict) -> str:
    if name == "report":
        return "this report, its grids and plots"
    if not st:
        return "not run"
    if name == "corpus":
        return (f"{st['corpus']['documents']:,} training pairs (seed {st['corpus']['seed']}), "
                f"{st['heldout']['documents']} held-out (seed {st['heldout']['seed']})")
    if name == "vqgan":
        return (f"{st.get('train_steps')} steps; checker accuracy of held-out reconstructions "
                f"{_fmt(st.get('checker_accuracy'))}, codebook usage {_fmt(st.get('codebook_usage'))}")
    if name == "clip":
        return (f"{st.get('train_steps')} steps; held-out text-to-image top-1 {_fmt(st.get('top1_accuracy'))} "
                f"(of {st.get('eval_pool')})")
    if name == "task_data":
        return f"{st.get('documents'):,} documents prepared, embedded, indexed (ScaNN) with neighbour tables"
    if name == "train":
        budget = st.get("time_budget")
        planned = (f" (what a {budget['minutes']:g}-minute budget allowed at {budget['step_seconds']:.3f} s a step, "
                   f"of at most {budget['max_train_steps']})") if budget else ""
        return f"{st.get('steps')} steps{planned}; final training loss {_fmt(st.get('final_loss'))}"
    if name == "generate":
        return f"{len(st.get('settings', {}))} settings x {st.get('prompts')} held-out captions"
    return "checker accuracy, CLIP-FID, CLIP score per setting"
