"""Data preparation: raw image-text pairs -> a prepared dataset (ArrayRecord).

    cm3leon prepare --source=image_folder:/data/pairs --out=/data/prepared \\
        --vqgan_dir=/m/vqgan --text_tokenizer=/m/bpe --clip_dir=/m/clip

Every document of a source (`cm3leon_jax.data.sources`: `shapes:N[:SEED]`,
`image_folder:PATH`, `webdataset:GLOB`, `tfds:NAME[@SPLIT][?OPTIONS]`) becomes
one record holding what training and retrieval need, so that neither ever
decodes an image or runs a tokenizer again:

    id               the source's document id (int64; stable, see sources.py)
    index            the document's position in the source
    caption          the caption as the source gave it (not truncated)
    text_ids         int32 unified ids of the caption (the project's BPE),
                     truncated to `max_text_tokens`
    image_ids        int32 unified ids of the VQ-GAN codes (raster order)
    text_embedding   float32 [D], L2-normalised CLIP text embedding
    image_embedding  float32 [D], L2-normalised CLIP image embedding
    (plus has_text / has_image, num_text_tokens before truncation,
     text_truncated and content_hash, `embed.content_hash` of text + pixels)

The unified vocabulary is sized by the two tokenizers: `image_codebook_size`
= the VQ-GAN's codebook, `text_vocab_size` = the BPE's size, 64 specials of
which 32 masks (the layout every gin config uses); `prepared.json` records it
so a training config can be checked against it.

Pipeline (Apache Beam; DirectRunner by default, `--runner=DataflowRunner` /
Flink / Spark with `--beam_arg=...` for the rest of Beam's options). The
driver opens the source once (to learn its size and fail early on a bad
spec), loads the three models (to fail early on a bad dir and to fingerprint
them), and cuts the source into fixed index ranges of `records_per_shard`
documents. The pipeline is `Create(shards) | Reshuffle | Map(prepare_shard)`;
a worker reopens the source from its spec string (and loads the models once
per process), reads its range in batches of `batch_size`, counts skipped
documents by reason (Beam metrics counters `cm3leon_prepare/skipped: REASON`,
and in the shard's result), tokenises text (`caption truncated` is a note,
not a skip), encodes images with the VQ-GAN and both modalities with CLIP
(`retrieval.embed.ClipEncoder`, the bank's own encoder), and writes

    shard-KKKKK-of-NNNNN.array_record   the records (group_size:1, so grain
                                        reads them by random access)
    shard-KKKKK-of-NNNNN.json           counts, ids, skips of that shard

each to a temporary name first and renamed when complete; the JSON is
written last and is the shard's commit mark. Workers need this package
(e.g. `--beam_arg=--setup_file=./setup.py`) and the source, the model dirs
and `--out` at the same paths (local here; a shared or GCS-fused file system
on a cluster: the sources read local files only).

Documents are skipped (and counted by reason) when the source raises
`SkippedDocument` ("corrupt or truncated image", "too large": an image over
`max_image_pixels`, refused from its header, ...; captions are cleaned by
the sources, data/text.py), and with
`require_both=True` (the default: a CM3 training document needs both halves)
when the caption is empty ("empty caption") or the image is missing ("no
image"). With `require_both=False` single-modality documents are kept (the
memory bank allows them); the missing half has no ids and a zero embedding.

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
import uuid
from typing import Dict, List, Optional, Sequence

import numpy as np

from cm3leon_jax import disk_faults
from cm3leon_jax.data import images as images_lib
from cm3leon_jax.data import sources as sources_lib
from cm3leon_jax.data.prepared import (FORMAT_VERSION, IDS_FILE, MANIFEST_FILE, PREPARED_KIND, RECORD_SUFFIX,
                                       encode_record)
from cm3leon_jax.data.documents import SkippedDocument

SHARD_STEM = "shard-{:05d}-of-{:05d}"
TMP_PREFIX = ".tmp-"
NUM_SPECIAL_TOKENS = 64
NUM_MASK_TOKENS = 32
METRICS_NAMESPACE = "cm3leon_prepare"
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_NO_IMAGE = "no image"
SKIP_EMPTY_DOCUMENT = "empty document"
MAX_SKIP_EXAMPLES = 10


def canonical_spec(spec: str) -> str:
    """The spec with local paths made absolute, so workers and reruns from
    another directory name the same files."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("image_folder", "webdataset", PREPARED_KIND) and rest and "://" not in rest:
        return f"{kind}:{os.path.abspath(rest)}"
    return spec


