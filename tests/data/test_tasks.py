"""The SeqIO tasks (data/tasks.py) on a shapes task-data dir built by the real
commands' code (tests/data/task_data.py): packed DecoderFeatureConverter
features checked token by token, the neighbours the strategy picks, the
retrieval-set count, splits, host shards, determinism, per-epoch
reshuffling, the mixture, and the errors."""
from __future__ import annotations

import collections
import os
import sys

import numpy as np
import pytest
import seqio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from task_data import shapes_task_data  # noqa: E402

from cm3leon_jax.data import cm3, pipeline, retrieval_aug, tasks  # noqa: E402
from cm3leon_jax.data.prepared import PreparedDataset  # noqa: E402
from cm3leon_jax.retrieval import strategy  # noqa: E402
from cm3leon_jax.retrieval.neighbours import NeighbourTable  # noqa: E402
from cm3leon_jax.vocab import EOS_ID  # noqa: E402

L = 128


@pytest.fixture(scope="module")
def data_dir():
    d = shapes_task_data()
    old = os.environ.get(tasks.SHAPES_DATA_ENV)
    os.environ[tasks.SHAPES_DATA_ENV] = d
    yield d
    if old is None:
        os.environ.pop(tasks.SHAPES_DATA_ENV, None)
    else:
        os.environ[tasks.SHAPES_DATA_ENV] = old


@pytest.fixture(scope="module")
def prepared(data_dir):
    return PreparedDataset(os.path.join(data_dir, "prepared"))


@pytest.fixture(scope="module")
def table(data_dir):
    return NeighbourTable(os.path.join(data_dir, "bank"))


def _examples(name, n, split="train", shuffle=True, seed=0, shard=None, num_epochs=1, length=L):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset({"targets": length}, split=split, shuffle=shuffle, seed=seed,
                          shard_info=shard, num_epochs=num_epochs)
    return list(ds.take(n).as_numpy_iterator())


def _docs(targets):
    """The `<eos>`-terminated documents of a sequence, CM3 undone."""
    t = np.asarray(targets)
    pieces = np.split(t, np.flatnonzero(t == EOS_ID) + 1)
    return [cm3.cm3_inverse(p)[:-1] for p in pieces if p.size and p[-1] == EOS_ID]


def _is_document(tokens, doc):
    return any(np.array_equal(tokens, retrieval_aug.document_tokens(doc, o)) for o in retrieval_aug.ORDERS)


def test_packed_features_have_correct_segments_and_positions(data_dir):
    L = 256  # holds two of these ~100-token sequences
    raw = [ex["targets"] for ex in _examples(tasks.SHAPES_RETRIEVAL_TASK, 400, length=L)]
    known = {tuple(t.tolist()) for t in raw}
    ds = seqio.get_dataset(tasks.SHAPES_RETRIEVAL_TASK, {"targets": L}, dataset_split="train", shuffle=True,
                           seed=0, feature_converter=seqio.DecoderFeatureConverter(pack=True),
                           use_cached=False, num_epochs=1)
    rows = list(ds.take(40).as_numpy_iterator())
    assert set(rows[0]) == {"decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
                            "decoder_segment_ids", "decoder_positions"}
    segments_seen, packed_rows = 0, 0
    for r in rows:
        tgt, inp, w = r["decoder_target_tokens"], r["decoder_input_tokens"], r["decoder_loss_weights"]
        seg, pos = r["decoder_segment_ids"], r["decoder_positions"]
        assert all(a.shape == (L,) for a in (tgt, inp, w, seg, pos))
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and (seg[n:] == 0).all()          # padding only at the end
        assert (tgt[n:] == 0).all() and (w[n:] == 0).all() and (pos[n:] == 0).all()
        assert np.array_equal(w[:n], np.ones(n))                       # every real token is trained on
        ids = seg[:n]
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all()
        packed_rows += int(ids[-1] > 1)
        for s in range(1, int(ids[-1]) + 1):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(pos[where], np.arange(len(where)))   # positions restart per segment
            t = tgt[where]
            assert inp[where[0]] == 0 and np.array_equal(inp[where[1:]], t[:-1])  # shifted, BOS 0
            assert tuple(t.tolist()) in known                           # an example of the task, whole
            segments_seen += 1
    assert packed_rows > 0 and segments_seen > len(rows)  # packing really happened


