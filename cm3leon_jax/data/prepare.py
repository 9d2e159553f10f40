"""Data preparation: raw image-text pairs -> a prepared dataset (ArrayRecord).

    cm3leon prepare --source=image_folder:/data/pairs --out=/data/prepared \\
        --vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe --clip_dir=/m/clip

Every document of a source (`cm3leon_jax.data.sources`: `shapes:N[:SEED]`,
`image_folder:PATH`, `webdataset:GLOB`, `tfds:NAME[@SPLIT][?OPTIONS]`) becomes
one record holding what training and retrieval need (the fields, the
vocabulary and the skips: data/prepare_worker.py). This module runs the
preparation: the settings and their manifest, the pipeline, resumption and
the finished dataset.

Pipeline (Apache Beam; DirectRunner by default, `--runner=DataflowRunner` /
Flink / Spark with `--beam_arg=...` for the rest of Beam's options). The
driver opens the source once (to learn its size and fail early on a bad
spec), loads the three models (to fail early on a bad dir and to fingerprint
them), and cuts the source into fixed index ranges of `records_per_shard`
documents. The pipeline is `Create(shards) | Reshuffle | Map(prepare_shard)`;
a worker (data/prepare_worker.py) prepares its range into the shard's record
file and JSON, the JSON written last as the shard's commit mark. Workers
need this package (e.g. `--beam_arg=--setup_file=./setup.py`) and the
source, the model dirs and `--out` at the same paths (local here; a shared
or GCS-fused file system on a cluster: the sources read local files only).

Resumption: `prepared.json` (the manifest) is written before any shard with
the run's settings: source spec and size, records_per_shard, max_text_tokens,
resolution, require_both, the vocabulary layout and the fingerprints of the
VQ-GAN, the BPE and the CLIP (the model dirs may move; the models may not
change). A rerun with the same settings skips every shard whose JSON is
present, recomputes the others, so it never duplicates a record; a rerun with
other settings on the same `--out` is refused, naming what differs. At the
end the driver checks every shard, writes `ids.npy` (ids in record order)
and completes the manifest (totals, skips by reason).

Record format and reading: cm3leon_jax/data/prepared.py (`PreparedDataset`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
from typing import Dict, List, Optional, Sequence

import numpy as np

from cm3leon_jax import disk_faults
from cm3leon_jax.data import images as images_lib
from cm3leon_jax.data import sources as sources_lib
from cm3leon_jax.data.prepare_worker import (MAX_SKIP_EXAMPLES, PROGRESS, TMP_PREFIX, atomic_json,
                                             beam_prepare_shard, check_model_dirs, load_models, shard_stem,
                                             use_source)
from cm3leon_jax.data.prepared import FORMAT_VERSION, IDS_FILE, MANIFEST_FILE, PREPARED_KIND, RECORD_SUFFIX


def canonical_spec(spec: str) -> str:
    """The spec with local paths made absolute, so workers and reruns from
    another directory name the same files."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("image_folder", "webdataset", PREPARED_KIND) and rest and "://" not in rest:
        return f"{kind}:{os.path.abspath(rest)}"
    return spec


# =========================================================================== the driver


def _read_shard_json(path: str, fingerprint: str) -> Optional[dict]:
    """The JSON of a finished shard, or None when absent, unreadable or from
    other settings."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(d, dict) or d.get("settings_fingerprint") != fingerprint:
        return None
    return d


def _shard_done(out_dir: str, shard: dict, fingerprint: str) -> Optional[dict]:
    stem = shard_stem(shard["shard"], shard["num_shards"])
    if not os.path.isfile(os.path.join(out_dir, stem + RECORD_SUFFIX)):
        return None
    return _read_shard_json(os.path.join(out_dir, stem + ".json"), fingerprint)


def _vq_resolution(vqgan_dir: str) -> int:
    path = os.path.join(vqgan_dir, "vqgan_config.json")
    try:
        with open(path) as f:
            return int(json.load(f)["resolution"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is unreadable or has no resolution ({type(e).__name__}: {e})") from None


def _settings_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_manifest(out_dir: str, settings: dict) -> Optional[dict]:
    """The manifest present (None if none), refused when of other settings."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt ({e}): delete {out_dir} and prepare again") from None
    theirs = old.get("settings") if isinstance(old, dict) else None
    if not isinstance(theirs, dict):
        raise ValueError(f"{path} is not a prepared-dataset manifest: use another --out")
    diff = [k for k in sorted(set(theirs) | set(settings)) if theirs.get(k) != settings.get(k)]
    if diff:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there vs {settings.get(k)!r} now" for k in diff)
        raise ValueError(f"output dir {out_dir!r} holds a dataset prepared with other settings ({detail}): "
                         "use another --out, or delete it to start over")
    return old


