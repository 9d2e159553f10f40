"""Tests of the byte-level BPE text tokenizer (its training,
cm3leon_jax/data/bpe_training.py, and its runtime, data/tokenizers.py), the
image-code vocabulary and their SeqIO wrappers (data/seqio_vocabularies.py)."""
from __future__ import annotations

import functools
import json
import os
import tempfile

import numpy as np
import pytest
import seqio
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3leon_jax.data import bpe_training
from cm3leon_jax.data import seqio_vocabularies as vocabs
from cm3leon_jax.data import tokenizers as tok_lib
from cm3leon_jax.vocab import UnifiedVocabulary

BPE_SIZE = 400
SMALL = UnifiedVocabulary(num_special_tokens=64, num_mask_tokens=32, image_codebook_size=1024,
                          text_vocab_size=BPE_SIZE)

_WORDS = ("a cat sits on the mat beside an old red barn under grey clouds while two dogs run "
          "photo of painting drawing of small large bright dark city street at night with lights "
          "café naïve résumé Straße Ærø 東京 の 写真 猫 犬 Москва фото кошка 🙂 🐈 👨‍👩‍👧 "
          "e\u0301 n\u0303 ١٢٣ مرحبا שלום").split()


def corpus_lines(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=rng.integers(3, 14))) for _ in range(n)]


def write_corpus(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@functools.lru_cache(maxsize=None)
def trained_dir() -> str:
    """One tokenizer per test module (hypothesis tests cannot take
    function-scoped fixtures, and training twice is wasted time)."""
    d = tempfile.mkdtemp(prefix="cm3_bpe_")
    src = write_corpus(os.path.join(d, "corpus.txt"), corpus_lines())
    return bpe_training.train_text_tokenizer([src], BPE_SIZE, os.path.join(d, "bpe"))


@functools.lru_cache(maxsize=None)
def tokenizer() -> tok_lib.TextTokenizer:
    return tok_lib.TextTokenizer(trained_dir(), SMALL)


# -- training --------------------------------------------------------------------

def test_train_writes_tokenizer_and_manifest_and_round_trips():
    d = trained_dir()
    assert os.path.isfile(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "manifest.json")) as f:
        m = json.load(f)
    assert m["vocab_size"] == BPE_SIZE
    assert m["learned_vocab_size"] == BPE_SIZE  # this corpus supports all merges
    assert m["num_merges"] == BPE_SIZE - 256
    assert len(m["source_files"]) == 1 and sum(m["num_documents"].values()) == 300
    assert m["date"]
    tok = tokenizer()
    assert tok.learned_vocab_size == tok.vocab_size == BPE_SIZE
    lines = corpus_lines()
    for line in lines[:50]:
        ids = tok.encode(line)
        assert ids.dtype == np.int32 and SMALL.is_text(ids).all()
        assert tok.decode(ids) == line
    doc = "\n".join(lines[:20])
    assert tok.decode(tok.encode(doc)) == doc
    # BPE actually compresses the training distribution.
    assert len(tok.encode(lines[0])) < len(lines[0].encode("utf-8"))
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_full_config_vocabulary_totals():
    v = UnifiedVocabulary()
    assert v.size == 64_512
    assert v.num_special_tokens + v.text_vocab_size == 56_320
    assert v.text_vocab_size == 56_256 and v.image_codebook_size == 8_192


# -- properties: arbitrary Unicode -------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_unicode_round_trips_to_text_ids(text):
    tok = tokenizer()
    ids = tok.encode(text)
    assert SMALL.is_text(ids).all()  # never a special, never an image code
    assert not SMALL.is_special(ids).any() and not SMALL.is_image(ids).any()
    assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", categories=["Lu", "Ll", "Mn", "So", "Zs", "Cc", "Nd"])),
       st.text(), st.sampled_from([0, 1, 2, 3, 4, 35, 63]))
def test_specials_are_skipped_and_batches_agree(a, b, special):
    tok = tokenizer()
    ids = np.concatenate([[special], tok.encode(a), [special, special], tok.encode(b)])
    assert tok.decode(ids) == a + b
    batch = tok.encode_batch([a, b])
    np.testing.assert_array_equal(batch[0], tok.encode(a))
    np.testing.assert_array_equal(batch[1], tok.encode(b))
    # SeqIO's decode stops at the first <eos> (=1).
    voc = vocabs.CM3TextVocabulary(trained_dir(), SMALL)
    assert voc.encode(a) == tok.encode(a).tolist()
    assert voc.decode(voc.encode(a) + [1] + voc.encode(b)) == a


