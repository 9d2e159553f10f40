"""Instruction records -> a prepared SFT dataset.

An *instruction record* is what a converter (sft/sources.py, the shapes
instruction corpus in sft/shapes_instructions.py) produces, one JSON object per
line of an `instructions.jsonl`:

    {"id": "...", "task": "editing" | "grounded" | "spatial" | "detection"
                          | "captioning" | "vqa",
     "instruction": "make the red circle blue",
     "input_image": "relative/or/absolute.png" | null,   (image-input tasks)
     "output_image": "..." | null,                        (image-output tasks)
     "output_text": "..." | null,                         (text-output tasks)
     "meta": {...}}                                       (ground truth for eval)

Image paths are relative to the JSONL's directory unless absolute; records
built in memory may hold uint8 arrays instead of paths.

`prepare_sft(records, out_dir, vqgan_dir, text_tokenizer, split=...)`
tokenises them (the VQ-GAN for images, the BPE for text, into the unified
id space) and writes

    out_dir/FAMILY/SPLIT-KKKKK-of-NNNNN.tfrecord   tf.train.Example records:
        instruction, input, output   int64 unified ids (no <break>/<eos>:
                                     sft/format.py lays them out)
        task, id, meta               bytes (meta: the record's JSON "meta")
    out_dir/sft.json                 manifest: the vocabulary layout, the
                                     models' identities, per split and family
                                     the count, the longest inputs / targets
                                     and the skips by reason

A record is skipped and counted by reason, never a crash: "missing image",
"corrupt or truncated image" (and the other `data.images` reasons), "empty
instruction", "empty output", "over-long" (inputs or targets longer than
`max_inputs_length` / `max_targets_length`: SeqIO would cut them silently),
"unknown task family", "wrong modality" (e.g. a VQA record without text).
Writing is to temporary names, renamed when the split is complete; a rerun
of a split replaces it. Single process (no Beam): SFT sets are far smaller
than the pretraining corpus.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import sys
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from cm3leon_jax import paths as paths_lib
from cm3leon_jax.sft import format as fmt

MANIFEST = "sft.json"
FORMAT_VERSION = 1


def read_jsonl(path: str) -> Iterator[dict]:
    """The records of an instructions.jsonl, image paths made absolute.
    A line that is not a JSON object is yielded as {"_bad_line": n} so the
    preparation counts it."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8", errors="replace") as f:  # bad bytes: U+FFFD (data/text.py's policy)
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, an integer of > 4300 digits, nested too deep
                yield {"_bad_line": n}
                continue
            if not isinstance(rec, dict):
                yield {"_bad_line": n}
                continue
            for k in ("input_image", "output_image"):
                v = rec.get(k)
                if isinstance(v, str) and v and not os.path.isabs(v):
                    rec[k] = os.path.join(base, v)
            yield rec


def write_jsonl(records: Iterable[dict], path: str) -> int:
    """Writes records (paths as given) atomically; returns the count."""
    n = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
            n += 1
    os.replace(path + ".tmp", path)
    return n


class _Skip(Exception):
    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _example(instruction, input_ids, output, task: str, rid: str, meta) -> bytes:
    import tensorflow as tf

    def ints(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in v]))

    def raw(s: str):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[s.encode("utf-8")]))

    return tf.train.Example(features=tf.train.Features(feature={
        "instruction": ints(instruction), "input": ints(input_ids), "output": ints(output),
        "task": raw(task), "id": raw(rid), "meta": raw(json.dumps(meta or {}))})).SerializeToString()


def _bpe_size(text_tokenizer: str) -> int:
    from tokenizers import Tokenizer

    from cm3leon_jax.data.tokenizers import _tokenizer_file

    return Tokenizer.from_file(_tokenizer_file(text_tokenizer)).get_vocab_size(with_added_tokens=True)


def open_tokenizers(vqgan_dir: str, text_tokenizer: str):
    """(ImageTokenizer, TextTokenizer, UnifiedVocabulary): the layout sized by
    the two tokenizers, as `cm3leon prepare` sizes it."""
    from cm3leon_jax import vocab as vocab_lib
    from cm3leon_jax.data.tokenizers import TextTokenizer
    from cm3leon_jax.models.image_tokenizer import ImageTokenizer

    for what, path in (("VQ-GAN model dir", vqgan_dir), ("text tokenizer", text_tokenizer)):
        if not path or not os.path.exists(path):
            raise ValueError(f"the {what} {path!r} does not exist")
    vq = ImageTokenizer.from_model_dir(vqgan_dir, batch_size=32)
    vocab = vocab_lib.UnifiedVocabulary(num_special_tokens=64, num_mask_tokens=32,
                                        image_codebook_size=vq.codebook_size,
                                        text_vocab_size=_bpe_size(text_tokenizer))
    return vq, TextTokenizer(text_tokenizer, vocab), vocab


