"""The per-shard work of `cm3leon prepare` (data/prepare.py runs it): the
three models, loaded once per process, and `prepare_shard`, which turns one
index range of a source into one shard of the prepared dataset.

Every document becomes one record holding what training and retrieval need,
so that neither ever decodes an image or runs a tokenizer again:

    id               the source's document id (int64; stable, see sources.py)
    index            the document's position in the source
    caption          the caption as the source gave it (not truncated)
    text_ids         int32 unified ids of the caption (the project's BPE),
                     truncated to `max_text_tokens`
    image_ids        int32 unified ids of the VQ-GAN codes (raster order)
    text_embedding   float32 [D], L2-normalised CLIP text embedding
    image_embedding  float32 [D], L2-normalised CLIP image embedding
    (plus has_text / has_image, num_text_tokens before truncation,
     text_truncated and content_hash, `retrieval.bank.content_hash` of text + pixels)

The unified vocabulary is sized by the two tokenizers: `image_codebook_size`
= the VQ-GAN's codebook, `text_vocab_size` = the BPE's size, 64 specials of
which 32 masks (the layout every gin config uses); `prepared.json` records it
so a training config can be checked against it.

A worker reopens the source from its spec string (and loads the models once
per process), reads its range in batches of `batch_size`, counts skipped
documents by reason (Beam metrics counters `cm3leon_prepare/skipped: REASON`,
and in the shard's result), tokenises text (`caption truncated` is a note,
not a skip), encodes images with the VQ-GAN and both modalities with CLIP
(`retrieval.clip_encoder.ClipEncoder`, the bank's own encoder), and writes

    shard-KKKKK-of-NNNNN.array_record   the records (group_size:1, so grain
                                        reads them by random access)
    shard-KKKKK-of-NNNNN.json           counts, ids, skips of that shard

each to a temporary name first and renamed when complete; the JSON is
written last and is the shard's commit mark.

Documents are skipped (and counted by reason) when the source raises
`SkippedDocument` ("corrupt or truncated image", "too large": an image over
`max_image_pixels`, refused from its header, ...; captions are cleaned by
the sources, data/text.py), and with
`require_both=True` (the default: a CM3 training document needs both halves)
when the caption is empty ("empty caption") or the image is missing ("no
image"). With `require_both=False` single-modality documents are kept (the
memory bank allows them); the missing half has no ids and a zero embedding.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
import uuid
from typing import Dict, List

import numpy as np

from cm3leon_jax.data import images as images_lib
from cm3leon_jax.data import sources as sources_lib
from cm3leon_jax.data.documents import SkippedDocument
from cm3leon_jax.data.prepared import RECORD_SUFFIX, encode_record

SHARD_STEM = "shard-{:05d}-of-{:05d}"
TMP_PREFIX = ".tmp-"
NUM_SPECIAL_TOKENS = 64
NUM_MASK_TOKENS = 32
METRICS_NAMESPACE = "cm3leon_prepare"
SKIP_EMPTY_CAPTION = "empty caption"
SKIP_NO_IMAGE = "no image"
SKIP_EMPTY_DOCUMENT = "empty document"
MAX_SKIP_EXAMPLES = 10


# =========================================================================== models


@dataclasses.dataclass
class Models:
    """The three models of a preparation, loaded once per process."""
    image_tokenizer: object   # models.image_tokenizer.ImageTokenizer
    text_tokenizer: object    # data.tokenizers.TextTokenizer (unified ids)
    clip: object              # retrieval.clip_encoder.ClipEncoder
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
        from cm3leon_jax.models.vqgan_dir import load_vqgan
        from cm3leon_jax.retrieval.clip_encoder import ClipEncoder, model_fingerprint

        vq_cfg, vq_params = load_vqgan(vqgan_dir)
        image_tok = ImageTokenizer(vq_cfg, vq_params, batch_size=batch_size)
        vq_fp = model_fingerprint(vq_cfg, vq_params, [])
        tok_file = tok_lib._tokenizer_file(text_tokenizer)
        bpe_size = Tokenizer.from_file(tok_file).get_vocab_size(with_added_tokens=True)
        vocabulary = vocab_lib.UnifiedVocabulary(num_special_tokens=NUM_SPECIAL_TOKENS,
                                                 num_mask_tokens=NUM_MASK_TOKENS,
                                                 image_codebook_size=vq_cfg.num_embeddings,
                                                 text_vocab_size=bpe_size)
        text_tok = tok_lib.TextTokenizer(tok_file, vocabulary)
        clip = ClipEncoder(clip_dir, batch_size=batch_size)
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


def use_source(spec: str, resolution: int, max_pixels: int, source) -> None:
    """Makes the driver's open `source` the one workers in this process read
    for these settings."""
    with _SOURCES_LOCK:
        _SOURCES[(spec, int(resolution), int(max_pixels))] = source


# =========================================================================== one shard


def shard_stem(k: int, num: int) -> str:
    return SHARD_STEM.format(k, num)


def atomic_json(path: str, obj) -> None:
    tmp = os.path.join(os.path.dirname(path), f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Documents done per shard of the runs in this process, keyed by out dir, for
# the progress bar (a DirectRunner runs the shards in this process; other
# runners are followed by the shards' JSON files alone).
PROGRESS: Dict[str, Dict[int, int]] = {}


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

    from cm3leon_jax.retrieval.bank import content_hash

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
    progress = PROGRESS.setdefault(out_dir, {})
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
                       "has_image": image is not None, "content_hash": content_hash(text, image)}
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
    atomic_json(os.path.join(out_dir, stem + ".json"), result)
    try:  # Beam metrics: visible in the runner's UI / result.metrics()
        from apache_beam.metrics import Metrics

        Metrics.counter(METRICS_NAMESPACE, "written").inc(len(ids))
        Metrics.counter(METRICS_NAMESPACE, "truncated").inc(int(truncated))
        for reason, n in skipped.items():
            Metrics.counter(METRICS_NAMESPACE, f"skipped: {reason}").inc(n)
    except ImportError:  # prepare_shard called outside Beam, without Beam installed
        pass
    return result


def beam_prepare_shard(shard: dict, cfg: dict) -> dict:
    """The pipeline's Map: the shard's summary (without the id list)."""
    out = prepare_shard(cfg, shard)
    return {k: v for k, v in out.items() if k != "ids"}
