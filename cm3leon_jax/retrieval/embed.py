"""The memory bank: CLIP keys for every document of a source.

CM3Leon's retriever (PAPER.md, "Retrieval augmentation"; paper Sec. 2.1,
after RA-CM3) is a frozen CLIP bi-encoder; a document's key is the mean of
the L2-normalised embeddings of the modalities it has, and retrieval is
maximum inner product search over the keys. This module computes those keys
for a whole document source (`cm3leon_jax.data.sources`) in one batched,
jitted job:

    cm3leon embed --clip_dir=DIR --source=shapes:2000 --out=BANK_DIR

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
import hashlib
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cm3leon_jax import paths as paths_lib
from cm3leon_jax.id_lookup import IdLookup

FORMAT_VERSION = 1
BANK_FILE = "bank.json"
RUN_FILE = "embed_run.json"
CHUNK_DIR = "chunks"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"
MODALITIES_FILE = "modalities.npy"
CONTENT_HASHES_FILE = "content_hashes.npy"
CAPTIONS_FILE = "captions.jsonl"
CAPTION_OFFSETS_FILE = "caption_offsets.npy"
MODALITIES = ("both", "text", "image")
KEY_DEFINITION = ("mean of the L2-normalised CLIP embeddings of the modalities used, not re-normalised "
                  "(CM3Leon Sec. 2.1)")
IDENTITY_PREFIX = "clip:"


# --------------------------------------------------------------------------- the encoder


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def model_fingerprint(cfg, params, tokenizer_files: Sequence[str]) -> str:
    """16 hex digits of SHA-256 over the config, every parameter (path and
    bytes, in path order) and the tokenizer files: two model dirs holding
    the same model give the same fingerprint wherever they live."""
    import jax

    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    for file in sorted(tokenizer_files):
        h.update(os.path.basename(file).encode())
        with open(file, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def make_identity(clip_dir: str, fingerprint: str) -> str:
    """The `embedding_model` string of banks and indexes: where the CLIP
    lives (so `index search` can find it) and what it is (the fingerprint,
    which is what must match)."""
    return f"{IDENTITY_PREFIX}{os.path.abspath(clip_dir)}#{fingerprint}"


def parse_identity(identity: str) -> Tuple[Optional[str], Optional[str]]:
    """(clip dir, fingerprint) of `make_identity`'s string; (None, None) for
    another kind of name (an index built from keys of unknown origin)."""
    if not isinstance(identity, str) or not identity.startswith(IDENTITY_PREFIX) or "#" not in identity:
        return None, None
    path, _, fp = identity[len(IDENTITY_PREFIX):].rpartition("#")
    return path, fp


def same_model(a: str, b: str) -> bool:
    """True when two embedding-model names denote the same CLIP (equal
    fingerprints; the dirs may differ) or are equal strings."""
    fa, fb = parse_identity(a)[1], parse_identity(b)[1]
    return a == b or (fa is not None and fa == fb)


class ClipEncoder:
    """A CLIP model dir ready to embed: jitted text and image encoders over
    fixed [batch_size, ...] shapes, returning L2-normalised float32 rows."""

    def __init__(self, clip_dir: str, batch_size: int = 64, text_tokenizer: Optional[str] = None):
        import jax
        import jax.numpy as jnp

        from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
        from cm3leon_jax.models import clip as clip_lib
        from cm3leon_jax.models import clip_convert

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not os.path.isdir(clip_dir):
            raise ValueError(f"CLIP model dir {clip_dir!r} does not exist (import one with "
                             "`cm3leon convert clip --input=HF_DIR --out=DIR`)")
        self.clip_dir = os.path.abspath(clip_dir)
        self.batch_size = int(batch_size)
        self.cfg, params = clip_convert.load_clip(clip_dir)
        self.params = jax.tree.map(jnp.asarray, params)
        self.tokenizer = CLIPTextTokenizer.from_model_dir(clip_dir, text_tokenizer=text_tokenizer)
        model = clip_lib.CLIP(self.cfg)
        self._text = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                                              method=clip_lib.CLIP.encode_text))
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=clip_lib.CLIP.encode_image))
        if self.tokenizer.bpe is not None:
            tok_files = [self.tokenizer.bpe.path]
        else:
            tok_dir = os.path.join(clip_dir, clip_lib.TOKENIZER_SUBDIR)
            tok_files = [os.path.join(tok_dir, f) for f in clip_lib.HF_TOKENIZER_FILES
                         if os.path.isfile(os.path.join(tok_dir, f))]
        self.fingerprint = model_fingerprint(self.cfg, params, tok_files)
        self.identity = make_identity(clip_dir, self.fingerprint)

    @property
    def dim(self) -> int:
        return self.cfg.projection_dim

    # Inputs are prepared (tokenised / resized) apart from encoding so a
    # background thread can prepare the next chunk while XLA runs this one.
    def prepare_texts(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        return self.tokenizer(list(texts))

    def prepare_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from cm3leon_jax.models.clip import preprocess_images

        if not len(images):
            s = self.cfg.image_size
            return np.zeros((0, s, s, self.cfg.num_channels), np.float32)
        return preprocess_images(list(images), self.cfg)

    def _batched(self, fn, arrays: Tuple[np.ndarray, ...]) -> np.ndarray:
        n, b = arrays[0].shape[0], self.batch_size
        out = np.empty((n, self.dim), np.float32)
        for s in range(0, n, b):
            parts = [a[s:s + b] for a in arrays]
            m = parts[0].shape[0]
            if m < b:  # pad to the compiled shape; the padding rows are dropped
                parts = [np.concatenate([p, np.repeat(p[-1:], b - m, axis=0)]) for p in parts]
            out[s:s + m] = np.asarray(fn(self.params, *parts))[:m]
        return _normalise(out)

    def encode_prepared_texts(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._batched(self._text, (ids, mask))

    def encode_prepared_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._batched(self._image, (pixels,))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised text embeddings [len(texts), D] (a text query's key)."""
        return self.encode_prepared_texts(*self.prepare_texts(texts))

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised image embeddings of uint8 [H, W, 3] images."""
        return self.encode_prepared_images(self.prepare_images(images))


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


# --------------------------------------------------------------------------- chunks


def content_hash(text: Optional[str], image: Optional[np.ndarray]) -> np.uint64:
    h = hashlib.blake2b(digest_size=8)
    if text is not None:
        h.update(b"T" + text.encode("utf-8") + b"\0")
    if image is not None:
        a = np.ascontiguousarray(image)
        h.update(f"I{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return np.frombuffer(h.digest(), np.uint64)[0]


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