def test_validation_examples_hold_the_strategys_neighbours(data_dir, prepared, table):
    exs = _examples(tasks.SHAPES_RETRIEVAL_TASK, 10, split="validation", shuffle=False, length=4096)
    val_ids = tasks._task_data(tasks.SHAPES_RETRIEVAL_TASK, tasks._shapes_prepared, tasks._shapes_bank,
                               validation_fraction=0.01, num_retrieved=None, num_sets=None, image_first_prob=None,
                               query_dropout=True).split_ids["validation"]
    assert [int(e["query_id"]) for e in exs] == val_ids.tolist()  # one sequence per validation pair
    for ex in exs:
        q = int(ex["query_id"])
        want = strategy.select(table.candidates(q), 2, exclude_ids=(q,))
        assert len(want) == 2 and q not in [c.doc_id for c in want]
        assert want[0].score >= want[1].score
        docs = _docs(ex["targets"])
        assert len(docs) == 3
        for tokens, c in zip(docs[:2], want):                           # retrieved first, in order
            assert _is_document(tokens, prepared.by_id(c.doc_id))
        assert _is_document(docs[2], prepared.by_id(q))                 # the query last


def test_training_gives_three_sampled_sets_per_pair_without_validation_docs(data_dir, prepared):
    exs = _examples(tasks.SHAPES_RETRIEVAL_TASK, 60, shuffle=False, length=4096)
    data = tasks._task_data(tasks.SHAPES_RETRIEVAL_TASK, tasks._shapes_prepared, tasks._shapes_bank,
                            validation_fraction=0.01, num_retrieved=None, num_sets=None, image_first_prob=None,
                            query_dropout=True)
    train_ids = data.split_ids["train"].tolist()
    qs = [int(e["query_id"]) for e in exs]
    assert qs == [q for q in train_ids[:20] for _ in range(3)]  # source order, 3 sequences per pair
    bodies = {i: prepared.by_id(i) for i in range(len(prepared))}
    for ex in exs:
        docs = _docs(ex["targets"])
        q = int(ex["query_id"])
        assert len(docs) == 3 and _is_document(docs[-1], bodies[q])
        for tokens in docs[:-1]:
            match = [i for i, d in bodies.items() if _is_document(tokens, d)]
            assert match and q not in match                               # never the query itself
            assert not set(match) <= data.validation_ids                   # never a held-out document
    # the three sets of a pair differ (sampled, with query dropout)
    assert any(len({tuple(exs[3 * k + j]["targets"].tolist()) for j in range(3)}) > 1 for k in range(20))


def test_same_seed_same_stream_other_seed_another(data_dir):
    a = [e["targets"].tolist() for e in _examples(tasks.SHAPES_RETRIEVAL_TASK, 30, seed=3)]
    b = [e["targets"].tolist() for e in _examples(tasks.SHAPES_RETRIEVAL_TASK, 30, seed=3)]
    c = [e["targets"].tolist() for e in _examples(tasks.SHAPES_RETRIEVAL_TASK, 30, seed=4)]
    assert a == b and a != c


def test_host_shards_are_disjoint_and_cover_the_split(data_dir):
    data = tasks._task_data(tasks.SHAPES_TASK, tasks._shapes_prepared, None, validation_fraction=0.01,
                            num_retrieved=None, num_sets=None, image_first_prob=None, query_dropout=True)
    train = set(data.split_ids["train"].tolist())
    seen = []
    for i in range(3):
        exs = _examples(tasks.SHAPES_TASK, 10_000, shard=seqio.ShardInfo(index=i, num_shards=3), seed=1)
        seen.append({int(e["query_id"]) for e in exs})
        assert len(exs) == len(seen[-1])  # shapes_cm3: one sequence per document
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set().union(*seen) == train