def _load(image, resolution: int, label: str) -> np.ndarray:
    from cm3leon_jax.data.images import BadImageError, load_image

    if isinstance(image, np.ndarray):
        if image.shape != (resolution, resolution, 3) or image.dtype != np.uint8:
            raise _Skip("bad image array")
        return image
    if not isinstance(image, str) or not image:
        raise _Skip("wrong modality")
    try:
        return load_image(image, resolution, name=label)
    except BadImageError as e:
        raise _Skip(e.reason) from None


def _check(rec: dict):
    """(family, instruction text, output text or None): structural checks."""
    if "_bad_line" in rec:
        raise _Skip("not a JSON object")
    family = rec.get("task")
    if family not in fmt.FAMILIES:
        raise _Skip("unknown task family")
    instruction = _text(rec.get("instruction"), "instruction")
    if not instruction:
        raise _Skip("empty instruction")
    want_in, want_out = fmt.FAMILIES[family]
    has_in = rec.get("input_image") is not None
    if has_in != (want_in == "image"):
        raise _Skip("wrong modality")
    if want_out == "image":
        if rec.get("output_image") is None:
            raise _Skip("wrong modality")
        return family, instruction, None
    text = _text(rec.get("output_text"), "output text")
    if not text:
        raise _Skip("empty output")
    return family, instruction, text


def _text(value, what: str):
    """The cleaned text of a record's field (data/text.py: lone surrogates ->
    U+FFFD, control characters removed), None when blank; a field that is
    not text is skipped under its reason ("instruction is not a string")."""
    from cm3leon_jax.data import text as text_lib

    try:
        return text_lib.clean_field(value, what)
    except text_lib.BadText as e:
        raise _Skip(e.reason) from None