class _ProgressBar(threading.Thread):
    """A tqdm bar over documents, fed by finished shards' JSON files and (for
    runs in this process) the workers' per-shard counters."""

    def __init__(self, out_dir: str, shards: List[dict], initial: int, total: int, enabled: bool):
        super().__init__(daemon=True)
        from tqdm import tqdm

        self.out_dir, self.shards = out_dir, shards
        self.initial = initial
        self.stop_event = threading.Event()
        self.bar = tqdm(total=total, initial=initial, unit="doc", desc="prepare", file=sys.stderr,
                        disable=not enabled, dynamic_ncols=True)

    def update(self):
        done = self.initial
        partial = PROGRESS.get(self.out_dir, {})
        for s in self.shards:
            stem = shard_stem(s["shard"], s["num_shards"])
            if os.path.exists(os.path.join(self.out_dir, stem + ".json")):
                done += s["stop"] - s["start"]
            else:
                done += partial.get(s["shard"], 0)
        self.bar.n = min(done, self.bar.total)
        self.bar.refresh()

    def run(self):
        while not self.stop_event.wait(0.5):
            self.update()

    def close(self):
        self.stop_event.set()
        self.join(timeout=5)
        self.update()
        self.bar.close()


def _run_pipeline(cfg: dict, shards: List[dict], runner: str, pipeline_args: Sequence[str]) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions([f"--runner={runner}", *pipeline_args])
    disk_faults.quiet("apache_beam.runners.common")  # a full disk is one line (_raise_if_disk_fault)
    with beam.Pipeline(options=options) as p:
        _ = (p
             | "Shards" >> beam.Create(shards)
             | "Spread" >> beam.Reshuffle()
             | "PrepareShard" >> beam.Map(beam_prepare_shard, cfg))


