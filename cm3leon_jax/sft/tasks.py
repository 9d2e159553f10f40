"""SeqIO tasks of instruction examples over prepared SFT datasets.

`register_sft_task(name, data_dir, family)` registers a `seqio.Task` reading
one family of a `prepare_sft` output (sft/records.py):

    source       SFTDataSource: the family's TFRecord shards of the split,
                 one host's shard of the records (`ds.shard`), shuffled with
                 a seeded per-epoch reshuffle
    layout       sft_layout: "inputs" = instruction <break> [input <break>],
                 "targets" = output <eos> (sft/format.py), with condition
                 dropout for image-output tasks (in every split SeqIO reads:
                 a preprocessor does not know the split; `cm3leon sft eval`
                 reads the records directly, without it)

Training packs examples with `seqio.PrefixLMFeatureConverter` (chosen by
data/pipeline.py for any task with an "inputs" feature), which concatenates
inputs and targets and puts the loss on the targets only;
`sft_feature_converter.loss_on_targets_only = False` in gin puts it on
every token. TASK_FEATURE_LENGTHS needs both lengths; a length shorter than
the longest example of the data is refused (SeqIO would cut it silently).

Built-in tasks over the shapes instruction corpus (sft/shapes_instructions.py),
read from `shapes_sft_data_dir()` (gin `shapes_sft_data_dir.path`, else
`$CM3LEON_SHAPES_SFT_DATA`, else ./demo_out/sft_data): `shapes_sft_FAMILY`
for each family and `shapes_sft_mixture` (all six, at the rates of
`shapes_sft_rates`: an assumption, the paper gives no mixture weights).
Over a user's data (`corpus_sft_data_dir()`, `$CM3LEON_SFT_DATA`):
`corpus_sft_FAMILY` and `corpus_sft_mixture`, each family at a rate
proportional to its training records (a family the data lacks gets rate 0).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Union

import gin
import seqio
import tensorflow as tf

from cm3leon_jax import paths as paths_lib
from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.data import pipeline
from cm3leon_jax.data.tasks import resolve_path
from cm3leon_jax.data.seqio_vocabularies import UnifiedIdsVocabulary
from cm3leon_jax.sft import example_weights
from cm3leon_jax.sft import format as fmt
from cm3leon_jax.sft import records as rec_lib

PathSpec = Union[str, Callable[[], str]]
SPLITS = ("train", "validation")
SHAPES_SFT_ENV = "CM3LEON_SHAPES_SFT_DATA"
CORPUS_SFT_ENV = "CM3LEON_SFT_DATA"
SHAPES_PREFIX, CORPUS_PREFIX = "shapes_sft", "corpus_sft"
# Assumption (InstructPix2Pix's recipe, which CM3Leon's editing follows; the
# paper gives no rate): in training, an image-output example drops its
# instruction with this probability, its input with the same, and both
# with the same, each replaced by one <mask:0>, so that the unconditional
# streams of (two-scale) classifier-free guidance are in distribution.
CONDITION_DROPOUT = 0.05


@gin.configurable
def shapes_sft_data_dir(path: Optional[str] = None) -> str:
    return paths_lib.abspath(path or os.environ.get(SHAPES_SFT_ENV) or os.path.join("demo_out", "sft_data"))


@gin.configurable
def corpus_sft_data_dir(path: Optional[str] = None) -> str:
    path = path or os.environ.get(CORPUS_SFT_ENV)
    if not path:
        raise ValueError(f"the corpus SFT tasks ({CORPUS_PREFIX}_*) need their data dir: bind "
                         f"corpus_sft_data_dir.path = '/path' in gin (or set ${CORPUS_SFT_ENV}) to a "
                         "`cm3leon sft prepare --out=DIR` output")
    return paths_lib.abspath(path)  # a gs:// URL stays as it is


@gin.configurable
def sft_feature_converter(pack: bool = True, loss_on_targets_only: bool = True,
                          length_power: float = 0.0) -> seqio.FeatureConverter:
    """The training feature converter of SFT tasks: SeqIO's prefix-LM
    converter (inputs + targets in one decoder sequence). With
    `loss_on_targets_only` (the default) instruction and input tokens carry
    zero loss weight. `length_power` > 0 scales each example's loss weights
    by (its target tokens)^-length_power, so short answers are not drowned
    by images (sft/example_weights.py; 0, the default, is SeqIO's)."""
    if length_power:
        return example_weights.LengthWeightedPrefixLMFeatureConverter(
            length_power, pack=pack, loss_on_targets_only=loss_on_targets_only)
    return seqio.PrefixLMFeatureConverter(pack=pack, loss_on_targets_only=loss_on_targets_only)


class SFTDataSource(seqio.DataSource):
    """One family's records of a prepared SFT dataset as
    {"instruction", "input", "output": int32 [n], "task", "id": string}."""

    def __init__(self, data_dir: PathSpec, family: str):
        self._data_dir, self.family = data_dir, fmt.check_family(family)
        super().__init__(splits=SPLITS, num_input_examples=None, caching_permitted=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str):
        return [split]

    @property
    def data_dir(self) -> str:
        """The prepared dir (a callable path is resolved now)."""
        return resolve_path(self._data_dir)

    def manifest(self) -> dict:
        return rec_lib.read_manifest(self.data_dir)

    def count(self, split: str) -> int:
        try:
            entry = self.manifest()["splits"].get(split, {})
        except ValueError:
            return 0
        return int(entry.get("families", {}).get(self.family, {}).get("count", 0))

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; SFT tasks have {list(SPLITS)}")
        data_dir = self.data_dir
        self.manifest()  # a clear error for a dir that is not SFT data
        files = sorted(tf.io.gfile.glob(rec_lib.shard_pattern(data_dir, self.family, split)))
        n = self.count(split)
        if not files or not n:
            # Empty: a mixture gives this task rate 0 (corpus_sft_mixture over
            # data without this family); `pipeline.check_not_empty` refuses
            # to train on it alone.
            files = []
        ds = tf.data.TFRecordDataset(tf.constant(files, tf.string))
        if shard_info is not None and shard_info.num_shards > 1:
            if n < shard_info.num_shards:
                raise ValueError(f"SFT data {data_dir!r}: {n} {self.family!r} records, fewer than the "
                                 f"{shard_info.num_shards} host shards")
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        spec = {k: tf.io.VarLenFeature(tf.int64) for k in rec_lib.FEATURES}
        spec.update(task=tf.io.FixedLenFeature([], tf.string), id=tf.io.FixedLenFeature([], tf.string))

        def parse(raw):
            ex = tf.io.parse_single_example(raw, spec)
            out = {k: tf.cast(tf.sparse.to_dense(ex[k]), tf.int32) for k in rec_lib.FEATURES}
            return dict(out, task=ex["task"], id=ex["id"])

        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if shuffle and n:  # an empty family (rate 0 in a mixture) has nothing to shuffle
            ds = ds.shuffle(min(n, 100_000), seed=seed, reshuffle_each_iteration=True)
        return ds


def sft_layout(ds: tf.data.Dataset, *, condition_dropout: float, image_output: bool) -> tf.data.Dataset:
    """{"instruction", "input", "output"} -> {"inputs", "targets"} (format.py),
    dropping the conditions of an image-output example (see
    `CONDITION_DROPOUT`) with per-example seeds."""
    brk = tf.constant([vocab_lib.BREAK_ID], tf.int32)
    eos = tf.constant([vocab_lib.EOS_ID], tf.int32)
    mask = tf.constant([vocab_lib.FIRST_MASK_ID], tf.int32)  # <mask:0>
    p = float(condition_dropout) if image_output else 0.0
    if not 0.0 <= 3 * p <= 1.0:
        raise ValueError(f"condition_dropout must lie in [0, 1/3], got {condition_dropout}")

    @seqio.map_over_dataset(num_seeds=1)
    def apply(ex, seed):
        instruction, inp = ex["instruction"], ex["input"]
        if p > 0:
            u = tf.random.stateless_uniform([], seed=seed)
            drop_text = (u < p) | (u >= 1 - p)                # text only, or both
            drop_input = ((u >= p) & (u < 2 * p)) | (u >= 1 - p)  # input only, or both
            instruction = tf.cond(drop_text, lambda: mask, lambda: instruction)
            has_input = tf.size(inp) > 0
            inp = tf.cond(drop_input & has_input, lambda: mask, lambda: inp)
        parts = [instruction, brk]
        inputs = tf.concat(parts + [inp, brk], 0)
        inputs = tf.cond(tf.size(ex["input"]) > 0, lambda: inputs, lambda: tf.concat(parts, 0))
        return {"inputs": inputs, "targets": tf.concat([ex["output"], eos], 0), "task": ex["task"]}

    return apply(ds)


def check_lengths(ds: tf.data.Dataset, sequence_length=None, *, source: SFTDataSource) -> tf.data.Dataset:
    """Refuses feature lengths shorter than the data's longest example."""
    if sequence_length:
        try:
            splits = source.manifest()["splits"]
        except ValueError:
            return ds
        for split, entry in splits.items():
            fam = entry.get("families", {}).get(source.family)
            if not fam:
                continue
            for feature, key in (("inputs", "max_inputs_length"), ("targets", "max_targets_length")):
                want = sequence_length.get(feature)
                if want is not None and fam[key] > want:
                    raise ValueError(
                        f"SeqIO task for SFT family {source.family!r}: TASK_FEATURE_LENGTHS {feature}={want} is "
                        f"shorter than the longest {feature} of its {split!r} data ({fam[key]}); raise it")
    return ds


def _vocabulary_fn(data_dir: PathSpec):
    def fn():
        try:
            return vocab_lib.UnifiedVocabulary(**rec_lib.read_manifest(resolve_path(data_dir))["vocabulary"])
        except ValueError:
            return vocab_lib.UnifiedVocabulary()
    return fn


def register_sft_task(name: str, data_dir: PathSpec, family: str, *,
                      condition_dropout: float = CONDITION_DROPOUT, replace: bool = False) -> seqio.Task:
    """Registers (and returns) the SeqIO task `name` over one family of a
    prepared SFT dataset (paths may be zero-argument callables, resolved when
    the data is first read)."""
    fmt.check_family(family)
    if name in seqio.TaskRegistry.names():
        if not replace:
            raise ValueError(f"a SeqIO task named {name!r} is already registered (pass replace=True)")
        seqio.TaskRegistry.remove(name)
    source = SFTDataSource(data_dir, family)
    vocabulary = UnifiedIdsVocabulary(_vocabulary_fn(data_dir))
    features = {k: seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32) for k in ("inputs", "targets")}
    return seqio.TaskRegistry.add(
        name, source=source,
        preprocessors=[functools.partial(check_lengths, source=source),
                       functools.partial(sft_layout, condition_dropout=condition_dropout,
                                         image_output=family in fmt.IMAGE_OUTPUT)],
        output_features=features, shuffle_buffer_size=1000)