def prepare_sft(records: Union[str, Iterable[dict]], out_dir: str, vqgan_dir: str, text_tokenizer: str, *,
                split: str = "train", max_inputs_length: int = 128, max_targets_length: int = 128,
                records_per_shard: int = 10000, batch_size: int = 64, progress: bool = True) -> dict:
    """Tokenises instruction records (a JSONL path or an iterable of dicts)
    into `out_dir` (module docstring); returns this split's manifest entry."""
    import tensorflow as tf
    from tqdm import tqdm

    if split not in ("train", "validation"):
        raise ValueError(f"split must be train or validation, got {split!r}")
    source = records
    if isinstance(records, str):
        if not os.path.isfile(records):
            raise ValueError(f"instruction records {records!r} not found (a JSONL from `cm3leon sft convert` "
                             "or the shapes instruction corpus)")
        records = read_jsonl(records)
    vq, text_tok, vocab = open_tokenizers(vqgan_dir, text_tokenizer)
    manifest = _open_manifest(out_dir, vocab, vqgan_dir, text_tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    # An interrupted run's temporary shards are garbage; the split's finished
    # shards stay until this run has written its own (a failure keeps them).
    for stale in glob.glob(os.path.join(out_dir, "*", f"{split}-*.tfrecord.tmp")):
        os.remove(stale)

    skipped = collections.Counter()
    counts = collections.Counter()
    longest = collections.defaultdict(lambda: [0, 0])
    writers, written = {}, collections.Counter()
    tmp_files = []

    def writer(family):
        k = written[family] // records_per_shard
        key = (family, k)
        if key not in writers:
            for (f, j), w in list(writers.items()):
                if f == family:
                    w.close()
                    del writers[(f, j)]
            os.makedirs(os.path.join(out_dir, family), exist_ok=True)
            path = os.path.join(out_dir, family, f"{split}-{k:05d}.tfrecord.tmp")
            tmp_files.append(path)
            writers[key] = tf.io.TFRecordWriter(path)
        return writers[key]

    def flush(batch):
        images, slots = [], []
        for i, (rec, family, _, _) in enumerate(batch):
            for field in ("input_image", "output_image"):
                if rec.get(field) is not None:
                    try:
                        images.append(_load(rec[field], vq.resolution, f"record {rec.get('id')!r} {field}"))
                        slots.append((i, field))
                    except _Skip as s:
                        batch[i] = (rec, None, s.reason, None)
        codes = vq.encode(np.stack(images)) if images else np.zeros((0, vq.codes_per_image), np.int32)
        per = collections.defaultdict(dict)
        for (i, field), c in zip(slots, codes):
            per[i][field] = vocab.image_code_to_id(c.astype(np.int64)).astype(np.int32)
        for i, (rec, family, reason, text) in enumerate(batch):
            if family is None:
                skipped[reason] += 1
                continue
            instr = text_tok.encode(rec["instruction"].strip())
            inp = per[i].get("input_image", np.zeros(0, np.int32))
            out = per[i]["output_image"] if text is None else text_tok.encode(text.strip())
            inputs, targets = fmt.layout(instr, inp, out)
            if len(inputs) > max_inputs_length or len(targets) > max_targets_length:
                skipped["over-long"] += 1
                continue
            w = writer(family)
            rid = _text(str(rec.get("id", "")), "id") or ""
            w.write(_example(instr, inp, out, family, rid, rec.get("meta")))
            written[family] += 1
            counts[family] += 1
            longest[family][0] = max(longest[family][0], len(inputs))
            longest[family][1] = max(longest[family][1], len(targets))

    batch = []
    bar = tqdm(desc=f"sft prepare {split}", unit="rec", file=sys.stderr, disable=not progress,
               dynamic_ncols=True, mininterval=2)
    for rec in records:
        bar.update()
        try:
            family, instruction, text = _check(rec)
            batch.append((dict(rec, instruction=instruction), family, None, text))
        except _Skip as s:
            skipped[s.reason] += 1
            continue
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    for w in writers.values():
        w.close()
    # Shard names get their final -of-NNNNN once the split's counts are known;
    # then the split's previous shards (every family's: a rerun replaces the
    # whole split) go.
    final = set()
    for family in counts:
        n = (counts[family] + records_per_shard - 1) // records_per_shard
        for k in range(n):
            src = os.path.join(out_dir, family, f"{split}-{k:05d}.tfrecord.tmp")
            dst = os.path.join(out_dir, family, f"{split}-{k:05d}-of-{n:05d}.tfrecord")
            os.replace(src, dst)
            final.add(os.path.abspath(dst))
    for old in glob.glob(os.path.join(out_dir, "*", f"{split}-*-of-*.tfrecord")):
        if os.path.abspath(old) not in final:
            os.remove(old)
    entry = {"source": source if isinstance(source, str) else "<in memory>",
             "count": int(sum(counts.values())),
             "families": {f: {"count": int(counts[f]), "max_inputs_length": longest[f][0],
                              "max_targets_length": longest[f][1]} for f in sorted(counts)},
             "skipped": dict(sorted(skipped.items())),
             "max_inputs_length": int(max_inputs_length), "max_targets_length": int(max_targets_length)}
    manifest["splits"][split] = entry
    _write_manifest(out_dir, manifest)
    return entry


def _open_manifest(out_dir: str, vocab, vqgan_dir: str, text_tokenizer: str) -> dict:
    import dataclasses

    layout = dataclasses.asdict(vocab)
    models = {"vqgan_dir": os.path.abspath(vqgan_dir), "text_tokenizer": os.path.abspath(text_tokenizer)}
    path = os.path.join(out_dir, MANIFEST)
    if os.path.isfile(path):
        man = read_manifest(out_dir)
        if man["vocabulary"] != layout:
            raise ValueError(f"{out_dir!r} holds SFT data of another vocabulary ({man['vocabulary']} vs "
                             f"{layout}): use a new --out")
        man["models"] = models
        return man
    return {"format_version": FORMAT_VERSION, "vocabulary": layout, "models": models, "splits": {}}


def _write_manifest(out_dir: str, man: dict):
    path = os.path.join(out_dir, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(man, f, indent=1)
    os.replace(path + ".tmp", path)


def read_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not paths_lib.isfile(path):  # local or gs:// (paths.py)
        raise ValueError(f"{data_dir!r} has no {MANIFEST}: not a prepared SFT dataset (make one with "
                         "`cm3leon sft prepare`)")
    try:
        with paths_lib.open(path) as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt SFT manifest {path!r} ({e}): prepare again") from None
    if man.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path!r}: SFT format version {man.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}: prepare again")
    return man


def shard_pattern(data_dir: str, family: str, split: str) -> str:
    return os.path.join(paths_lib.abspath(data_dir), family, f"{split}-*-of-*.tfrecord")


FEATURES = ("instruction", "input", "output")


def read_examples(data_dir: str, family: str, split: str, limit: Optional[int] = None) -> list:
    """The records of one family and split as dicts (numpy ids, meta parsed),
    in file order; for evaluation."""
    import tensorflow as tf

    pattern = shard_pattern(data_dir, family, split)
    files = sorted(tf.io.gfile.glob(pattern) if paths_lib.is_url(pattern) else glob.glob(pattern))
    out = []
    for raw in tf.data.TFRecordDataset(files).take(-1 if limit is None else limit).as_numpy_iterator():
        ex = tf.train.Example.FromString(raw)
        f = ex.features.feature
        rec = {k: np.asarray(f[k].int64_list.value, np.int32) for k in FEATURES}
        rec.update(task=f["task"].bytes_list.value[0].decode(), id=f["id"].bytes_list.value[0].decode(),
                   meta=json.loads(f["meta"].bytes_list.value[0].decode()))
        out.append(rec)
    return out