def prepare(source: str, out_dir: str, vqgan_dir: str, text_tokenizer: str, clip_dir: str, *,
            max_text_tokens: int = 128, records_per_shard: int = 1000, resolution: Optional[int] = None,
            batch_size: int = 32, require_both: bool = True, runner: str = "DirectRunner",
            pipeline_args: Sequence[str] = (), progress: bool = True,
            max_image_pixels: int = images_lib.MAX_PIXELS) -> dict:
    """Prepares every document of the source spec `source` into `out_dir`
    (see the module docstring) and returns the report:
    {"written": records in the dataset, "new_records": written by this run,
     "skipped": {reason: count}, "truncated": captions truncated,
     "shards": N, "resumed_shards": shards found done, "out": out_dir}.

    `max_image_pixels` is the image size budget (`images.load_image`):
    larger images are skipped as "too large" without being decoded.

    Raises ValueError for a bad spec, a missing model dir, bad sizes, or an
    out dir prepared with other settings."""
    for name, value in (("max_text_tokens", max_text_tokens), ("records_per_shard", records_per_shard),
                        ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
    if (isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, (int, np.integer))
            or max_image_pixels < images_lib.MIN_SIDE ** 2):
        raise ValueError(f"--max_image_pixels must be an integer >= {images_lib.MIN_SIDE ** 2}, got "
                         f"{max_image_pixels!r}")
    if resolution is not None and (not isinstance(resolution, (int, np.integer)) or resolution < images_lib.MIN_SIDE):
        raise ValueError(f"--resolution must be an integer >= {images_lib.MIN_SIDE}, got {resolution!r}")
    if not isinstance(source, str) or ":" not in source:
        sources_lib.open_source(source)  # raises the standard "unknown source spec" error
    if source.startswith(PREPARED_KIND + ":"):
        raise ValueError(f"source {source!r} is already a prepared dataset")
    check_model_dirs(vqgan_dir, text_tokenizer, clip_dir)
    spec = canonical_spec(source)
    kind = spec.partition(":")[0]
    if kind not in sources_lib.SPEC_KINDS:
        sources_lib.open_source(spec)  # the standard "unknown source kind" error
    side = int(resolution) if resolution is not None else _vq_resolution(vqgan_dir)
    # The source before the models: a bad spec fails before anything heavy
    # loads. Opened fresh: the files may have changed since.
    src = sources_lib.open_source(spec, resolution=side, max_pixels=int(max_image_pixels))
    n = len(src)
    if n == 0:
        raise ValueError(f"source {spec!r} has no documents"
                         + (f" (skipped: {json.dumps(src.skipped, sort_keys=True)})"
                            if getattr(src, "skipped", None) else ""))
    models = load_models(vqgan_dir, text_tokenizer, clip_dir, batch_size)
    use_source(spec, side, int(max_image_pixels), src)  # what workers in this process read
    num_shards = -(-n // int(records_per_shard))
    settings = {
        "format_version": FORMAT_VERSION, "source": spec, "source_size": n,
        "records_per_shard": int(records_per_shard), "num_shards": num_shards,
        "max_text_tokens": int(max_text_tokens), "resolution": side, "require_both": bool(require_both),
        "vocabulary": dataclasses.asdict(models.vocabulary), **models.fingerprints,
    }
    if int(max_image_pixels) != images_lib.MAX_PIXELS:
        # Only when not the default: datasets prepared before the budget
        # existed keep their fingerprint, so their reruns still resume.
        settings["max_image_pixels"] = int(max_image_pixels)
    fingerprint = _settings_fingerprint(settings)
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    old = _check_manifest(out_dir, settings)
    for name in os.listdir(out_dir):
        if name.startswith(TMP_PREFIX):  # a write cut short: never renamed, never counted
            os.remove(os.path.join(out_dir, name))
    shards = [{"shard": k, "num_shards": num_shards, "start": k * int(records_per_shard),
               "stop": min(n, (k + 1) * int(records_per_shard))} for k in range(num_shards)]
    models_info = {"vqgan_dir": os.path.abspath(vqgan_dir), "text_tokenizer": os.path.abspath(text_tokenizer),
                   "clip_dir": os.path.abspath(clip_dir), **{f"{k}_identity": v for k, v in models.identities.items()}}
    manifest = {"format_version": FORMAT_VERSION, "complete": False, "settings": settings,
                "settings_fingerprint": fingerprint, "models": models_info,
                "record_format": "msgpack map per record (cm3leon_jax.data.prepared.decode_record)",
                "embedding_dim": models.clip.dim, "codes_per_image": models.image_tokenizer.codes_per_image,
                "shards": [dict(s, file=shard_stem(s["shard"], num_shards) + RECORD_SUFFIX) for s in shards]}
    if old is None or not old.get("complete"):
        atomic_json(os.path.join(out_dir, MANIFEST_FILE), manifest if old is None else dict(old, models=models_info))
    done = {s["shard"]: d for s in shards if (d := _shard_done(out_dir, s, fingerprint)) is not None}
    todo = [s for s in shards if s["shard"] not in done]
    cfg = {"source": spec, "resolution": side, "out_dir": out_dir, "vqgan_dir": os.path.abspath(vqgan_dir),
           "text_tokenizer": os.path.abspath(text_tokenizer), "clip_dir": os.path.abspath(clip_dir),
           "max_text_tokens": int(max_text_tokens), "require_both": bool(require_both),
           "batch_size": int(batch_size), "max_image_pixels": int(max_image_pixels),
           "settings_fingerprint": fingerprint}
    if todo:
        initial = sum(s["stop"] - s["start"] for s in shards if s["shard"] in done)
        bar = _ProgressBar(out_dir, todo, initial, n, progress)
        bar.start()
        try:
            _run_pipeline(cfg, todo, runner, pipeline_args)
        except Exception as e:  # noqa: BLE001 - only a disk fault becomes one line; the rest keeps its traceback
            _raise_if_disk_fault(e, out_dir, shards, fingerprint)
            raise
        finally:
            bar.close()
            PROGRESS.pop(out_dir, None)
    # A rerun of a finished dataset checks it and writes nothing.
    write = bool(todo) or old is None or not old.get("complete")
    return _finalise(out_dir, src, shards, manifest, fingerprint, resumed=set(done), write=write)


def _raise_if_disk_fault(e: BaseException, out_dir: str, shards: List[dict], fingerprint: str) -> None:
    """A shard the disk refused (Beam re-raises it as RuntimeError): one line,
    an OSError. Nothing half-written counts: a shard's files keep their
    temporary names until complete, its JSON commit mark comes last."""
    fault = disk_faults.disk_fault(e)
    if fault is None:
        return
    kept = sum(_shard_done(out_dir, s, fingerprint) is not None for s in shards)
    err = OSError(f"cannot write shards to {out_dir}: {fault[0]}; {disk_faults.advice(fault[1])} the same "
                  f"command: the {kept} of {len(shards)} shards complete are kept, the others are written then")
    err.errno = fault[1]
    raise err from None


def _finalise(out_dir: str, src, shards: List[dict], manifest: dict, fingerprint: str, resumed: set,
              write: bool = True) -> dict:
    from array_record.python.array_record_module import ArrayRecordReader

    skipped: Dict[str, int] = dict(getattr(src, "skipped", {}) or {})
    examples: List[list] = []
    ids: List[int] = []
    totals = {"truncated": 0, "with_text": 0, "with_image": 0}
    counts = []
    for s in shards:
        d = _shard_done(out_dir, s, fingerprint)
        if d is None:
            raise ValueError(f"shard {s['shard']} of {out_dir!r} was not written (the pipeline failed?): rerun "
                             "the same command to continue")
        path = os.path.join(out_dir, d["file"])
        reader = ArrayRecordReader(path)
        try:
            on_disk = reader.num_records()
        finally:
            reader.close()
        if on_disk != d["count"] or len(d["ids"]) != d["count"]:
            raise ValueError(f"{path} holds {on_disk} records but its JSON says {d['count']}: delete both "
                             "files and rerun the same command")
        counts.append(d["count"])
        ids.extend(d["ids"])
        for reason, c in d["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + c
        examples.extend(d["skipped_examples"][:max(0, MAX_SKIP_EXAMPLES - len(examples))])
        for k in totals:
            totals[k] += d[k]
    total = int(sum(counts))
    if total == 0:
        raise ValueError(f"no document of source {manifest['settings']['source']!r} could be prepared (skipped: "
                         f"{json.dumps(skipped, sort_keys=True)}, e.g. {examples[:3]})")
    ids_arr = np.array(ids, np.int64)
    uniq, cnt = np.unique(ids_arr, return_counts=True)
    if uniq.shape[0] != total:
        raise ValueError(f"source {manifest['settings']['source']!r} gives duplicated document ids, e.g. "
                         f"{uniq[cnt > 1][:5].tolist()}: each document needs a distinct id")
    for s, c in zip(manifest["shards"], counts):
        s["count"] = c
    manifest = dict(manifest, complete=True, count=total, skipped=dict(sorted(skipped.items())),
                    skipped_examples=examples, ids=IDS_FILE, **totals)
    if write or not os.path.isfile(os.path.join(out_dir, IDS_FILE)):
        tmp = os.path.join(out_dir, f"{TMP_PREFIX}{IDS_FILE}")
        with open(tmp, "wb") as f:
            np.save(f, ids_arr)
        os.replace(tmp, os.path.join(out_dir, IDS_FILE))
        atomic_json(os.path.join(out_dir, MANIFEST_FILE), manifest)
    new = sum(c for s, c in zip(shards, counts) if s["shard"] not in resumed)
    return {"written": total, "new_records": int(new), "skipped": manifest["skipped"],
            "truncated": totals["truncated"], "shards": len(shards), "resumed_shards": len(resumed),
            "out": out_dir}