# =========================================================================== models


@dataclasses.dataclass
class Models:
    """The three models of a preparation, loaded once per process."""
    image_tokenizer: object   # models.image_tokenizer.ImageTokenizer
    text_tokenizer: object    # data.tokenizers.TextTokenizer (unified ids)
    clip: object              # retrieval.embed.ClipEncoder
    vocabulary: object        # vocab.UnifiedVocabulary
    identities: Dict[str, str]
    fingerprints: Dict[str, str]


_MODELS: Dict[tuple, Models] = {}
_MODELS_LOCK = threading.Lock()


def check_model_dirs(vqgan_dir: str, text_tokenizer: str, clip_dir: str) -> None:
    """Cheap existence checks (before anything heavy is imported), each
    naming the flag and the fix."""
    if not vqgan_dir or not os.path.isdir(vqgan_dir):
        raise ValueError(f"--vqgan_dir {vqgan_dir!r} does not exist: give a VQ-GAN model dir (`cm3leon "
                         "tokenizer train-image` or `cm3leon convert vqgan` output)")
    if not os.path.isfile(os.path.join(vqgan_dir, "vqgan_config.json")):
        raise ValueError(f"--vqgan_dir {vqgan_dir!r} has no vqgan_config.json: not a VQ-GAN model dir")
    tok_file = os.path.join(text_tokenizer, "tokenizer.json") if text_tokenizer and os.path.isdir(
        text_tokenizer) else text_tokenizer
    if not tok_file or not os.path.isfile(tok_file):
        raise ValueError(f"--text_tokenizer {text_tokenizer!r} does not exist or has no tokenizer.json (train "
                         "one with `cm3leon tokenizer train-text`)")
    if not clip_dir or not os.path.isdir(clip_dir):
        raise ValueError(f"--clip_dir {clip_dir!r} does not exist: give a CLIP model dir (`cm3leon convert "
                         "clip` or `cm3leon clip train` output)")


def load_models(vqgan_dir: str, text_tokenizer: str, clip_dir: str, batch_size: int = 32) -> Models:
    """The VQ-GAN, the BPE and the CLIP, with their fingerprints; cached per
    process (a Beam worker loads them once for all its shards)."""
    key = (os.path.abspath(vqgan_dir), os.path.abspath(text_tokenizer), os.path.abspath(clip_dir), int(batch_size))
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        check_model_dirs(vqgan_dir, text_tokenizer, clip_dir)
        from tokenizers import Tokenizer

        from cm3leon_jax import vocab as vocab_lib
        from cm3leon_jax.data import tokenizers as tok_lib
        from cm3leon_jax.models.image_tokenizer import ImageTokenizer
        from cm3leon_jax.retrieval import embed
        from cm3leon_jax.models.vqgan_dir import load_vqgan

        vq_cfg, vq_params = load_vqgan(vqgan_dir)
        image_tok = ImageTokenizer(vq_cfg, vq_params, batch_size=batch_size)
        vq_fp = embed.model_fingerprint(vq_cfg, vq_params, [])
        tok_file = tok_lib._tokenizer_file(text_tokenizer)
        bpe_size = Tokenizer.from_file(tok_file).get_vocab_size(with_added_tokens=True)
        vocabulary = vocab_lib.UnifiedVocabulary(num_special_tokens=NUM_SPECIAL_TOKENS,
                                                 num_mask_tokens=NUM_MASK_TOKENS,
                                                 image_codebook_size=vq_cfg.num_embeddings,
                                                 text_vocab_size=bpe_size)
        text_tok = tok_lib.TextTokenizer(tok_file, vocabulary)
        clip = embed.ClipEncoder(clip_dir, batch_size=batch_size)
        models = Models(
            image_tokenizer=image_tok, text_tokenizer=text_tok, clip=clip, vocabulary=vocabulary,
            identities={"image_tokenizer": f"vqgan:{os.path.abspath(vqgan_dir)}#{vq_fp}",
                        "text_tokenizer": f"bpe:{os.path.abspath(tok_file)}#{text_tok.sha256[:16]}",
                        "clip": clip.identity},
            fingerprints={"image_tokenizer": vq_fp, "text_tokenizer": text_tok.sha256[:16],
                          "clip": clip.fingerprint})
        _MODELS[key] = models
        return models