def test_each_epoch_has_a_new_order(data_dir):
    src = seqio.get_mixture_or_task(tasks.SHAPES_TASK).source
    ds = src.get_dataset("train", shuffle=True, seed=7).repeat(2)
    ids = [int(e["doc_id"]) for e in ds.as_numpy_iterator()]
    n = len(ids) // 2
    assert sorted(ids[:n]) == sorted(ids[n:]) and ids[:n] != ids[n:]
    again = [int(e["doc_id"]) for e in src.get_dataset("train", shuffle=True, seed=7).repeat(2).as_numpy_iterator()]
    assert again == ids


def test_document_only_task_and_the_mixture(data_dir, prepared):
    for ex in _examples(tasks.SHAPES_TASK, 20, length=4096):
        docs = _docs(ex["targets"])
        assert len(docs) == 1 and _is_document(docs[0], prepared.by_id(int(ex["query_id"])))
    counts = collections.Counter(len(_docs(e["targets"])) for e in _examples(tasks.SHAPES_MIXTURE, 200, length=4096))
    assert set(counts) == {1, 3} and min(counts.values()) > 30


def test_cm3_masks_documents_in_the_task(data_dir):
    exs = _examples(tasks.SHAPES_RETRIEVAL_TASK, 60, length=4096)
    masked = sum(cm3.is_masked(p) for e in exs for p in np.split(e["targets"], np.flatnonzero(e["targets"] == EOS_ID) + 1))
    assert masked > 60  # Poisson(1) spans: about 63% of documents are masked


def test_gin_sets_the_built_in_tasks_document_mix(data_dir):
    """RetrievalAugmenter's gin bindings reach tasks registered without
    explicit settings, as the built-in ones are (they used to pass the
    paper's values explicitly, which silently overrode any binding), and
    CM3Objective.mask_prompt_rate gives CFG's unconditional layout."""
    import gin

    from cm3leon_jax.vocab import BREAK_ID, UnifiedVocabulary

    v = UnifiedVocabulary(num_special_tokens=64, num_mask_tokens=32, image_codebook_size=512, text_vocab_size=1472)
    name = "test_gin_mix"
    tasks.register_cm3_task(name, os.path.join(data_dir, "prepared"), os.path.join(data_dir, "bank"),
                            query_dropout=False, replace=True)
    with gin.unlock_config():
        gin.bind_parameter("RetrievalAugmenter.image_first_prob", 0.0)
        gin.bind_parameter("RetrievalAugmenter.num_sets", 2)
        gin.bind_parameter("CM3Objective.poisson_lambda", 0.0)
        gin.bind_parameter("CM3Objective.mask_prompt_rate", 0.5)
    try:
        exs = _examples(name, 40, length=4096)
    finally:
        gin.clear_config()
        tasks._DATA.clear()
        seqio.TaskRegistry.remove(name)
    docs = [p for e in exs for p in np.split(e["targets"], np.flatnonzero(e["targets"] == EOS_ID) + 1) if p.size]
    unconditional = [d for d in docs if d[0] == v.mask_id(0) and d[1] == BREAK_ID]
    plain = [d for d in docs if not cm3.is_masked(d)]
    # every document is text first: its first token is text (plain) or the whole caption masked
    assert all(v.is_text(d[0]) for d in plain) and len(plain) + len(unconditional) == len(docs)
    assert 0.3 < len(unconditional) / len(docs) < 0.7
    # two retrieval sets per pair: each query id appears in pairs
    assert set(collections.Counter(int(e["query_id"]) for e in exs[:40]).values()) <= {1, 2}


