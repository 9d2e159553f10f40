"""Memory bank: keys against a direct NumPy computation from the model's own
encode outputs (text-only, image-only and multimodal documents), modality
options, bit-identical resumption after an interruption, skipped documents
counted, and the bad inputs."""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.data.sources import ShapesSource, SkippedDocument, open_source
from cm3leon_jax.data import shapes
from cm3leon_jax.data import shapes_corpus
from cm3leon_jax.data.clip_tokenizer import CLIPTextTokenizer
from cm3leon_jax.models.clip import CLIP, preprocess_images
from cm3leon_jax.models.clip_convert import load_clip
from cm3leon_jax.retrieval import embed
from cm3leon_jax.retrieval.bank import BANK_FILE, CHUNK_DIR, IDS_FILE, content_hash, load_bank, write_bank
from cm3leon_jax.retrieval.clip_encoder import ClipEncoder, parse_identity, same_model
from tiny_clip import shared_clip_dir


class ListSource:
    """An in-memory source: docs are (id, text, image) or an Exception to raise."""

    def __init__(self, docs, spec="list"):
        self.docs, self.spec = docs, spec

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        d = self.docs[i]
        if isinstance(d, Exception):
            raise d
        return {"id": np.int64(d[0]), "text": d[1], "image": d[2]}


@pytest.fixture(scope="module")
def clip_dir():
    return shared_clip_dir()


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return ClipEncoder(clip_dir, batch_size=4)


def _mixed_docs():
    ex = [shapes.generate_example(5, i, 32) for i in range(7)]
    return [(100, ex[0].caption, ex[0].image),   # both
            (101, ex[1].caption, None),          # text only
            (102, None, ex[2].image),            # image only
            (103, ex[3].caption, ex[3].image),
            (104, "", ex[4].image),              # empty text = no text
            (105, ex[5].caption, None),
            (106, ex[6].caption, ex[6].image)]


def _direct(clip_dir, texts, images):
    """The model's own outputs on the whole list at once (no batching, no
    padding), normalised in float64 NumPy."""
    cfg, params = load_clip(clip_dir)
    model = CLIP(cfg)
    out = []
    if texts:
        ids, mask = CLIPTextTokenizer.from_model_dir(clip_dir)(texts)
        out.append(jax.jit(lambda p, a, b: model.apply({"params": p}, a, b, method=CLIP.encode_text))(
            params, jnp.asarray(ids), jnp.asarray(mask)))
    else:
        out.append(None)
    if images:
        out.append(jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))(
            params, jnp.asarray(preprocess_images(images, cfg))))
    else:
        out.append(None)
    return [None if e is None else np.asarray(e, np.float64) / np.linalg.norm(np.asarray(e, np.float64), axis=1,
                                                                              keepdims=True) for e in out]


def test_keys_match_numpy_from_the_models_own_outputs(tmp_path, clip_dir, encoder):
    docs = _mixed_docs()
    man = embed.embed_source(ListSource(docs), clip_dir, str(tmp_path / "bank"), modality="both",
                             chunk_size=5, progress=False, encoder=encoder)  # chunks of 5 and 2, padded batches
    assert man["complete"] and man["count"] == 7 and man["dim"] == 32
    assert (man["with_text"], man["with_image"], man["multimodal"]) == (5, 5, 3)
    assert man["embedding_model"] == encoder.identity and encoder.identity.startswith(f"clip:{clip_dir}#")
    texts = [d[1] for d in docs if d[1]]
    images = [d[2] for d in docs if d[2] is not None]
    t, i = _direct(clip_dir, texts, images)
    t_of = {d[0]: t[k] for k, d in enumerate(d for d in docs if d[1])}
    i_of = {d[0]: i[k] for k, d in enumerate(d for d in docs if d[2] is not None)}
    want = np.stack([np.mean([e[d[0]] for e in (t_of, i_of) if d[0] in e], axis=0) for d in docs])

    bank = load_bank(str(tmp_path / "bank"))
    np.testing.assert_array_equal(bank.ids, [100, 101, 102, 103, 104, 105, 106])
    np.testing.assert_allclose(bank.embeddings, want, atol=2e-6)
    # not re-normalised: single-modality keys have norm 1, multimodal ones less
    norms = np.linalg.norm(bank.embeddings, axis=1)
    np.testing.assert_allclose(norms[[1, 2, 4, 5]], 1.0, atol=1e-6)
    assert (norms[[0, 3, 6]] < 0.999).all()
    np.testing.assert_array_equal(bank.modalities, [[1, 1], [1, 0], [0, 1], [1, 1], [0, 1], [1, 0], [1, 1]])
    assert [bank.caption(r) for r in range(7)] == [d[1] or None for d in docs]
    assert bank.rows([104, 999, 100]).tolist() == [4, -1, 0]
    # the content hash tells exact copies apart from the rest
    assert len(set(bank.content_hashes.tolist())) == 7
    assert content_hash(docs[0][1], docs[0][2]) == bank.content_hashes[0]
    assert not os.path.exists(tmp_path / "bank" / CHUNK_DIR)  # consolidated