_SOURCES: Dict[tuple, object] = {}
_SOURCES_LOCK = threading.Lock()


def _open_source_cached(spec: str, resolution: int, max_pixels: int = images_lib.MAX_PIXELS):
    with _SOURCES_LOCK:
        key = (spec, int(resolution), int(max_pixels))
        if key not in _SOURCES:
            _SOURCES[key] = sources_lib.open_source(spec, resolution=resolution, max_pixels=max_pixels)
        return _SOURCES[key]


# =========================================================================== one shard


def shard_stem(k: int, num: int) -> str:
    return SHARD_STEM.format(k, num)


def _atomic_json(path: str, obj) -> None:
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Documents done per shard of the runs in this process, keyed by out dir, for
# the progress bar (a DirectRunner runs the shards in this process; other
# runners are followed by the shards' JSON files alone).
_PROGRESS: Dict[str, Dict[int, int]] = {}


def _to_side(image: np.ndarray, side: int) -> np.ndarray:
    if image.shape[0] == side and image.shape[1] == side:
        return image
    from PIL import Image

    return np.asarray(images_lib.resize_center_crop(Image.fromarray(image), side), np.uint8)


def prepare_shard(cfg: dict, shard: dict) -> dict:
    """Prepares source range [shard.start, shard.stop) into the shard's
    ArrayRecord file and JSON (see the module docstring); returns the JSON's
    content (counts by reason, ids)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from cm3leon_jax.retrieval import embed

    models = load_models(cfg["vqgan_dir"], cfg["text_tokenizer"], cfg["clip_dir"], cfg["batch_size"])
    source = _open_source_cached(cfg["source"], cfg["resolution"],
                                 cfg.get("max_image_pixels", images_lib.MAX_PIXELS))
    out_dir, k, num = cfg["out_dir"], int(shard["shard"]), int(shard["num_shards"])
    stem = shard_stem(k, num)
    final = os.path.join(out_dir, stem + RECORD_SUFFIX)
    tmp = os.path.join(out_dir, f"{TMP_PREFIX}{uuid.uuid4().hex}-{stem}{RECORD_SUFFIX}")
    vq, text_tok, clip, vocab = models.image_tokenizer, models.text_tokenizer, models.clip, models.vocabulary
    max_tokens, require_both, bs = int(cfg["max_text_tokens"]), bool(cfg["require_both"]), int(cfg["batch_size"])
    skipped: Dict[str, int] = {}
    examples: List[list] = []
    ids: List[int] = []
    truncated = with_text = with_image = 0
    progress = _PROGRESS.setdefault(out_dir, {})
    progress[k] = 0

    def skip(i, reason, detail=""):
        skipped[reason] = skipped.get(reason, 0) + 1
        if len(examples) < MAX_SKIP_EXAMPLES:
            examples.append([int(i), reason, detail[:300]])

    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
        for c0 in range(shard["start"], shard["stop"], bs):
            c1 = min(c0 + bs, shard["stop"])
            docs = []
            for i in range(c0, c1):
                try:
                    doc = source[i]
                except SkippedDocument as e:
                    skip(i, e.reason, str(e))
                    continue
                text, image = doc.get("text"), doc.get("image")
                text = text if isinstance(text, str) and text.strip() else None
                if text is None and image is None:
                    skip(i, SKIP_EMPTY_DOCUMENT)
                    continue
                if require_both and text is None:
                    skip(i, SKIP_EMPTY_CAPTION)
                    continue
                if require_both and image is None:
                    skip(i, SKIP_NO_IMAGE)
                    continue
                docs.append((i, int(doc["id"]), text, image))
            texts = [d[2] for d in docs if d[2] is not None]
            imgs = [d[3] for d in docs if d[3] is not None]
            dim = clip.dim
            text_emb = clip.encode_texts(texts) if texts else np.zeros((0, dim), np.float32)
            image_emb = clip.encode_images(imgs) if imgs else np.zeros((0, dim), np.float32)
            text_ids = text_tok.encode_batch(texts) if texts else []
            if imgs:
                codes = vq.encode(np.stack([_to_side(im, vq.resolution) for im in imgs]))
                image_ids = vocab.image_code_to_id(codes.astype(np.int64)).astype(np.int32)
            else:
                image_ids = np.zeros((0, vq.codes_per_image), np.int32)
            ti = ii = 0
            for i, doc_id, text, image in docs:
                rec = {"id": doc_id, "index": i, "caption": text, "has_text": text is not None,
                       "has_image": image is not None, "content_hash": embed.content_hash(text, image)}
                if text is not None:
                    t = text_ids[ti]
                    rec.update(text_ids=t[:max_tokens], text_embedding=text_emb[ti], num_text_tokens=len(t),
                               text_truncated=len(t) > max_tokens)
                    truncated += len(t) > max_tokens
                    with_text += 1
                    ti += 1
                else:
                    rec.update(text_ids=np.zeros(0, np.int32), text_embedding=np.zeros(dim, np.float32),
                               num_text_tokens=0, text_truncated=False)
                if image is not None:
                    rec.update(image_ids=image_ids[ii], image_embedding=image_emb[ii])
                    with_image += 1
                    ii += 1
                else:
                    rec.update(image_ids=np.zeros(0, np.int32), image_embedding=np.zeros(dim, np.float32))
                writer.write(encode_record(rec))
                ids.append(doc_id)
            progress[k] = c1 - shard["start"]
        writer.close()
        writer = None
        os.replace(tmp, final)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    result = {"shard": k, "num_shards": num, "file": stem + RECORD_SUFFIX, "start": shard["start"],
              "stop": shard["stop"], "count": len(ids), "ids": ids, "skipped": dict(sorted(skipped.items())),
              "skipped_examples": examples, "truncated": int(truncated), "with_text": with_text,
              "with_image": with_image, "settings_fingerprint": cfg["settings_fingerprint"]}
    _atomic_json(os.path.join(out_dir, stem + ".json"), result)
    try:  # Beam metrics: visible in the runner's UI / result.metrics()
        from apache_beam.metrics import Metrics

        Metrics.counter(METRICS_NAMESPACE, "written").inc(len(ids))
        Metrics.counter(METRICS_NAMESPACE, "truncated").inc(int(truncated))
        for reason, n in skipped.items():
            Metrics.counter(METRICS_NAMESPACE, f"skipped: {reason}").inc(n)
    except ImportError:  # prepare_shard called outside Beam, without Beam installed
        pass
    return result


def _beam_prepare_shard(shard: dict, cfg: dict) -> dict:
    """The pipeline's Map: the shard's summary (without the id list)."""
    out = prepare_shard(cfg, shard)
    return {k: v for k, v in out.items() if k != "ids"}


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
        partial = _PROGRESS.get(self.out_dir, {})
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
             | "PrepareShard" >> beam.Map(_beam_prepare_shard, cfg))


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
    with _SOURCES_LOCK:
        _SOURCES[(spec, side, int(max_image_pixels))] = src  # what workers in this process read
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
        _atomic_json(os.path.join(out_dir, MANIFEST_FILE), manifest if old is None else dict(old, models=models_info))
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
            _PROGRESS.pop(out_dir, None)
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
        _atomic_json(os.path.join(out_dir, MANIFEST_FILE), manifest)
    new = sum(c for s, c in zip(shards, counts) if s["shard"] not in resumed)
    return {"written": total, "new_records": int(new), "skipped": manifest["skipped"],
            "truncated": totals["truncated"], "shards": len(shards), "resumed_shards": len(resumed),
            "out": out_dir}
