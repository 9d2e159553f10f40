"""Embedding a document source into a memory bank, resumably.

This module computes the keys (`bank.document_keys`) of a whole document
source (`cm3leon_jax.data.sources`) with a `ClipEncoder` in one batched,
jitted job and writes them in the layout `bank.Bank` reads:

    cm3leon embed --clip_dir=DIR --source=shapes:2000 --out=BANK_DIR

Resumption: the source is cut into fixed chunks of `chunk_size` documents;
each chunk is embedded in fixed-shape batches (the last one padded, so one
program is compiled) and written to `chunks/NNNNNN.npz` atomically (a
temporary file, then a rename). A rerun with the same flags skips the
chunks present; since every chunk is computed from the same documents in
the same batches, the consolidated output is bit-identical to an
uninterrupted run. `embed_run.json` records the flags that must not change
between the two runs.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

from cm3leon_jax.retrieval.bank import (
    BANK_FILE, CAPTION_OFFSETS_FILE, CAPTIONS_FILE, CHUNK_DIR, CONTENT_HASHES_FILE, EMBEDDINGS_FILE,
    FORMAT_VERSION, IDS_FILE, KEY_DEFINITION, MODALITIES_FILE, content_hash, document_keys)
from cm3leon_jax.retrieval.clip_encoder import ClipEncoder, same_model

RUN_FILE = "embed_run.json"
MODALITIES = ("both", "text", "image")


def _chunk_path(out_dir: str, c: int) -> str:
    return os.path.join(out_dir, CHUNK_DIR, f"{c:06d}.npz")


@dataclasses.dataclass
class _Prepared:
    ids: np.ndarray
    captions: List[Optional[str]]
    has_text: np.ndarray
    has_image: np.ndarray
    hashes: np.ndarray
    text_inputs: Tuple[np.ndarray, np.ndarray]
    pixels: np.ndarray
    skipped: List[Tuple[int, str]]


def _prepare_chunk(source, encoder: ClipEncoder, start: int, stop: int, modality: str) -> _Prepared:
    from cm3leon_jax.data.documents import SkippedDocument

    ids, captions, has_text, has_image, hashes, texts, images, skipped = [], [], [], [], [], [], [], []
    for i in range(start, stop):
        try:
            doc = source[i]
        except SkippedDocument as e:
            skipped.append((i, e.reason))
            continue
        text, image = doc.get("text"), doc.get("image")
        text = text if text else None
        use_text = text is not None and modality in ("both", "text")
        use_image = image is not None and modality in ("both", "image")
        if not (use_text or use_image):
            skipped.append((i, "empty document" if text is None and image is None
                            else f"no {modality} (modality={modality})"))
            continue
        ids.append(int(doc["id"]))
        captions.append(text)
        has_text.append(text is not None)
        has_image.append(image is not None)
        hashes.append(content_hash(text, image))
        if use_text:
            texts.append(text)
        if use_image:
            images.append(image)
    return _Prepared(ids=np.array(ids, np.int64), captions=captions, has_text=np.array(has_text, bool),
                     has_image=np.array(has_image, bool), hashes=np.array(hashes, np.uint64),
                     text_inputs=encoder.prepare_texts(texts), pixels=encoder.prepare_images(images),
                     skipped=skipped)


def _embed_chunk(prep: _Prepared, encoder: ClipEncoder, modality: str) -> np.ndarray:
    n, d = prep.ids.shape[0], encoder.dim
    use_t = prep.has_text & (modality != "image")
    use_i = prep.has_image & (modality != "text")
    text_emb = np.zeros((n, d), np.float32)
    image_emb = np.zeros((n, d), np.float32)
    if use_t.any():
        text_emb[use_t] = encoder.encode_prepared_texts(*prep.text_inputs)
    if use_i.any():
        image_emb[use_i] = encoder.encode_prepared_images(prep.pixels)
    return document_keys(text_emb, image_emb, use_t, use_i) if n else np.zeros((0, d), np.float32)


def _write_chunk(path: str, prep: _Prepared, keys: np.ndarray) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, embeddings=keys, ids=prep.ids,
                 modalities=np.stack([prep.has_text, prep.has_image], axis=1).reshape(-1, 2),
                 content_hashes=prep.hashes,
                 captions=np.array([c if c is not None else "" for c in prep.captions], dtype=str),
                 skipped_index=np.array([s[0] for s in prep.skipped], np.int64),
                 skipped_reason=np.array([s[1] for s in prep.skipped], dtype=str))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_chunk(path: str) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- the job


def _check_run(out_dir: str, run: dict) -> None:
    """Write the run record, or check that the one present matches."""
    path = os.path.join(out_dir, RUN_FILE)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is corrupt ({e}): delete {out_dir} and embed again") from e
        diff = [k for k in sorted(set(run) | set(old)) if k != "embedding_model" and old.get(k) != run.get(k)]
        if not same_model(str(old.get("embedding_model")), run["embedding_model"]):
            diff.insert(0, "embedding_model")
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} there vs {run.get(k)!r} now" for k in diff)
            raise ValueError(f"output dir {out_dir!r} holds a bank of another embedding run ({detail}): "
                             "use another --out, or delete it to start over")
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(run, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def embed_source(source, clip_dir: str, out_dir: str, batch_size: int = 64, modality: str = "both",
                 chunk_size: int = 1024, text_tokenizer: Optional[str] = None, progress: bool = True,
                 stop_after_chunks: Optional[int] = None, encoder: Optional[ClipEncoder] = None) -> dict:
    """Embed every document of `source` into the bank `out_dir` (see the
    module docstring) and return its manifest. A rerun continues from the
    chunks present. `stop_after_chunks` stops after computing that many new
    chunks without consolidating (an interruption, for tests); the return
    value then has "complete": False."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = len(source)
    spec = getattr(source, "spec", type(source).__name__)
    if n == 0:
        raise ValueError(f"source {spec!r} has no documents: nothing to embed")
    encoder = encoder or ClipEncoder(clip_dir, batch_size, text_tokenizer)
    run = {"format_version": FORMAT_VERSION, "source": spec, "source_size": n,
           "embedding_model": encoder.identity, "modality": modality,
           "batch_size": encoder.batch_size, "chunk_size": int(chunk_size)}
    os.makedirs(out_dir, exist_ok=True)
    _check_run(out_dir, run)
    bank_path = os.path.join(out_dir, BANK_FILE)
    if os.path.exists(bank_path):
        with open(bank_path) as f:
            return dict(json.load(f), complete=True, resumed_chunks=None)
    os.makedirs(os.path.join(out_dir, CHUNK_DIR), exist_ok=True)
    for name in os.listdir(os.path.join(out_dir, CHUNK_DIR)):
        if name.endswith(".tmp"):  # a write cut short: never renamed, never counted
            os.remove(os.path.join(out_dir, CHUNK_DIR, name))

    num_chunks = -(-n // chunk_size)
    done = set()
    for c in range(num_chunks):
        path = _chunk_path(out_dir, c)
        if os.path.exists(path):
            try:
                _read_chunk(path)
                done.add(c)
            except Exception as e:  # noqa: BLE001 - a damaged chunk is recomputed, whatever the damage
                print(f"warning: chunk {path} is unreadable ({type(e).__name__}: {e}); recomputing it",
                      file=sys.stderr)
                os.remove(path)
    todo = [c for c in range(num_chunks) if c not in done]
    if stop_after_chunks is not None:
        todo = todo[:max(0, int(stop_after_chunks))]
    docs_done = sum(min(chunk_size, n - c * chunk_size) for c in done)

    from tqdm import tqdm

    bar = tqdm(total=n, initial=docs_done, unit="doc", desc="embed", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)

    def prepare(c):
        return _prepare_chunk(source, encoder, c * chunk_size, min(n, (c + 1) * chunk_size), modality)

    # One thread reads and preprocesses chunk c+1 while XLA embeds chunk c
    # (PIL and the tokenizer release the GIL for most of their work).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed_prepare") as pool:
        pending = pool.submit(prepare, todo[0]) if todo else None
        for j, c in enumerate(todo):
            prep = pending.result()
            pending = pool.submit(prepare, todo[j + 1]) if j + 1 < len(todo) else None
            keys = _embed_chunk(prep, encoder, modality)
            _write_chunk(_chunk_path(out_dir, c), prep, keys)
            bar.update(min(chunk_size, n - c * chunk_size))
    bar.close()
    if len(done) + len(todo) < num_chunks:
        return {"complete": False, "chunks_done": len(done) + len(todo), "chunks_total": num_chunks,
                "resumed_chunks": len(done)}
    manifest = _consolidate(out_dir, source, run, num_chunks, encoder)
    return dict(manifest, complete=True, resumed_chunks=len(done))


def _consolidate(out_dir: str, source, run: dict, num_chunks: int, encoder: ClipEncoder) -> dict:
    counts = []
    skipped: Dict[str, int] = dict(getattr(source, "skipped", {}) or {})
    examples: List[list] = []
    for c in range(num_chunks):
        z = _read_chunk(_chunk_path(out_dir, c))
        counts.append(z["ids"].shape[0])
        for i, reason in zip(z["skipped_index"].tolist(), z["skipped_reason"].tolist()):
            skipped[reason] = skipped.get(reason, 0) + 1
            if len(examples) < 10:
                examples.append([i, reason])
    total, d = int(sum(counts)), encoder.dim
    if total == 0:
        raise ValueError(f"no document of source {run['source']!r} could be embedded "
                         f"(skipped: {json.dumps(skipped, sort_keys=True)}, e.g. {examples[:3]})")
    emb = np.lib.format.open_memmap(os.path.join(out_dir, EMBEDDINGS_FILE + ".tmp"), "w+", np.float32, (total, d))
    ids = np.empty(total, np.int64)
    mods = np.empty((total, 2), bool)
    hashes = np.empty(total, np.uint64)
    offsets = np.empty(total + 1, np.int64)
    offsets[0] = 0
    row = 0
    with open(os.path.join(out_dir, CAPTIONS_FILE + ".tmp"), "wb") as cap:
        for c in range(num_chunks):
            z = _read_chunk(_chunk_path(out_dir, c))
            m = z["ids"].shape[0]
            emb[row:row + m] = z["embeddings"]
            ids[row:row + m] = z["ids"]
            mods[row:row + m] = z["modalities"]
            hashes[row:row + m] = z["content_hashes"]
            for r in range(m):
                text = str(z["captions"][r]) if z["modalities"][r, 0] else None
                line = (json.dumps({"id": int(z["ids"][r]), "caption": text}, ensure_ascii=False)
                        + "\n").encode("utf-8")
                cap.write(line)
                offsets[row + r + 1] = offsets[row + r] + len(line)
            row += m
    emb.flush()
    del emb
    uniq, cnt = np.unique(ids, return_counts=True)
    if uniq.shape[0] != total:
        raise ValueError(f"source {run['source']!r} gives duplicated document ids, e.g. "
                         f"{uniq[cnt > 1][:5].tolist()}: each document needs a distinct id")
    for name, arr in ((IDS_FILE, ids), (MODALITIES_FILE, mods), (CONTENT_HASHES_FILE, hashes),
                      (CAPTION_OFFSETS_FILE, offsets)):
        with open(os.path.join(out_dir, name + ".tmp"), "wb") as f:
            np.save(f, arr)
    for name in (EMBEDDINGS_FILE, CAPTIONS_FILE, IDS_FILE, MODALITIES_FILE, CONTENT_HASHES_FILE,
                 CAPTION_OFFSETS_FILE):
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    manifest = {
        "format_version": FORMAT_VERSION,
        "count": total,
        "dim": d,
        "embedding_model": encoder.identity,
        "clip_dir": encoder.clip_dir,
        "key": KEY_DEFINITION,
        "modality": run["modality"],
        "source": run["source"],
        "source_size": run["source_size"],
        "with_text": int(mods[:, 0].sum()),
        "with_image": int(mods[:, 1].sum()),
        "multimodal": int(mods.all(axis=1).sum()),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "batch_size": run["batch_size"],
        "chunk_size": run["chunk_size"],
        "files": {"embeddings": EMBEDDINGS_FILE, "ids": IDS_FILE, "modalities": MODALITIES_FILE,
                  "modality_columns": ["has_text", "has_image"], "content_hashes": CONTENT_HASHES_FILE,
                  "captions": CAPTIONS_FILE, "caption_offsets": CAPTION_OFFSETS_FILE},
    }
    tmp = os.path.join(out_dir, BANK_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, BANK_FILE))
    # The chunks are redundant once bank.json exists (a rerun returns at once).
    for c in range(num_chunks):
        os.remove(_chunk_path(out_dir, c))
    os.rmdir(os.path.join(out_dir, CHUNK_DIR))
    return manifest
