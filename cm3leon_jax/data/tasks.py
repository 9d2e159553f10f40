"""SeqIO tasks of CM3Leon training sequences over prepared data.

`register_cm3_task(name, prepared_dir, index_dir=None, ...)` registers a
`seqio.Task` reading a `cm3leon prepare` output (and, for retrieval, the
memory bank made from it with its neighbour table). Its pipeline (the
steps: data/task_pipeline.py):

    source       PreparedDocumentSource: the document ids of the split,
                 one host's shard (`ids[index::num_shards]`), shuffled with
                 a seeded, per-epoch reshuffle
    placeholder  seqio.CacheDatasetPlaceholder (the steps below are
                 stochastic, so they run after it, once per epoch)
    retrieval    retrieval_augment: `retrieved_1 <eos> retrieved_2 <eos> query
                 <eos>` from the neighbour table with the retrieval strategy
                 (data/retrieval_aug.py); in training `num_sets` (3)
                 sampled retrieval sets per pair, i.e. 3 sequences; in
                 validation one sequence with the inference choice. Without an
                 index: the document alone, `doc <eos>`.
    cm3          cm3_objective: the CM3 objective on every document of the
                 sequence (data/cm3.py, settings from gin `CM3Objective`)

then SeqIO's trimming to the feature length, and at training time packing
by `seqio.DecoderFeatureConverter(pack=True)` (data/pipeline.py), giving the
DESIGN.md features (`decoder_target_tokens`, `decoder_input_tokens`,
`decoder_loss_weights`, `decoder_segment_ids`, `decoder_positions`).

Determinism (the example stream is a pure function of (seed, position)):
data/task_pipeline.py.

Choices where the paper is silent (assumptions):

- Splits: `validation` is the last `validation_fraction` (1%, at least one
  document when there are two or more, at most 1,000) of the records in
  record order; `train` is the rest. Training sequences never contain a
  validation document: training queries do not retrieve them.
- Query dropout (PAPER.md: drop 20% of the query's tokens before embedding,
  in training) re-embeds the query's caption with 20% of its BPE tokens
  dropped, with the CLIP the data was prepared with, averages it with the
  query's stored image embedding (the bank's document key), and re-scores
  the table's candidates with their stored keys (`RetrievalAugmenter`'s
  hook). Image tokens are not dropped: CLIP's image tower sees pixels, and
  decoding a VQ grid with holes is not defined. Off with
  `query_dropout=False`.

The built-in tasks `shapes_cm3` (no retrieval) and `shapes_cm3_retrieval`
read the embedded shapes corpus from `shapes_data_dir()`: the gin binding
`shapes_data_dir.path`, else `$CM3LEON_SHAPES_DATA`, else
`./demo_out/data`; it holds `prepared/`, `bank/` (with `neighbours/`) and
`index/`, as `build_task_data` (`cm3leon task-data`,
data/task_data_builder.py) writes them. The
mixture `shapes_cm3_mixture` samples both equally.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Dict, Optional, Union

import gin
import numpy as np
import seqio
import tensorflow as tf

from cm3leon_jax import paths as paths_lib
from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.data import cm3 as cm3_lib
from cm3leon_jax.data import retrieval_aug
from cm3leon_jax.data.seqio_vocabularies import UnifiedIdsVocabulary
from cm3leon_jax.data.task_pipeline import PreparedDocumentSource, cm3_objective, retrieval_augment

PathSpec = Union[str, Callable[[], str]]

SHAPES_DATA_ENV = "CM3LEON_SHAPES_DATA"
PREPARED_SUBDIR, BANK_SUBDIR, INDEX_SUBDIR = "prepared", "bank", "index"
SHAPES_TASK = "shapes_cm3"
SHAPES_RETRIEVAL_TASK = "shapes_cm3_retrieval"
SHAPES_MIXTURE = "shapes_cm3_mixture"
CORPUS_DATA_ENV = "CM3LEON_CORPUS_DATA"
CORPUS_TASK = "corpus_cm3"
CORPUS_RETRIEVAL_TASK = "corpus_cm3_retrieval"
MAX_VALIDATION_DOCS = 1000


@gin.configurable
def shapes_data_dir(path: Optional[str] = None) -> str:
    """Where the built-in shapes tasks read their data (see the module
    docstring)."""
    return paths_lib.abspath(path or os.environ.get(SHAPES_DATA_ENV) or os.path.join("demo_out", "data"))


@gin.configurable
def corpus_data_dir(path: Optional[str] = None) -> str:
    """Where the built-in corpus tasks (`corpus_cm3`, `corpus_cm3_retrieval`:
    a user's own data, as the paper-size gin files train on) read: the gin
    binding `corpus_data_dir.path`, else `$CM3LEON_CORPUS_DATA`; a
    `cm3leon task-data` output."""
    path = path or os.environ.get(CORPUS_DATA_ENV)
    if not path:
        raise ValueError(f"the corpus tasks ({CORPUS_TASK}, {CORPUS_RETRIEVAL_TASK}) need their data dir: bind "
                         f"corpus_data_dir.path = '/path' in gin (or set ${CORPUS_DATA_ENV}) to a `cm3leon "
                         "task-data --source=... --out=DIR` output")
    return paths_lib.abspath(path)  # a gs:// URL stays as it is


def validation_count(n: int, fraction: float) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {fraction}")
    if n < 2 or fraction == 0.0:
        return 0
    return int(min(max(1, round(n * fraction)), MAX_VALIDATION_DOCS, n - 1))


def resolve_path(p: Optional[PathSpec]) -> Optional[str]:
    if p is None:
        return None
    return paths_lib.abspath(p() if callable(p) else p)


# =========================================================================== the data a task reads


class _NoCandidates:
    def candidates(self, doc_id: int) -> list:
        del doc_id
        return []


class _ExcludingCandidates:
    """A candidate provider without the `excluded` documents."""

    def __init__(self, provider, excluded: frozenset):
        self.provider, self.excluded = provider, excluded

    def candidates(self, doc_id: int) -> list:
        return [c for c in self.provider.candidates(doc_id) if c.doc_id not in self.excluded]


class TaskData:
    """The opened prepared dataset (+ neighbour table) of one task, with the
    split ids, an in-memory token cache (the records the pipeline needs are
    read once) and the per-split augmenters."""

    def __init__(self, task_name: str, prepared_dir: str, index_dir: Optional[str], *,
                 validation_fraction: float, num_retrieved: Optional[int], num_sets: Optional[int],
                 image_first_prob: Optional[float], query_dropout: bool, cache_limit: int = 500_000):
        from cm3leon_jax.data.prepared import PreparedDataset

        self.task_name, self.index_dir = task_name, index_dir
        hint = ""
        if task_name in (SHAPES_TASK, SHAPES_RETRIEVAL_TASK):
            hint = (f" (the built-in shapes tasks read shapes_data_dir() = {shapes_data_dir()!r}: set "
                    f"${SHAPES_DATA_ENV} or the gin binding shapes_data_dir.path, or build it there with "
                    "`cm3leon task-data --source=shapes:20000 --out=DIR ...`)")
        elif task_name in (CORPUS_TASK, CORPUS_RETRIEVAL_TASK):
            hint = " (build it with `cm3leon task-data --source=... --out=DIR ...`)"
        try:
            self.prepared = PreparedDataset(prepared_dir)
            self.table = None
            if index_dir is not None:
                from cm3leon_jax.retrieval.neighbours import NeighbourTable

                self.table = NeighbourTable(index_dir)
        except (ValueError, OSError) as e:
            raise ValueError(f"SeqIO task {task_name!r}: {e}{hint}") from None
        n = len(self.prepared)
        v = validation_count(n, validation_fraction)
        ids = np.asarray(self.prepared.ids, np.int64)
        self.split_ids = {"train": ids[:n - v], "validation": ids[n - v:]}
        self.validation_ids = frozenset(ids[n - v:].tolist())
        self.vocabulary = self.prepared.vocabulary
        # None: the value bound in gin for RetrievalAugmenter (its defaults are the paper's)
        self.settings = {k: v for k, v in dict(num_retrieved=num_retrieved, num_sets=num_sets,
                                                image_first_prob=image_first_prob).items() if v is not None}
        self.query_dropout = bool(query_dropout) and index_dir is not None
        self._cache: Dict[int, dict] = {}
        self._cache_limit = int(cache_limit)
        self._lock = threading.Lock()
        self._augmenters: Dict[bool, retrieval_aug.RetrievalAugmenter] = {}
        self._objective = None

    # a document store for RetrievalAugmenter: the fields it reads, cached
    def by_id(self, doc_id: int) -> dict:
        doc_id = int(doc_id)
        doc = self._cache.get(doc_id)
        if doc is None:
            with self._lock:
                rec = self.prepared.by_id(doc_id)
            doc = {k: rec[k] for k in ("id", "text_ids", "image_ids", "has_text", "has_image",
                                       "image_embedding")}
            if len(self._cache) < self._cache_limit:
                self._cache[doc_id] = doc
        return doc

    def augmenter(self, training: bool) -> retrieval_aug.RetrievalAugmenter:
        aug = self._augmenters.get(training)
        if aug is None:
            with self._lock:
                provider = self.table if self.table is not None else _NoCandidates()
                if training and self.validation_ids and self.table is not None:
                    provider = _ExcludingCandidates(provider, self.validation_ids)
                kw = dict(self.settings)
                if self.table is None:
                    kw.update(num_retrieved=0, num_sets=1)
                aug = retrieval_aug.RetrievalAugmenter(self, provider, **kw)  # gin gives the rest
                if training and self.query_dropout and aug.num_retrieved > 0:
                    from cm3leon_jax.retrieval.query_dropout import ClipQueryEmbedder

                    aug.enable_query_dropout(ClipQueryEmbedder.for_prepared(self.prepared, batch_size=aug.num_sets),
                                             retrieval_aug.BankKeys(self.index_dir))
                self._augmenters[training] = aug
        return aug

    def objective(self) -> cm3_lib.CM3Objective:
        if self._objective is None:
            self._objective = cm3_lib.CM3Objective(vocab=self.vocabulary)  # the rest from gin
        return self._objective


_DATA: Dict[tuple, TaskData] = {}
_DATA_LOCK = threading.Lock()


def _task_data(task_name: str, prepared_dir: PathSpec, index_dir: Optional[PathSpec], **settings) -> TaskData:
    """The TaskData of a task, opened once per (paths, settings) and process."""
    p, i = resolve_path(prepared_dir), resolve_path(index_dir)
    key = (task_name, p, i, tuple(sorted(settings.items())))
    with _DATA_LOCK:
        if key not in _DATA:
            _DATA[key] = TaskData(task_name, p, i, **settings)
        return _DATA[key]


# =========================================================================== registration


def register_cm3_task(name: str, prepared_dir: PathSpec, index_dir: Optional[PathSpec] = None, *,
                      num_retrieved: Optional[int] = None, num_sets: Optional[int] = None,
                      image_first_prob: Optional[float] = None,
                      query_dropout: bool = True, use_cm3: bool = True, validation_fraction: float = 0.01,
                      shuffle_buffer_size: int = 1000, replace: bool = False) -> seqio.Task:
    """Registers (and returns) the SeqIO task `name` of CM3 sequences over a
    prepared dataset; with `index_dir` (a memory bank dir holding
    `neighbours/`, from `cm3leon embed` + `index build` + `index
    neighbours`) they are retrieval-augmented. Paths may be zero-argument
    callables, resolved when the data is first read. See the module
    docstring for the pipeline; nothing is opened until then.
    `num_retrieved`, `num_sets` and `image_first_prob` left None take the
    gin bindings of `RetrievalAugmenter` (default: the paper's 2, 3, 0.5),
    so a gin file can set the built-in tasks' document mix."""
    if (num_retrieved is not None and num_retrieved < 0) or (num_sets is not None and num_sets < 1):
        raise ValueError(f"task {name!r}: num_retrieved must be >= 0 and num_sets >= 1, got "
                         f"{num_retrieved}, {num_sets}")
    validation_count(2, validation_fraction)  # checks the range
    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        if not replace:
            raise ValueError(f"a SeqIO task or mixture named {name!r} is already registered "
                             "(pass replace=True to redefine it)")
        seqio.TaskRegistry.remove(name)
    _PATHS[name] = (prepared_dir, index_dir)
    settings = dict(validation_fraction=float(validation_fraction),
                    num_retrieved=None if num_retrieved is None else int(num_retrieved),
                    num_sets=None if num_sets is None else int(num_sets),
                    image_first_prob=None if image_first_prob is None else float(image_first_prob),
                    query_dropout=bool(query_dropout))
    data_fn = functools.partial(_task_data, name, prepared_dir, index_dir, **settings)
    preprocessors = [seqio.CacheDatasetPlaceholder(),
                     functools.partial(retrieval_augment, data_fn=data_fn)]
    if use_cm3:
        preprocessors.append(functools.partial(cm3_objective, data_fn=data_fn))
    vocabulary = UnifiedIdsVocabulary(functools.partial(_vocabulary_of, data_fn))
    return seqio.TaskRegistry.add(
        name,
        source=PreparedDocumentSource(data_fn),
        preprocessors=preprocessors,
        output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
        shuffle_buffer_size=shuffle_buffer_size,
    )


_PATHS: Dict[str, tuple] = {}


def task_paths(name: str) -> Optional[tuple]:
    """(prepared dir, bank dir or None) of a registered CM3 task, or of the
    first task of a mixture that has a bank (the first task otherwise);
    None for other tasks or when a path cannot be resolved (e.g. an unset
    corpus_data_dir)."""
    from cm3leon_jax.data import pipeline

    pipeline.import_task_modules()
    names = [name]
    if name in seqio.MixtureRegistry.names():
        names = [t.name for t in seqio.get_mixture_or_task(name).tasks]
    found = [_PATHS[n] for n in names if n in _PATHS]
    found.sort(key=lambda pi: pi[1] is None)
    for prepared, index in found:
        try:
            return resolve_path(prepared), resolve_path(index)
        except ValueError:
            continue
    return None


def _vocabulary_of(data_fn) -> vocab_lib.UnifiedVocabulary:
    return data_fn().vocabulary


def _shapes_prepared() -> str:
    return os.path.join(shapes_data_dir(), PREPARED_SUBDIR)


def _shapes_bank() -> str:
    return os.path.join(shapes_data_dir(), BANK_SUBDIR)


def _corpus_prepared() -> str:
    return os.path.join(corpus_data_dir(), PREPARED_SUBDIR)


def _corpus_bank() -> str:
    return os.path.join(corpus_data_dir(), BANK_SUBDIR)


def register_builtin():
    if SHAPES_TASK not in seqio.TaskRegistry.names():
        register_cm3_task(SHAPES_TASK, _shapes_prepared)
    if SHAPES_RETRIEVAL_TASK not in seqio.TaskRegistry.names():
        register_cm3_task(SHAPES_RETRIEVAL_TASK, _shapes_prepared, _shapes_bank)
    if CORPUS_TASK not in seqio.TaskRegistry.names():
        register_cm3_task(CORPUS_TASK, _corpus_prepared)
    if CORPUS_RETRIEVAL_TASK not in seqio.TaskRegistry.names():
        register_cm3_task(CORPUS_RETRIEVAL_TASK, _corpus_prepared, _corpus_bank)
    if SHAPES_MIXTURE not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(SHAPES_MIXTURE, [(SHAPES_TASK, 1.0), (SHAPES_RETRIEVAL_TASK, 1.0)])


register_builtin()
