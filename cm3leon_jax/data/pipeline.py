"""Train input: a registered SeqIO task or mixture -> packed, batched numpy
features (DecoderFeatureConverter names), per host, with a resumable state.

Determinism contract (levanter's): the batch sequence is a pure function of
(task, feature lengths, batch size, seed, host shard). The iterator's state
is the number of batches it has handed out; restoring it replays the same
deterministic pipeline and skips that many batches, so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping, Optional

# Modules whose import registers SeqIO tasks; the data issues add theirs here.
TASK_MODULES = ("cm3leon_jax.data.synthetic", "cm3leon_jax.data.tasks", "cm3leon_jax.sft.tasks")


# The modules the train/finetune/compile commands and a model dir's loader
# import before parsing gin: the SeqIO tasks plus the data configurables that
# config.gin binds. Named, not imported, so the SFT layer plugs in from above.
TRAIN_DATA_MODULES = ("cm3leon_jax.data.cm3", "cm3leon_jax.data.retrieval_aug", "cm3leon_jax.data.tasks",
                      "cm3leon_jax.sft.tasks")


def import_task_modules(extra: tuple = ()):
    for m in TASK_MODULES + tuple(extra):
        importlib.import_module(m)


def check_task_name(name: str):
    import seqio

    import_task_modules()
    known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if name not in known:
        raise ValueError(
            f"unknown SeqIO task or mixture {name!r} (MIXTURE_OR_TASK_NAME); registered: "
            f"{', '.join(sorted(known)) or 'none'}")


def check_vocabulary(name: str, model_vocab_size: int):
    """The model must have an id for every id the task's "targets" can hold
    (each task of a mixture); a ValueError naming both sizes otherwise."""
    import seqio

    import_task_modules()
    provider = seqio.get_mixture_or_task(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    for task in tasks:
        feature = task.output_features.get("targets")
        if feature is None:
            raise ValueError(f"SeqIO task {task.name!r} has no 'targets' feature (a decoder-only model needs one)")
        size = feature.vocabulary.vocab_size
        if size > model_vocab_size:
            raise ValueError(
                f"SeqIO task {task.name!r} holds ids up to {size - 1} but DecoderConfig.vocab_size is "
                f"{model_vocab_size}: bind UnifiedVocabulary sizes matching the data (the prepared "
                "dataset's manifest lists them) or use a bigger model vocabulary")


def is_prefix_lm(name: str) -> bool:
    """Whether a task (or mixture) has an "inputs" feature (the SFT tasks):
    it then trains through the prefix-LM feature converter."""
    import seqio

    import_task_modules()
    return "inputs" in seqio.get_mixture_or_task(name).output_features


# What the tasks with "inputs" plug in, registered by the module that defines
# them (sft/tasks.py, which TASK_MODULES names): their feature converter,
# `converter(pack=...)`, and `data_models(task)`, the tokenizer/CLIP dirs
# their prepared data names ({} when unknown).
_PREFIX_LM = {}


def register_prefix_lm(converter: Callable, data_models: Callable) -> None:
    _PREFIX_LM.update(converter=converter, data_models=data_models)


def prefix_lm_data_models(name: str) -> dict:
    import_task_modules()
    return _PREFIX_LM["data_models"](name) if "data_models" in _PREFIX_LM else {}


def feature_converter(name: str, pack: bool = True):
    """The training feature converter of a task: SeqIO's DecoderFeatureConverter
    ("targets" only), or for tasks with "inputs" the registered prefix-LM
    converter (`sft.tasks.sft_feature_converter`: gin-configured loss masking)."""
    import seqio

    if is_prefix_lm(name):
        if "converter" not in _PREFIX_LM:
            raise ValueError(f"task {name!r} has inputs but no prefix-LM feature converter is registered "
                             "(register_prefix_lm; sft/tasks.py registers one on import)")
        return _PREFIX_LM["converter"](pack=pack)
    return seqio.DecoderFeatureConverter(pack=pack)


def decoder_length(name: str, task_feature_lengths: Mapping[str, int]) -> int:
    """The model's sequence length for a task's feature lengths: "targets",
    plus "inputs" for prefix-LM tasks (they are concatenated)."""
    if "targets" not in task_feature_lengths:
        raise ValueError(f"TASK_FEATURE_LENGTHS needs a 'targets' length, got {dict(task_feature_lengths)}")
    if is_prefix_lm(name):
        if "inputs" not in task_feature_lengths:
            raise ValueError(f"SeqIO task {name!r} has inputs and targets: TASK_FEATURE_LENGTHS needs both "
                             f"lengths, got {dict(task_feature_lengths)}")
        return int(task_feature_lengths["inputs"]) + int(task_feature_lengths["targets"])
    return int(task_feature_lengths["targets"])


def check_not_empty(name: str, split: str = "train"):
    """A task whose source can count its records (SFT) must have some in
    `split`; a mixture must have a task with a positive rate."""
    import seqio

    import_task_modules()
    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        if sum(provider.get_rate(t) for t in provider.tasks) <= 0:
            raise ValueError(f"SeqIO mixture {name!r}: every task has rate 0 (no {split} data): prepare its data")
        return
    count = getattr(provider.source, "count", None)
    if callable(count) and count(split) == 0:
        raise ValueError(f"SeqIO task {name!r} has no {split!r} records (its data dir is empty or missing): "
                         "prepare its data")


class TrainIterator:
    """Iterator over numpy batches with `state()` / resume via `start_batch`."""

    def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, seed: int, shard_index: int = 0, num_shards: int = 1,
                 start_batch: int = 0, pack: bool = True, split: str = "train"):
        import seqio
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")  # TF must not take accelerator memory
        check_task_name(mixture_or_task_name)
        check_not_empty(mixture_or_task_name, split)
        if batch_size % num_shards:
            raise ValueError(f"batch_size {batch_size} is not divisible by {num_shards} hosts")
        self.spec = {"task": mixture_or_task_name, "seed": int(seed), "batch_size": int(batch_size),
                     "task_feature_lengths": dict(task_feature_lengths),
                     "shard_index": shard_index, "num_shards": num_shards}
        self.batches_consumed = int(start_batch)
        ds = seqio.get_dataset(
            mixture_or_task_name,
            task_feature_lengths=dict(task_feature_lengths),
            dataset_split=split,
            shuffle=True,
            num_epochs=None,
            seed=seed,
            shard_info=seqio.ShardInfo(index=shard_index, num_shards=num_shards),
            feature_converter=feature_converter(mixture_or_task_name, pack=pack),
            use_cached=False,
        )
        ds = ds.batch(batch_size // num_shards, drop_remainder=True)
        if start_batch:
            ds = ds.skip(start_batch)
        self._it = ds.prefetch(2).as_numpy_iterator()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        self.batches_consumed += 1
        return batch

    def state(self) -> dict:
        return dict(self.spec, batches_consumed=self.batches_consumed)

    @staticmethod
    def check_resumable(saved: dict, current_spec: dict) -> Optional[str]:
        """A message when a checkpoint's iterator state belongs to another input."""
        diffs = [k for k in current_spec if k in saved and saved[k] != current_spec[k]]
        if diffs:
            return ("input pipeline differs from the checkpoint's: " +
                    ", ".join(f"{k}: {saved[k]!r} -> {current_spec[k]!r}" for k in diffs))
        return None


def numpy_batch_stats(batch: dict) -> dict:
    import numpy as np

    return {k: (np.asarray(v).shape, np.asarray(v).dtype) for k, v in batch.items()}