@pytest.mark.parametrize("modality", ["text", "image"])
def test_single_modality_keys(tmp_path, clip_dir, encoder, modality):
    docs = _mixed_docs()
    man = embed.embed_source(ListSource(docs), clip_dir, str(tmp_path / modality), modality=modality,
                             progress=False, encoder=encoder)
    col = 1 if modality == "text" else 2
    kept = [d for d in docs if (d[col] if modality == "text" else d[col] is not None)]
    assert man["count"] == len(kept) == 5
    assert man["skipped"] == {f"no {modality} (modality={modality})": 2}
    t, i = (_direct(clip_dir, [d[1] for d in kept], []) if modality == "text"
            else _direct(clip_dir, [], [d[2] for d in kept]))
    bank = load_bank(str(tmp_path / modality))
    np.testing.assert_allclose(bank.embeddings, t if modality == "text" else i, atol=2e-6)
    # modalities describe the documents, not the key
    assert bank.modalities[:, 0].sum() + bank.modalities[:, 1].sum() > len(kept)


def _files(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, name))}


def test_resume_after_interruption_is_bit_identical(tmp_path, clip_dir, encoder):
    src = ShapesSource(30, seed=2, resolution=32)
    kw = dict(chunk_size=8, progress=False, encoder=encoder)
    full = embed.embed_source(src, clip_dir, str(tmp_path / "full"), **kw)
    assert full["resumed_chunks"] == 0 and full["count"] == 30

    # killed after 3 of 4 chunks; the last chunk file was never renamed from .tmp
    part = str(tmp_path / "part")
    r = embed.embed_source(src, clip_dir, part, stop_after_chunks=3, **kw)
    assert r == {"complete": False, "chunks_done": 3, "chunks_total": 4, "resumed_chunks": 0}
    assert not os.path.exists(os.path.join(part, BANK_FILE))
    with pytest.raises(FileNotFoundError, match="unfinished `cm3leon embed`"):
        load_bank(part)
    chunk_dir = os.path.join(part, CHUNK_DIR)
    assert sorted(os.listdir(chunk_dir)) == ["000000.npz", "000001.npz", "000002.npz"]
    os.remove(os.path.join(chunk_dir, "000002.npz"))                      # lost with the machine
    with open(os.path.join(chunk_dir, "000003.npz.tmp"), "wb") as f:      # a torn write
        f.write(b"PK\x03\x04 half a zip")
    # another run's flags are refused, naming the difference
    with pytest.raises(ValueError, match="chunk_size: 8 there vs 16 now"):
        embed.embed_source(src, clip_dir, part, chunk_size=16, progress=False, encoder=encoder)
    done = embed.embed_source(src, clip_dir, part, **kw)
    assert done["complete"] and done["resumed_chunks"] == 2
    assert _files(part) == _files(str(tmp_path / "full"))
    again = embed.embed_source(src, clip_dir, part, **kw)  # finished: nothing to do
    assert again["count"] == 30 and again["resumed_chunks"] is None


def test_skipped_documents_are_counted(tmp_path, clip_dir, encoder):
    d = tmp_path / "folder"
    shapes_corpus.write_corpus(str(d), seed=0, num=4, resolution=32)
    (d / "00002.png").write_bytes(b"garbage, not an image")
    with open(d / "captions.jsonl", "a") as f:
        f.write("not json\n")
    src = open_source(f"image_folder:{d}", resolution=32)
    man = embed.embed_source(src, clip_dir, str(tmp_path / "bank"), progress=False, encoder=encoder)
    assert man["count"] == 3
    assert man["skipped"] == {"corrupt or truncated image": 1, "captions.jsonl line is not JSON": 1}
    assert man["skipped_examples"] == [[2, "corrupt or truncated image"]]
    np.testing.assert_array_equal(load_bank(str(tmp_path / "bank")).ids, [0, 1, 3])


def test_empty_and_all_skipped_sources(tmp_path, clip_dir, encoder):
    with pytest.raises(ValueError, match="source 'list' has no documents"):
        embed.embed_source(ListSource([]), clip_dir, str(tmp_path / "a"), progress=False, encoder=encoder)
    bad = ListSource([SkippedDocument(0, "corrupt or truncated image"), (1, None, None)], spec="bad")
    with pytest.raises(ValueError, match=r"no document of source 'bad' could be embedded.*"
                                         r"corrupt or truncated image.*empty document"):
        embed.embed_source(bad, clip_dir, str(tmp_path / "b"), progress=False, encoder=encoder)


def test_identity_matches_by_fingerprint(tmp_path, clip_dir, encoder):
    copy = str(tmp_path / "copy")
    shutil.copytree(clip_dir, copy)
    moved = ClipEncoder(copy, batch_size=4)
    assert moved.identity != encoder.identity and moved.fingerprint == encoder.fingerprint
    assert same_model(moved.identity, encoder.identity)
    assert parse_identity(moved.identity) == (copy, encoder.fingerprint)
    assert not same_model(encoder.identity, f"clip:{clip_dir}#0123456789abcdef")
    assert parse_identity("clip-vit-b32") == (None, None)


def test_bank_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bank(str(tmp_path / "nope"))
    d = tmp_path / "bank"
    write_bank(str(d), np.eye(3, 4), [7, 8, 9], embedding_model="m")
    assert load_bank(str(d)).rows([9]).tolist() == [2]
    np.save(d / IDS_FILE, np.arange(2))
    with pytest.raises(ValueError, match=r"ids.npy is int64 \(2,\), bank.json says int64 \(3,\)"):
        load_bank(str(d))
    (d / BANK_FILE).write_text("{broken")
    with pytest.raises(ValueError, match="corrupt bank manifest"):
        load_bank(str(d))