def test_decode_image_ids_and_out_of_range():
    tok = tokenizer()
    text_ids = tok.encode("a cat 🐈")
    mixed = np.concatenate([text_ids, [SMALL.break_id], SMALL.image_code_to_id([5, 7]), [SMALL.eos_id]])
    with pytest.raises(ValueError, match="image ids"):
        tok.decode(mixed)
    assert tok.decode(mixed, skip_non_text=True) == "a cat 🐈"
    for bad in (-1, SMALL.size):
        with pytest.raises(ValueError, match="outside the unified vocabulary"):
            tok.decode([bad])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# -- SeqIO -------------------------------------------------------------------------

def test_seqio_task_tokenizes_like_text_tokenizer_and_decode_tf_round_trips():
    texts = ["a cat on the mat", "東京の写真 🙂", "", "naïve café\nnext line"]
    voc = vocabs.CM3TextVocabulary(trained_dir(), SMALL)
    assert voc.vocab_size == SMALL.size and voc.eos_id == 1 and voc.unk_id is None and voc.pad_id == 0
    assert voc == vocabs.CM3TextVocabulary(trained_dir(), SMALL)
    assert voc != vocabs.CM3ImageVocabulary(SMALL)

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"targets": texts})

    name = "test_cm3_text_vocab_task"
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(dataset_fn, splits=("train",)),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={"targets": seqio.Feature(vocabulary=voc, add_eos=False)})
    try:
        ds = seqio.get_mixture_or_task(name).get_dataset(
            sequence_length=None, split="train", shuffle=False, use_cached=False)
        examples = list(ds.as_numpy_iterator())
    finally:
        seqio.TaskRegistry.remove(name)
    assert name not in seqio.TaskRegistry.names()
    tok = tokenizer()
    assert len(examples) == len(texts)
    for ex, text in zip(examples, texts):
        np.testing.assert_array_equal(ex["targets"], tok.encode(text))
        assert ex["targets_pretokenized"].decode("utf-8") == text
        decoded = voc.decode_tf(tf.constant(ex["targets"], tf.int32))
        assert decoded.shape == () and decoded.numpy().decode("utf-8") == text

    # In-graph: encode_tf then decode_tf inside tf.data; a batched decode.
    ds = tf.data.Dataset.from_tensor_slices(texts).map(lambda s: voc.decode_tf(voc.encode_tf(s)))
    assert [s.decode("utf-8") for s in ds.as_numpy_iterator()] == texts
    ragged = voc.encode_tf(tf.constant(texts))
    assert isinstance(ragged, tf.RaggedTensor)
    dense = ragged.to_tensor(default_value=0)  # <pad> is skipped by decode
    out = voc.decode_tf(dense)
    assert out.shape == (len(texts),)
    assert [s.decode("utf-8") for s in out.numpy()] == texts
    # A mixed document decodes to its text, up to <eos>.
    doc = np.concatenate([tok.encode("a cat"), [2], SMALL.image_code_to_id([1, 2]), [1], tok.encode("x")])
    assert voc.decode_tf(tf.constant(doc, tf.int32)).numpy() == b"a cat"
    assert voc.decode(doc.tolist()) == "a cat"