def _count_rate(task: seqio.Task) -> float:
    return float(task.source.count("train"))


# Assumption (the paper gives no mixture weights): the shapes families'
# rates. The loss is a mean over the batch's target tokens, so a family's
# share of the gradient is its rate times its target length: a VQA answer
# is ~3 tokens, a caption ~25, a box list ~20, an image 65. Equal rates
# left VQA about 1% of the gradient (0.51 exact match after 2000 steps).
# These give the text families 2/3 of the examples and ~1/3 of the loss
# tokens, and editing most of the image families' share. Against
# 6/3/3/2/0.5/0.5 (vqa/captioning/detection/editing/edges/boxes) at 2700
# steps: VQA 0.605 both, captioning 0.801 vs 0.795, editing 0.52 vs 0.485,
# detection 0.175 vs 0.251 (benchmarks/RESULTS.md, "Sixth round"). On the
# 7,000-step demo_full model, detection 2 -> 4, captioning 4 -> 2 and VQA
# 4 -> 5: detection mean IoU 0.462 -> 0.682, VQA 0.776 -> 0.757, captioning
# facts 0.923 -> 0.915 (1,000 held-out records; "SFT on the demo_full model").
SHAPES_RATES = {fmt.EDITING: 4.0, fmt.GROUNDED: 0.5, fmt.SPATIAL: 0.5,
                fmt.DETECTION: 4.0, fmt.CAPTIONING: 2.0, fmt.VQA: 5.0}


