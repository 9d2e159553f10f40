"""The memory bank's format: one CLIP key per document, and how it is read.

A document's key (`document_keys`) is the mean of the L2-normalised CLIP
embeddings of the modalities it has (CM3Leon Sec. 2.1); retrieval is maximum
inner product search over the keys. `embed.embed_source` writes a bank for a
whole document source, `write_bank` one from keys computed elsewhere, and
`Bank` / `load_bank` read it.

The key is NOT re-normalised after the mean (`clip.document_key`): that is
the paper's definition, and the key's norm (1 for a single-modality
document, < 1 the more a document's text and image disagree) is part of the
score MIPS sees, so a multimodal document whose caption does not describe its
image ranks lower than one whose halves agree. Queries are single-modality
(normalised text or image embeddings), so scores stay in [-1, 1] and the
strategy's diversity threshold (0.9) keeps its meaning.

Output directory (`Bank` reads it):

    embeddings.npy      float32 [N, D] keys
    ids.npy             int64 [N] document ids (the source's), row order
    modalities.npy      bool [N, 2]: has_text, has_image of each document
    content_hashes.npy  uint64 [N]: 8-byte BLAKE2b of text + image bytes, a
                        de-duplication key for exact copies (strategy's
                        `Candidate.content_key`)
    captions.jsonl      {"id": ..., "caption": str | null} per row, with
    caption_offsets.npy int64 [N + 1] byte offsets for random access
    bank.json           manifest, written last (its absence = unfinished)
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import numpy as np

from cm3leon_jax import paths as paths_lib
from cm3leon_jax.id_lookup import IdLookup

FORMAT_VERSION = 1
BANK_FILE = "bank.json"
# `embed.embed_source`'s chunks while a bank is unfinished.
CHUNK_DIR = "chunks"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
MODALITIES_FILE = "modalities.npy"
CONTENT_HASHES_FILE = "content_hashes.npy"
CAPTIONS_FILE = "captions.jsonl"
CAPTION_OFFSETS_FILE = "caption_offsets.npy"
KEY_DEFINITION = ("mean of the L2-normalised CLIP embeddings of the modalities used, not re-normalised "
                  "(CM3Leon Sec. 2.1)")


def document_keys(text_emb: np.ndarray, image_emb: np.ndarray, has_text: np.ndarray,
                  has_image: np.ndarray) -> np.ndarray:
    """Keys [N, D] from normalised embeddings (rows of a missing modality are
    ignored): the mean of those present, as `clip.document_key`."""
    t = has_text[:, None].astype(np.float32)
    i = has_image[:, None].astype(np.float32)
    count = t + i
    if (count == 0).any():
        raise ValueError("document_keys: a document with neither text nor image has no key")
    return ((text_emb * t + image_emb * i) / count).astype(np.float32)


def content_hash(text: Optional[str], image: Optional[np.ndarray]) -> np.uint64:
    h = hashlib.blake2b(digest_size=8)
    if text is not None:
        h.update(b"T" + text.encode("utf-8") + b"\0")
    if image is not None:
        a = np.ascontiguousarray(image)
        h.update(f"I{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return np.frombuffer(h.digest(), np.uint64)[0]


def write_bank(out_dir: str, embeddings, ids, embedding_model: str, modalities=None,
               captions: Optional[Sequence[Optional[str]]] = None, content_hashes=None, **manifest_extra) -> dict:
    """A bank from keys computed elsewhere (tests, imported keys), in the
    layout `embed_source` writes. Modalities default to text + image,
    captions to None, content hashes to the ids' hash."""
    emb = np.ascontiguousarray(embeddings, np.float32)
    ids = np.asarray(ids, np.int64)
    n = ids.shape[0]
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"write_bank: embeddings {emb.shape} do not match {n} ids")
    mods = np.ones((n, 2), bool) if modalities is None else np.asarray(modalities, bool).reshape(n, 2)
    captions = [None] * n if captions is None else list(captions)
    hashes = (np.array([content_hash(str(int(i)), None) for i in ids], np.uint64).reshape(n)
              if content_hashes is None else np.asarray(content_hashes, np.uint64))
    os.makedirs(out_dir, exist_ok=True)
    offsets = [0]
    with open(os.path.join(out_dir, CAPTIONS_FILE), "wb") as f:
        for i, c in zip(ids.tolist(), captions):
            line = (json.dumps({"id": i, "caption": c}, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            offsets.append(offsets[-1] + len(line))
    for name, arr in ((EMBEDDINGS_FILE, emb), (IDS_FILE, ids), (MODALITIES_FILE, mods),
                      (CONTENT_HASHES_FILE, hashes), (CAPTION_OFFSETS_FILE, np.array(offsets, np.int64))):
        np.save(os.path.join(out_dir, name), arr)
    manifest = {"format_version": FORMAT_VERSION, "count": int(n), "dim": int(emb.shape[1]),
                "embedding_model": embedding_model, "key": KEY_DEFINITION, **manifest_extra}
    with open(os.path.join(out_dir, BANK_FILE), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# --------------------------------------------------------------------------- reading a bank


class Bank:
    """A finished memory bank (see the module docstring); arrays are
    memory-mapped, captions read by offset."""

    def __init__(self, path: str, mmap: bool = True):
        self.path = path
        if not paths_lib.isdir(path):  # local, or gs:// (arrays read into memory, no mmap)
            raise FileNotFoundError(f"bank directory {path!r} does not exist: make one with "
                                    "`cm3leon embed --clip_dir=... --source=... --out=DIR`")
        man_path = os.path.join(path, BANK_FILE)
        if not paths_lib.isfile(man_path):
            hint = ("an unfinished `cm3leon embed` (rerun the same command to finish it)"
                    if paths_lib.isdir(os.path.join(path, CHUNK_DIR)) else "not a memory bank")
            raise FileNotFoundError(f"{path!r} has no {BANK_FILE}: {hint}")
        try:
            with paths_lib.open(man_path) as f:
                man = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt bank manifest {man_path!r} (not valid JSON: {e}); embed again") from e
        missing = [k for k in ("format_version", "count", "dim", "embedding_model")
                   if not isinstance(man, dict) or k not in man]
        if missing:
            raise ValueError(f"corrupt bank manifest {man_path!r}: missing field(s) {missing}; embed again")
        if man["format_version"] != FORMAT_VERSION:
            raise ValueError(f"bank {path!r} has format version {man['format_version']!r}, this code reads "
                             f"{FORMAT_VERSION}: embed again")
        self.manifest = man
        self.embedding_model = man["embedding_model"]
        mode = "r" if mmap else None

        def load(name, shape, dtype):
            full = os.path.join(path, name)
            if not paths_lib.isfile(full):
                raise FileNotFoundError(f"bank {path!r} is missing {name}: embed again")
            try:
                a = paths_lib.load_npy(full, mmap_mode=mode)
            except (ValueError, OSError) as e:
                raise ValueError(f"bank {path!r}: {name} is unreadable ({e}); embed again") from e
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"bank {path!r}: {name} is {a.dtype} {a.shape}, {BANK_FILE} says "
                                 f"{np.dtype(dtype)} {shape}; embed again")
            return a

        n, d = man["count"], man["dim"]
        self.embeddings = load(EMBEDDINGS_FILE, (n, d), np.float32)
        self.ids = np.asarray(load(IDS_FILE, (n,), np.int64))
        self.modalities = np.asarray(load(MODALITIES_FILE, (n, 2), bool))
        self.content_hashes = np.asarray(load(CONTENT_HASHES_FILE, (n,), np.uint64))
        self._offsets = load(CAPTION_OFFSETS_FILE, (n + 1,), np.int64)
        self._row = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def rows(self, doc_ids) -> np.ndarray:
        """Row numbers of document ids (-1 where the bank lacks the id)."""
        if self._row is None:
            self._row = IdLookup(self.ids)
        return self._row(doc_ids)

    def caption(self, row: int) -> Optional[str]:
        start, stop = int(self._offsets[row]), int(self._offsets[row + 1])
        with paths_lib.open(os.path.join(self.path, CAPTIONS_FILE), "rb") as f:
            f.seek(start)
            return json.loads(f.read(stop - start).decode("utf-8"))["caption"]


def load_bank(path: str, mmap: bool = True) -> Bank:
    return Bank(path, mmap=mmap)
