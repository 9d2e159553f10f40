"""The steps of a CM3 SeqIO task's pipeline (data/tasks.py registers them):
the source of document ids, `PreparedDocumentSource`, and the two
preprocessors, `retrieval_augment` and `cm3_objective`. Each reads the
task's data through `data_fn`, a zero-argument callable returning the
task's `tasks.TaskData` (the opened prepared dataset, its split ids, the
retrieval augmenters and the CM3 objective).

Determinism: the document order is a pure function of (seed, epoch, host
shard) and every stochastic step draws from a per-example seed that SeqIO's
`map_over_dataset(num_seeds=1)` derives from the task seed, so the example
stream, and with it the packed batches, is a pure function of (seed,
position). data/pipeline.py's TrainIterator resumes it exactly.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from cm3leon_jax.data import cm3 as cm3_lib

SPLITS = ("train", "validation")


# =========================================================================== source


class PreparedDocumentSource(seqio.DataSource):
    """The document ids of a prepared dataset's split as
    `{"doc_id": int64, "training": bool}`; a host shard is every
    `num_shards`-th id from `index` (disjoint across hosts); shuffling is a
    full permutation per epoch drawn from the seed (`reshuffle_each_iteration`:
    SeqIO's repeat gives each epoch a new order, still a pure function of the
    seed)."""

    def __init__(self, data_fn: Callable[[], object]):
        self._data_fn = data_fn
        super().__init__(splits=SPLITS, num_input_examples=None, caching_permitted=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def num_input_examples(self, split: str) -> Optional[int]:
        # Deliberately unknown to SeqIO: it would cache a small source in memory
        # (before the shuffle's per-epoch reshuffle) and freeze the order.
        return None

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; this task has {list(SPLITS)}")
        data = self._data_fn()
        # Built here, in the caller's thread, so a bad setting (e.g. query
        # dropout's CLIP dir gone) is a Python error now, not a failure inside
        # a tf.data worker thread later.
        data.augmenter(split == "train")
        data.objective()
        ids = data.split_ids[split]
        if shard_info is not None and shard_info.num_shards > 1:
            if len(ids) < shard_info.num_shards:
                raise ValueError(f"SeqIO task {data.task_name!r}: split {split!r} has {len(ids)} documents, "
                                 f"fewer than the {shard_info.num_shards} host shards")
            ids = ids[shard_info.index::shard_info.num_shards]
        if not len(ids):
            raise ValueError(f"SeqIO task {data.task_name!r}: split {split!r} has no documents "
                             f"({len(data.prepared)} in the prepared dataset)")
        ds = tf.data.Dataset.from_tensor_slices({
            "doc_id": tf.constant(ids, tf.int64),
            "training": tf.fill([len(ids)], split == "train")})
        if shuffle:
            ds = ds.shuffle(len(ids), seed=seed, reshuffle_each_iteration=True)
        return ds


# =========================================================================== preprocessors


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng([int(s) & 0xFFFFFFFF for s in np.asarray(seed).reshape(-1)])


def retrieval_augment(ds: tf.data.Dataset, *, data_fn: Callable[[], object]) -> tf.data.Dataset:
    """{"doc_id", "training"} -> one example per sequence:
    {"targets": int32 [L], "query_id": int64}. Training documents give the
    augmenter's `num_sets` sequences, validation documents one."""

    def build(doc_id, training, seed):
        aug = data_fn().augmenter(bool(training))
        rng = _rng(seed)
        if training:
            exs = aug.training_examples(int(doc_id), rng)
        else:
            exs = [aug.inference_example(int(doc_id), rng)]
        flat = np.concatenate([e["targets"] for e in exs]).astype(np.int32)
        return flat, np.asarray([len(e["targets"]) for e in exs], np.int64)

    @seqio.map_over_dataset(num_seeds=1)
    def augment(ex, seed):
        flat, lengths = tf.numpy_function(build, [ex["doc_id"], ex["training"], seed], [tf.int32, tf.int64],
                                          stateful=False)
        flat.set_shape([None])
        lengths.set_shape([None])
        return {"flat": flat, "lengths": lengths, "doc_id": ex["doc_id"]}

    def split(ex):
        ends = tf.cumsum(ex["lengths"])
        starts = ends - ex["lengths"]
        return tf.data.Dataset.range(tf.size(ex["lengths"], out_type=tf.int64)).map(
            lambda j: {"targets": ex["flat"][starts[j]:ends[j]], "query_id": ex["doc_id"]})

    return augment(ds).flat_map(split)


def cm3_objective(ds: tf.data.Dataset, *, data_fn: Callable[[], object]) -> tf.data.Dataset:
    """The CM3 objective on every `<eos>`-terminated document of "targets"."""

    def transform(targets, seed):
        return cm3_lib.apply_per_document(targets, data_fn().objective(), _rng(seed)).astype(np.int32)

    @seqio.map_over_dataset(num_seeds=1)
    def apply(ex, seed):
        out = tf.numpy_function(transform, [ex["targets"], seed], tf.int32, stateful=False)
        out.set_shape([None])
        return dict(ex, targets=out)

    return apply(ds)