@gin.configurable
def shapes_sft_rates(rates: Optional[dict] = None) -> dict:
    """Mixing rates of `shapes_sft_mixture` by family (gin
    `shapes_sft_rates.rates = {'vqa': 4.0, ...}`; families left out keep
    `SHAPES_RATES`)."""
    out = dict(SHAPES_RATES)
    for family, rate in (rates or {}).items():
        out[fmt.check_family(family)] = float(rate)
    return out


def _shapes_rate(task: seqio.Task) -> float:
    return shapes_sft_rates()[task.source.family]


def sft_data_dir_of(name: str) -> Optional[str]:
    """The SFT data dir of a registered SFT task or mixture (its first task
    whose dir resolves), or None when `name` is not SFT."""
    provider = seqio.get_mixture_or_task(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    for t in tasks:
        if isinstance(t.source, SFTDataSource):
            try:
                return t.source.data_dir
            except ValueError:
                continue
    return None


def register_builtin():
    for family in fmt.FAMILIES:
        for prefix, path in ((SHAPES_PREFIX, shapes_sft_data_dir), (CORPUS_PREFIX, corpus_sft_data_dir)):
            if f"{prefix}_{family}" not in seqio.TaskRegistry.names():
                register_sft_task(f"{prefix}_{family}", path, family)
    if f"{SHAPES_PREFIX}_mixture" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(f"{SHAPES_PREFIX}_mixture", [(f"{SHAPES_PREFIX}_{f}", _shapes_rate)
                                                             for f in fmt.FAMILIES])
    if f"{CORPUS_PREFIX}_mixture" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add(f"{CORPUS_PREFIX}_mixture", [(f"{CORPUS_PREFIX}_{f}", _count_rate)
                                                              for f in fmt.FAMILIES])


def sft_data_models(name: str) -> dict:
    """The model dirs (VQ-GAN, BPE, ...) an SFT task's prepared data names in
    its manifest; {} when the task's data dir or manifest is missing."""
    sft_dir = sft_data_dir_of(name)
    if sft_dir and paths_lib.isfile(os.path.join(sft_dir, rec_lib.MANIFEST)):
        return rec_lib.read_manifest(sft_dir).get("models", {})
    return {}


pipeline.register_prefix_lm(sft_feature_converter, sft_data_models)
register_builtin()
