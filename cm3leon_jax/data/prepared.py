"""Reading a `cm3leon prepare` output (data/prepare.py writes it).

Record format: one msgpack map per record (keys: the list in
data/prepare_worker.py's docstring; arrays as raw
little-endian bytes: `text_ids`/`image_ids` "<i4", embeddings "<f4"; "v" is
the format version); `decode_record` reads one.

Reading: `PreparedDataset(DIR)` is a random-access source over all shards
(grain's `ArrayRecordDataSource`, so `grain.MapDataset.source(ds)` works),
`ds[i]` a decoded record, `ds.by_id(doc_id)` the record of a document id (the
retriever names neighbours by id). It also speaks the document-source
protocol (`spec` = "prepared:DIR", `open_source("prepared:DIR")`): "text" is
the caption and, with `decode_images=True` (what `open_source` gives),
"image" is the VQ-GAN reconstruction of the stored codes. `cm3leon embed
--source=prepared:DIR` with the CLIP the dataset was prepared with writes the
bank from the stored embeddings (`bank_from_prepared`, no model runs, the
original images' keys); with another CLIP it embeds the reconstructions.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np

from cm3leon_jax import paths as paths_lib
from cm3leon_jax.id_lookup import IdLookup
from cm3leon_jax.data.documents import check_index

FORMAT_VERSION = 1
MANIFEST_FILE = "prepared.json"
IDS_FILE = "ids.npy"
RECORD_SUFFIX = ".array_record"
PREPARED_KIND = "prepared"


def open_prepared(rest: str) -> "PreparedDataset":
    if not rest:
        raise ValueError("bad source spec 'prepared:': expected prepared:DIR (a `cm3leon prepare` output)")
    return PreparedDataset(rest, decode_images=True)


# =========================================================================== records


def encode_record(rec: dict) -> bytes:
    """One record (see the module docstring) -> msgpack bytes."""
    import msgpack

    def raw(a, dtype):
        return np.ascontiguousarray(a, dtype=dtype).tobytes()

    return msgpack.packb({
        "v": FORMAT_VERSION,
        "id": int(rec["id"]),
        "index": int(rec["index"]),
        "caption": rec["caption"],
        "text_ids": raw(rec["text_ids"], "<i4"),
        "image_ids": raw(rec["image_ids"], "<i4"),
        "text_embedding": raw(rec["text_embedding"], "<f4"),
        "image_embedding": raw(rec["image_embedding"], "<f4"),
        "has_text": bool(rec["has_text"]),
        "has_image": bool(rec["has_image"]),
        "num_text_tokens": int(rec["num_text_tokens"]),
        "text_truncated": bool(rec["text_truncated"]),
        "content_hash": int(rec["content_hash"]),
    }, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    """msgpack bytes of `encode_record` -> the record with NumPy arrays
    (int32 ids, float32 embeddings, int64 id, uint64 content hash)."""
    import msgpack

    m = msgpack.unpackb(data, raw=False)
    if m.get("v") != FORMAT_VERSION:
        raise ValueError(f"prepared record of format version {m.get('v')!r}; this code reads {FORMAT_VERSION}")
    return {
        "id": np.int64(m["id"]),
        "index": int(m["index"]),
        "caption": m["caption"],
        "text_ids": np.frombuffer(m["text_ids"], "<i4").astype(np.int32),
        "image_ids": np.frombuffer(m["image_ids"], "<i4").astype(np.int32),
        "text_embedding": np.frombuffer(m["text_embedding"], "<f4").astype(np.float32),
        "image_embedding": np.frombuffer(m["image_embedding"], "<f4").astype(np.float32),
        "has_text": bool(m["has_text"]),
        "has_image": bool(m["has_image"]),
        "num_text_tokens": int(m["num_text_tokens"]),
        "text_truncated": bool(m["text_truncated"]),
        "content_hash": np.uint64(m["content_hash"]),
    }



# =========================================================================== the reader


class PreparedDataset:
    """Random access over a `cm3leon prepare` output (see the module
    docstring): `len(ds)`, `ds[i]` (position in record order), `ds.by_id(id)`,
    `ds.ids` (int64, record order), `ds.manifest`, `ds.vocabulary`.

    A record is a dict: id (np.int64), index, caption, text (= caption),
    text_ids, image_ids (int32 unified ids), text_embedding,
    image_embedding (float32, L2-normalised; zeros for a missing half),
    has_text, has_image, num_text_tokens, text_truncated, content_hash, and
    with `decode_images=True` "image", the VQ-GAN reconstruction (uint8)
    decoded with the model dir the manifest names."""

    kind = PREPARED_KIND

    def __init__(self, path: str, decode_images: bool = False):
        self.path = paths_lib.abspath(path)  # local, or gs:// (ArrayRecord reads GCS itself)
        self.spec = f"{PREPARED_KIND}:{self.path}"
        self.decode_images = bool(decode_images)
        man_path = os.path.join(path, MANIFEST_FILE)
        if not paths_lib.isdir(path):
            raise ValueError(f"prepared dataset {path!r} does not exist: make one with `cm3leon prepare "
                             "--source=... --out=DIR ...`")
        if not paths_lib.isfile(man_path):
            raise ValueError(f"{path!r} has no {MANIFEST_FILE}: not a prepared dataset")
        try:
            with paths_lib.open(man_path) as f:
                man = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"corrupt manifest {man_path!r} ({e}): prepare again") from None
        if not isinstance(man, dict) or man.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{man_path!r}: format version {man.get('format_version') if isinstance(man, dict) else None!r}, "
                             f"this code reads {FORMAT_VERSION}: prepare again")
        if not man.get("complete"):
            raise ValueError(f"prepared dataset {path!r} is unfinished: rerun the same `cm3leon prepare` to "
                             "complete it")
        self.manifest = man
        self.skipped = dict(man.get("skipped", {}))
        files = [os.path.join(self.path, s["file"]) for s in man["shards"] if s.get("count")]
        from grain.sources import ArrayRecordDataSource

        self.records = ArrayRecordDataSource(files)
        if len(self.records) != man["count"]:
            raise ValueError(f"prepared dataset {path!r}: {len(self.records)} records on disk, the manifest says "
                             f"{man['count']}: rerun `cm3leon prepare`")
        self.ids = paths_lib.load_npy(os.path.join(self.path, man.get("ids", IDS_FILE)))
        if self.ids.shape != (man["count"],):
            raise ValueError(f"prepared dataset {path!r}: {IDS_FILE} has shape {self.ids.shape}, expected "
                             f"({man['count']},): rerun `cm3leon prepare`")
        self._sorted = None
        self._decoder = None

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def vocabulary(self):
        from cm3leon_jax import vocab as vocab_lib

        return vocab_lib.UnifiedVocabulary(**self.manifest["settings"]["vocabulary"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def clip_identity(self) -> str:
        return self.manifest["models"]["clip_identity"]

    def _decode(self, raw: bytes) -> dict:
        rec = decode_record(raw)
        rec["text"] = rec["caption"]
        if self.decode_images and rec["has_image"]:
            rec["image"] = self.reconstruct(rec["image_ids"])
        return rec

    def __getitem__(self, index) -> dict:
        index = check_index(index, len(self))
        return self._decode(self.records[index])

    def __getitems__(self, indices: Sequence[int]) -> List[dict]:
        idx = [check_index(i, len(self)) for i in indices]
        return [self._decode(r) for r in self.records.__getitems__(idx)]

    def positions(self, doc_ids) -> np.ndarray:
        """Record positions of document ids (-1 where absent)."""
        if self._sorted is None:
            self._sorted = IdLookup(self.ids)
        return self._sorted(doc_ids)

    def by_id(self, doc_id: int) -> dict:
        pos = int(self.positions(np.int64(doc_id)))
        if pos < 0:
            raise KeyError(f"document id {doc_id} is not in prepared dataset {self.path!r}")
        return self[pos]

    def image_codes(self, image_ids) -> np.ndarray:
        """Unified image ids -> VQ codebook indices."""
        return self.vocabulary.id_to_image_code(np.asarray(image_ids)).astype(np.int32)

    def reconstruct(self, image_ids) -> np.ndarray:
        """The uint8 image the VQ-GAN decodes from unified image ids."""
        if self._decoder is None:
            from cm3leon_jax.models.image_tokenizer import ImageTokenizer

            self._decoder = ImageTokenizer.from_model_dir(self.manifest["models"]["vqgan_dir"], batch_size=1)
        return self._decoder.decode(self.image_codes(image_ids))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_decoder"] = None
        return state


def load_prepared(path: str, decode_images: bool = False) -> PreparedDataset:
    return PreparedDataset(path, decode_images=decode_images)


# =========================================================================== bank from stored keys


def bank_from_prepared(ds: PreparedDataset, clip_dir: str, out_dir: str, modality: str = "both",
                       text_tokenizer: Optional[str] = None) -> Optional[dict]:
    """The memory bank (`retrieval.bank` layout) of a prepared dataset from
    its stored embeddings, when `clip_dir` holds the CLIP it was prepared with
    (same fingerprint); None otherwise (the caller embeds the documents). A
    document's key is `bank.document_keys` of the stored embeddings, as
    `embed_source` computes it."""
    from cm3leon_jax.retrieval.bank import BANK_FILE, document_keys, write_bank
    from cm3leon_jax.retrieval.clip_encoder import ClipEncoder, same_model
    from cm3leon_jax.retrieval.embed import MODALITIES

    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
    encoder = ClipEncoder(clip_dir, batch_size=1, text_tokenizer=text_tokenizer)
    if not same_model(encoder.identity, ds.clip_identity):
        return None
    n, d = len(ds), ds.embedding_dim
    text_emb, image_emb = np.zeros((n, d), np.float32), np.zeros((n, d), np.float32)
    has_t, has_i = np.zeros(n, bool), np.zeros(n, bool)
    hashes, captions, ids = np.zeros(n, np.uint64), [], np.zeros(n, np.int64)
    decode = ds.decode_images
    ds.decode_images = False
    try:
        for r in range(n):
            rec = ds[r]
            ids[r], hashes[r] = rec["id"], rec["content_hash"]
            has_t[r], has_i[r] = rec["has_text"], rec["has_image"]
            text_emb[r], image_emb[r] = rec["text_embedding"], rec["image_embedding"]
            captions.append(rec["caption"])
    finally:
        ds.decode_images = decode
    use_t = has_t & (modality != "image")
    use_i = has_i & (modality != "text")
    keep = use_t | use_i
    skipped = dict(ds.skipped)
    if (~keep).any():
        skipped[f"no {modality} (modality={modality})"] = int((~keep).sum())
    if not keep.any():
        raise ValueError(f"prepared dataset {ds.path!r} has no document with {modality}")
    keys = document_keys(text_emb[keep], image_emb[keep], use_t[keep], use_i[keep])
    mods = np.stack([has_t, has_i], axis=1)[keep]
    existing = os.path.join(out_dir, BANK_FILE)
    if os.path.exists(existing):
        with open(existing) as f:
            old = json.load(f)
        if old.get("source") != ds.spec or not same_model(str(old.get("embedding_model")), encoder.identity) \
                or old.get("modality") != modality:
            raise ValueError(f"output dir {out_dir!r} holds another bank (source {old.get('source')!r}, modality "
                             f"{old.get('modality')!r}): use another --out, or delete it")
    manifest = write_bank(
        out_dir, keys, ids[keep], encoder.identity, modalities=mods,
        captions=[c for c, k in zip(captions, keep) if k], content_hashes=hashes[keep],
        clip_dir=encoder.clip_dir, modality=modality, source=ds.spec, source_size=n,
        with_text=int(mods[:, 0].sum()), with_image=int(mods[:, 1].sum()), multimodal=int(mods.all(axis=1).sum()),
        skipped=dict(sorted(skipped.items())), from_prepared=True)
    return dict(manifest, complete=True, resumed_chunks=0)