def test_image_vocabulary_round_trip_and_range():
    voc = vocabs.CM3ImageVocabulary(SMALL)
    assert voc.vocab_size == SMALL.size and voc.eos_id == 1 and voc.unk_id is None
    codes = np.array([[0, 1, 2], [1021, 1022, 1023]])
    ids = voc.encode(codes)
    assert ids == (codes.reshape(-1) + SMALL.image_start).tolist()
    assert SMALL.is_image(ids).all()
    np.testing.assert_array_equal(voc.decode(ids), codes.reshape(-1))
    # Non-image ids dropped; decoding stops at <eos>.
    mixed = [SMALL.text_start + 3, SMALL.break_id] + ids + [SMALL.eos_id] + voc.encode([9])
    np.testing.assert_array_equal(voc.decode(mixed), codes.reshape(-1))
    assert voc.encode([]) == []
    for bad in ([-1], [1024], [[0, 5000]]):
        with pytest.raises(ValueError, match="image codes"):
            voc.encode(bad)
    with pytest.raises(TypeError):
        voc.encode("12")
    # TF.
    tf_ids = voc.encode_tf(tf.constant(codes))
    np.testing.assert_array_equal(tf_ids.numpy(), ids)
    np.testing.assert_array_equal(voc.decode_tf(tf.constant(mixed, tf.int32)).numpy(), codes.reshape(-1))
    batch = voc.decode_tf(tf.constant([ids, [0] * len(ids)], tf.int32))
    assert batch.to_list() == [codes.reshape(-1).tolist(), []]
    with pytest.raises(tf.errors.InvalidArgumentError):
        voc.encode_tf(tf.constant([3, 1024]))
    assert voc == vocabs.CM3ImageVocabulary(SMALL)
    assert voc != vocabs.CM3ImageVocabulary(UnifiedVocabulary(image_codebook_size=8, text_vocab_size=300))


# -- inputs, sizes, errors -------------------------------------------------------

def test_jsonl_captions_and_small_corpus_padding(tmp_path):
    src = tmp_path / "caps.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for line in ["a cat", "a dog", "a cat and a dog"] * 5:
            f.write(json.dumps({"caption": line, "url": "http://x"}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"url": "no caption"}) + "\n")
    size = 5000  # far more than this corpus can fill: padded, not a crash
    with pytest.warns(UserWarning, match="supports only"):
        out = bpe_training.train_text_tokenizer([str(src)], size, str(tmp_path / "bpe"))
    m = json.loads((tmp_path / "bpe" / "manifest.json").read_text())
    assert m["vocab_size"] == size and 256 < m["learned_vocab_size"] < size
    assert m["skipped_records"] == 1
    tok = tok_lib.TextTokenizer(out, UnifiedVocabulary(image_codebook_size=16, text_vocab_size=size))
    assert tok.learned_vocab_size == m["learned_vocab_size"]
    for text in ["a cat and a dog", "⟨unused:300⟩", "unseen: Ω≈ç√ 🙂"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert (tok.vocabulary.id_to_text_token(ids) < tok.learned_vocab_size).all()
    # The padding ids decode to nothing.
    pad_id = tok.vocabulary.text_start + size - 1
    assert tok.decode(np.concatenate([tok.encode("a cat"), [pad_id]])) == "a cat"


def test_bad_inputs(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="nope.txt"):
        bpe_training.train_text_tokenizer([missing], 300, str(tmp_path / "o"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        bpe_training.train_text_tokenizer([str(empty)], 300, str(tmp_path / "o"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="blank.txt.*no documents"):
        bpe_training.train_text_tokenizer([str(blank)], 300, str(tmp_path / "o"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"caption": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        bpe_training.train_text_tokenizer([str(bad_json)], 300, str(tmp_path / "o"))
    good = write_corpus(tmp_path / "good.txt", ["some text here"])
    with pytest.raises(ValueError, match="below 256"):
        bpe_training.train_text_tokenizer([good], 100, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="no tokenizer"):
        tok_lib.TextTokenizer(str(tmp_path / "o"), SMALL)


def test_tokenizer_trained_for_another_size_is_rejected():
    with pytest.raises(ValueError, match=f"trained for {BPE_SIZE} BPE ids.*text_vocab_size=56256"):
        tok_lib.TextTokenizer(trained_dir(), UnifiedVocabulary())
    with pytest.raises(ValueError, match="text_vocab_size = 400"):
        vocabs.CM3TextVocabulary(trained_dir(), UnifiedVocabulary(text_vocab_size=401))


def test_train_text_main(tmp_path, capsys):
    src = write_corpus(tmp_path / "c.txt", corpus_lines(100, seed=1))
    assert bpe_training.train_text_main([src], 300, str(tmp_path / "bpe")) == 0
    out = capsys.readouterr().out
    assert "read 100 documents" in out and "300 BPE ids" in out
    assert "UnifiedVocabulary.text_vocab_size = 300" in out
    tok_lib.TextTokenizer(str(tmp_path / "bpe" / "tokenizer.json"), UnifiedVocabulary(text_vocab_size=300))
    assert bpe_training.train_text_main([str(tmp_path / "missing.txt")], 300, str(tmp_path / "x")) == 1
    assert "missing.txt" in capsys.readouterr().err