def test_unknown_task_lists_the_registered_ones():
    with pytest.raises(ValueError, match="nope") as e:
        pipeline.check_task_name("nope")
    for name in (tasks.SHAPES_TASK, tasks.SHAPES_RETRIEVAL_TASK, tasks.SHAPES_MIXTURE, "synthetic_lm"):
        assert name in str(e.value)


def test_missing_data_names_the_variable_and_the_fix(tmp_path):
    tasks.register_cm3_task("test_missing_data", str(tmp_path / "nothing"), replace=True)
    with pytest.raises(ValueError, match="test_missing_data.*does not exist"):
        seqio.get_mixture_or_task("test_missing_data").get_dataset({"targets": 8})
    old = os.environ.get(tasks.SHAPES_DATA_ENV)
    os.environ[tasks.SHAPES_DATA_ENV] = str(tmp_path / "no_shapes")
    try:
        with pytest.raises(ValueError, match=tasks.SHAPES_DATA_ENV):
            seqio.get_mixture_or_task(tasks.SHAPES_TASK).get_dataset({"targets": 8})
    finally:
        if old is None:
            os.environ.pop(tasks.SHAPES_DATA_ENV)
        else:
            os.environ[tasks.SHAPES_DATA_ENV] = old
    with pytest.raises(ValueError, match="corpus_data_dir.path"):
        seqio.get_mixture_or_task(tasks.CORPUS_RETRIEVAL_TASK).get_dataset({"targets": 8})


def test_registering_twice_needs_replace(data_dir):
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_cm3_task(tasks.SHAPES_TASK, "/x")


def test_model_vocabulary_must_cover_the_task(data_dir, prepared):
    pipeline.check_vocabulary(tasks.SHAPES_RETRIEVAL_TASK, prepared.vocabulary.size)
    with pytest.raises(ValueError, match="DecoderConfig.vocab_size is 100"):
        pipeline.check_vocabulary(tasks.SHAPES_MIXTURE, 100)


def test_query_dropout_embedder_against_the_bank(data_dir, prepared):
    from cm3leon_jax.retrieval.bank import load_bank
    from cm3leon_jax.retrieval.query_dropout import ClipQueryEmbedder

    emb = ClipQueryEmbedder.for_prepared(prepared)
    bank = load_bank(os.path.join(data_dir, "bank"))
    doc = prepared.by_id(7)
    full = np.concatenate([doc["text_ids"], doc["image_ids"]])
    # nothing dropped: the bank's own key of the document (caption re-decoded from its BPE ids)
    np.testing.assert_allclose(emb(full, doc), bank.embeddings[bank.rows([7])[0]], atol=1e-5)
    # half the text dropped: CLIP of the shorter caption, averaged with the stored image embedding
    kept = np.concatenate([doc["text_ids"][::2], doc["image_ids"]])
    caption = emb.text_tokenizer.decode(doc["text_ids"][::2], skip_non_text=True)
    want = (emb.encoder.encode_texts([caption])[0] + doc["image_embedding"]) / 2
    np.testing.assert_allclose(emb(kept, doc), want, atol=1e-6)
    # every text token dropped: the image embedding alone; batches agree with single calls
    np.testing.assert_allclose(emb(doc["image_ids"], doc), doc["image_embedding"], atol=1e-7)
    batch = emb.embed_batch([full, kept, doc["image_ids"]], doc)
    np.testing.assert_allclose(batch[1], want, atol=1e-6)


def test_training_sequences_use_query_dropout(data_dir):
    data = tasks._task_data(tasks.SHAPES_RETRIEVAL_TASK, tasks._shapes_prepared, tasks._shapes_bank,
                            validation_fraction=0.01, num_retrieved=None, num_sets=None, image_first_prob=None,
                            query_dropout=True)
    before = data.augmenter(True).query_embedder.calls
    _examples(tasks.SHAPES_RETRIEVAL_TASK, 30, shuffle=False)
    assert data.augmenter(True).query_embedder.calls >= before + 30  # one re-embedded query per set
    assert data.augmenter(False).query_embedder is None             # never at validation
