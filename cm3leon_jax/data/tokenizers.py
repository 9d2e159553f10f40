"""Text and image tokenizers in the unified CM3Leon id space, and their SeqIO
vocabularies.

Text is a byte-level BPE trained with the Hugging Face `tokenizers` library:
the ByteLevel pre-tokenizer maps every UTF-8 byte to one of 256 printable
characters and the trainer starts from all 256 of them, so any Unicode string
encodes without an unknown token and decodes back exactly. The BPE has no
special tokens of its own: CM3Leon's specials (<pad>, <eos>, <break>,
<infill>, <mask:i>) live in the unified block [0, S), so BPE id `b` is the
unified id `b + UnifiedVocabulary.text_start` and no text ever maps to a
special or an image id.

Size control. The BPE's vocabulary is exactly `vocab_size` =
`UnifiedVocabulary.text_vocab_size` ids: the 256 byte characters plus
`vocab_size - 256` merges (so `vocab_size >= 256`). When the corpus supports
fewer merges (a small corpus, `min_frequency`), the learned tokens are
followed by `⟨unused:i⟩` padding entries up to `vocab_size`; they are made of
characters outside the byte alphabet, have no merge, and can never be
produced by `encode`; `decode` drops them. `manifest.json` records the
learned size.

    train_text_tokenizer(files, vocab_size, out_dir) -> out_dir
    TextTokenizer(out_dir).encode("a caption") -> unified ids
    seqio.Feature(CM3TextVocabulary(out_dir), add_eos=False)
    seqio.Feature(CM3ImageVocabulary(), add_eos=False)
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import json
import os
import sys
import warnings
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.data import text as text_lib

TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
NUM_BYTES = 256  # the byte-level alphabet: the smallest possible BPE
PAD_TOKEN_PREFIX = "\u27e8unused:"  # "⟨unused:i⟩": outside the byte alphabet, so unreachable


# -- reading the corpus ----------------------------------------------------------

def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_jsonl(path: str) -> bool:
    return path.endswith(".jsonl") or path.endswith(".jsonl.gz")


def iter_documents(path: str, stats: Optional[dict] = None) -> Iterator[str]:
    """Documents of one corpus file: a plain-text file holds one document a
    line (blank lines skipped); a `.jsonl` file one JSON object a line whose
    "caption" string is the document (records without one are counted in
    `stats["skipped"]` and skipped). `.gz` files are read through gzip. Text
    is cleaned as at ingestion (`data.text`: lone surrogates -> U+FFFD,
    control characters removed)."""
    stats = stats if stats is not None else {}
    stats.setdefault("documents", 0)
    stats.setdefault("skipped", 0)
    jsonl = _is_jsonl(path)
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if line.endswith("\r"):
                    line = line[:-1]
                if not line.strip():
                    continue
                if jsonl:
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, too deep
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({type(e).__name__}: "
                                         f"{str(e)[:200]})") from None
                    try:
                        caption = text_lib.clean_field(record.get("caption") if isinstance(record, dict) else None)
                    except text_lib.BadText:
                        caption = None
                    if caption is None:
                        stats["skipped"] += 1
                        continue
                    line = caption
                else:
                    line = text_lib.clean_text(line)
                    if not line.strip():
                        continue
                stats["documents"] += 1
                yield line
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _check_input_files(files: Sequence[str]) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    files = [os.fspath(f) for f in files]
    if not files:
        raise ValueError("no input files given to train the text tokenizer on")
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer input file {path!r} does not exist (or is not a file)")
        if os.path.getsize(path) == 0:
            raise ValueError(f"tokenizer input file {path!r} is empty")
        # A cheap look at the start: a file of blank lines or caption-less
        # records would otherwise only be noticed after training.
        with contextlib.closing(iter_documents(path)) as docs:
            empty = next(docs, None) is None
        if empty:
            what = 'records with a "caption" string' if _is_jsonl(path) else "non-blank lines"
            raise ValueError(f"tokenizer input file {path!r} has no documents ({what})")
    return files


# -- training --------------------------------------------------------------------

def _new_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_text_tokenizer(files: list[str], vocab_size: int, out_dir: str, min_frequency: int = 2,
                         show_progress: bool = False) -> str:
    """Trains a byte-level BPE of exactly `vocab_size` ids on `files` and
    writes `tokenizer.json` and `manifest.json` to `out_dir`; returns `out_dir`
    (what `TextTokenizer` and `CM3TextVocabulary` take).

    `vocab_size` is the number of BPE ids, `UnifiedVocabulary.text_vocab_size`
    (the specials are not part of it). If the corpus supports fewer merges,
    the remainder is unreachable padding and a warning says so.

    Raises:
      ValueError: a missing, empty or document-less input file (named), a
        `.jsonl` line that is not JSON, or `vocab_size < 256`.
    """
    import tokenizers
    from tokenizers import Tokenizer, pre_tokenizers, trainers

    files = _check_input_files(files)
    vocab_size = int(vocab_size)
    if vocab_size < NUM_BYTES:
        raise ValueError(f"vocab_size {vocab_size} is below {NUM_BYTES}: a byte-level BPE needs one id "
                         "per byte before any merge")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")

    stats = {f: {} for f in files}

    def corpus():
        for f in files:
            yield from iter_documents(f, stats[f])

    tok = _new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(corpus(), trainer=trainer)

    spec = json.loads(tok.to_str())
    if spec.get("added_tokens"):
        raise AssertionError("the BPE trainer added special tokens; none were asked for")
    model_vocab = spec["model"]["vocab"]
    learned = len(model_vocab)
    if learned > vocab_size:  # not expected from the trainer; never exceed the id block
        raise AssertionError(f"BPE trainer produced {learned} tokens for vocab_size={vocab_size}")
    if learned < vocab_size:
        warnings.warn(
            f"the corpus supports only {learned - NUM_BYTES} merges at min_frequency={min_frequency}: "
            f"learned {learned} of {vocab_size} BPE ids; the other {vocab_size - learned} ids are "
            "unused padding that encode never produces (a larger corpus fills them)", stacklevel=2)
        for i in range(learned, vocab_size):
            model_vocab[f"{PAD_TOKEN_PREFIX}{i}\u27e9"] = i
        tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError(f"tokenizer has {tok.get_vocab_size()} ids, expected {vocab_size}")

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, TOKENIZER_FILE))
    manifest = {
        "type": "byte_level_bpe",
        "vocab_size": vocab_size,
        "learned_vocab_size": learned,
        "num_merges": len(spec["model"]["merges"]),
        "min_frequency": min_frequency,
        "source_files": [os.path.abspath(f) for f in files],
        "num_documents": {os.path.abspath(f): stats[f].get("documents", 0) for f in files},
        "skipped_records": sum(s.get("skipped", 0) for s in stats.values()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tokenizers_version": tokenizers.__version__,
    }
    with open(os.path.join(out_dir, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return out_dir


def train_text_main(input_files, vocab_size, out_dir, min_frequency: int = 2) -> int:
    """`cm3leon tokenizer train-text --input FILES --vocab_size N --out DIR`:
    trains, prints progress and the result; returns the exit status (0 ok,
    1 bad input)."""
    if isinstance(input_files, str):
        input_files = [f for f in input_files.split(",") if f]
    print(f"training a byte-level BPE of {vocab_size} ids on {len(input_files)} file(s): "
          f"{', '.join(input_files)}", flush=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_text_tokenizer(list(input_files), int(vocab_size), out_dir, min_frequency=min_frequency,
                                 show_progress=sys.stderr.isatty())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    with open(os.path.join(out_dir, MANIFEST_FILE)) as f:
        m = json.load(f)
    docs = sum(m["num_documents"].values())
    print(f"read {docs} documents" + (f" ({m['skipped_records']} records without a caption skipped)"
                                      if m["skipped_records"] else ""))
    print(f"wrote {os.path.join(out_dir, TOKENIZER_FILE)}: {m['vocab_size']} BPE ids "
          f"({m['learned_vocab_size']} learned, {m['num_merges']} merges)")
    configured = vocab_lib.UnifiedVocabulary().text_vocab_size
    if configured != m["vocab_size"]:
        print(f"note: the unified vocabulary in force has text_vocab_size={configured}; models using "
              f"this tokenizer need `UnifiedVocabulary.text_vocab_size = {m['vocab_size']}`")
    return 0


# -- text ----------------------------------------------------------------------

def _check_encodable(text: str, what: str) -> None:
    """The BPE (Rust) takes only valid Unicode; say which text is not,
    instead of its `TypeError: TextInputSequence must be str`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a lone surrogate {text[e.start]!r} at character {e.start} "
                         f"({text[max(0, e.start - 20):e.start]!r}...): not Unicode text; clean it with "
                         "cm3leon_jax.data.text.clean_text") from None


def _tokenizer_file(path: str) -> str:
    path = os.fspath(path)
    return os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path


class TextTokenizer:
    """A trained byte-level BPE, speaking unified ids.

    Args:
      path: a directory holding `tokenizer.json` (what `train_text_tokenizer`
        wrote), or the file itself.
      vocabulary: the unified layout; default `UnifiedVocabulary()` (gin).

    Raises ValueError when the BPE was trained for another size than
    `vocabulary.text_vocab_size`, has tokens of its own (added/special), or
    does not cover all 256 bytes (so some text would not round-trip).
    """

    def __init__(self, path: str, vocabulary: Optional[vocab_lib.UnifiedVocabulary] = None):
        from tokenizers import Tokenizer, pre_tokenizers

        self.path = _tokenizer_file(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"no tokenizer at {path!r} (expected {TOKENIZER_FILE}; train one with "
                             "`cm3leon tokenizer train-text`)")
        self.vocabulary = vocabulary or vocab_lib.UnifiedVocabulary()
        with open(self.path, "rb") as f:
            raw = f.read()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        size = self._tok.get_vocab_size(with_added_tokens=True)
        want = self.vocabulary.text_vocab_size
        if size != want:
            raise ValueError(
                f"tokenizer {self.path} was trained for {size} BPE ids but the unified vocabulary has "
                f"text_vocab_size={want}: bind `UnifiedVocabulary.text_vocab_size = {size}` or retrain "
                f"with --vocab_size {want}")
        added = self._tok.get_vocab_size(with_added_tokens=True) - self._tok.get_vocab_size(False)
        if added:
            raise ValueError(f"tokenizer {self.path} has {added} added/special tokens; CM3Leon's specials "
                             "live in the unified block, the BPE must have none")
        token_to_id = self._tok.get_vocab(with_added_tokens=False)
        missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in token_to_id]
        if missing:
            raise ValueError(f"tokenizer {self.path} lacks {len(missing)} of the 256 byte tokens: not a "
                             "byte-level BPE, some text would not round-trip")
        pads = [i for t, i in token_to_id.items() if t.startswith(PAD_TOKEN_PREFIX)]
        self.learned_vocab_size = min(pads) if pads else size
        self._decode_table = None

    @property
    def vocab_size(self) -> int:
        """Number of BPE ids (= vocabulary.text_vocab_size)."""
        return self.vocabulary.text_vocab_size

    def _to_unified(self, bpe_ids) -> np.ndarray:
        ids = np.asarray(bpe_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.learned_vocab_size):  # cannot happen
            raise AssertionError("BPE produced an id outside its learned vocabulary")
        return (ids + self.vocabulary.text_start).astype(np.int32)

    def encode(self, text: str) -> np.ndarray:
        """Unified ids (int32) of `text`; all of them text ids. "" -> [].

        Raises TypeError for a non-str and ValueError for a str that is not
        Unicode text (a lone surrogate: clean it first with
        `data.text.clean_text`, as every source does at ingestion)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        if not text:
            return np.zeros([0], np.int32)
        _check_encodable(text, "encode's text")
        return self._to_unified(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch takes strs, got {type(t).__name__} at position {i}")
            _check_encodable(t, f"encode_batch's text {i}")
        encs = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
        return [self._to_unified(e.ids) for e in encs]

    def decode(self, ids, skip_non_text: bool = False) -> str:
        """The text of unified `ids` (a 1-D sequence).

        Special ids (<pad>, <eos>, <break>, masks, ...) are skipped, as are the
        unused padding ids of a BPE that learned fewer tokens than its size.
        Image ids raise ValueError unless `skip_non_text=True` (then they are
        skipped too: the text of a mixed document). Ids outside the unified
        vocabulary always raise ValueError.
        """
        v = self.vocabulary
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes a 1-D id sequence, got shape {ids.shape}")
        if ids.size == 0:
            return ""
        if ids.dtype.kind not in "iu":
            raise TypeError(f"decode takes integer ids, got dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        bad = (ids < 0) | (ids >= v.size)
        if bad.any():
            raise ValueError(f"ids {ids[bad][:5].tolist()} are outside the unified vocabulary [0, {v.size})")
        image = v.is_image(ids)
        if image.any() and not skip_non_text:
            raise ValueError(f"decode got {int(image.sum())} image ids among text ids (first at position "
                             f"{int(np.argmax(image))}); pass skip_non_text=True to drop them")
        bpe = ids[v.is_text(ids)] - v.text_start
        bpe = bpe[bpe < self.learned_vocab_size]
        return self._tok.decode(bpe.tolist(), skip_special_tokens=False) if bpe.size else ""

    def decode_batch(self, batch, skip_non_text: bool = False) -> list[str]:
        return [self.decode(ids, skip_non_text=skip_non_text) for ids in batch]


# -- SeqIO vocabularies --------------------------------------------------------

def _fold_ragged(flat_values, row_lengths, shape, rank: int):
    """Ragged [*shape, None] from the concatenated rows of a flattened batch."""
    rt = tf.RaggedTensor.from_row_lengths(flat_values, row_lengths)
    for d in reversed(range(1, rank)):
        rt = tf.RaggedTensor.from_uniform_row_length(rt, shape[d])
    return rt


class _UnifiedSpaceVocabulary(seqio.Vocabulary):
    """What the SeqIO vocabularies below share: ids are unified ids (of
    `self.unified`), <eos> is the unified one, no unknown id."""

    @property
    def eos_id(self) -> int:
        return vocab_lib.EOS_ID

    @property
    def unk_id(self) -> Optional[int]:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self.unified.size


class CM3TextVocabulary(_UnifiedSpaceVocabulary):
    """SeqIO vocabulary of CM3Leon text: strings <-> unified ids via a trained
    `TextTokenizer`. `vocab_size` is the whole unified vocabulary, so a
    feature of this vocabulary may also hold specials and image codes (a full
    `text <break> image <eos>` document).

    Decoding stops after the first <eos> (SeqIO's rule) and skips special
    ids; image ids are skipped when `skip_non_text` (the default here, so a
    mixed document decodes to its text) and raise otherwise. The TF versions
    run the tokenizer through `tf.numpy_function` (fine in tf.data; such a
    graph cannot be serialised).
    """

    def __init__(self, tokenizer_path: str, vocabulary: Optional[vocab_lib.UnifiedVocabulary] = None,
                 skip_non_text: bool = True):
        self.tokenizer = TextTokenizer(tokenizer_path, vocabulary)
        self.unified = self.tokenizer.vocabulary
        self.skip_non_text = skip_non_text
        super().__init__(extra_ids=0)

    def _encode(self, s: str) -> Sequence[int]:
        return self.tokenizer.encode(s).tolist()

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(list(ids), np.int64), skip_non_text=self.skip_non_text)

    # numpy bodies of the TF ops
    def _encode_flat_np(self, strings):
        # TF strings are bytes, not necessarily UTF-8: bad bytes become U+FFFD (data/text.py's policy)
        rows = self.tokenizer.encode_batch(
            [text_lib.decode_utf8(s)[0] if isinstance(s, bytes) else str(s) for s in strings.reshape(-1)])
        lengths = np.array([len(r) for r in rows], np.int64)
        flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros([0], np.int32)
        return flat, lengths

    def _decode_rows_np(self, rows):
        return np.array([self.tokenizer.decode(r, skip_non_text=self.skip_non_text).encode("utf-8")
                         for r in rows], dtype=object)

    def _encode_tf(self, s: tf.Tensor):
        """A string tensor -> its ids: [None] int32 for a scalar, a
        RaggedTensor [..., None] for a batch of strings."""
        s = tf.convert_to_tensor(s, tf.string)
        rank = s.shape.rank
        if rank is None:
            raise ValueError("CM3TextVocabulary.encode_tf needs a string tensor of known rank")
        flat, lengths = tf.numpy_function(self._encode_flat_np, [tf.reshape(s, [-1])],
                                          [tf.int32, tf.int64], stateful=False)
        flat.set_shape([None])
        lengths.set_shape([None])
        if rank == 0:
            return flat
        return _fold_ragged(flat, lengths, tf.shape(s, out_type=tf.int64), rank)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Int ids [..., L] -> strings [...]."""
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank is None or ids.shape.rank < 1:
            raise ValueError("CM3TextVocabulary.decode_tf needs ids of rank >= 1")
        shape = tf.shape(ids)
        rows = tf.reshape(ids, tf.stack([-1, shape[-1]]))
        out = tf.numpy_function(self._decode_rows_np, [rows], tf.string, stateful=False)
        out.set_shape([None])
        out = tf.reshape(out, shape[:-1])
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other):
        return (isinstance(other, CM3TextVocabulary) and self.tokenizer.sha256 == other.tokenizer.sha256
                and self.unified == other.unified and self.skip_non_text == other.skip_non_text)

    def __hash__(self):
        return hash((CM3TextVocabulary, self.tokenizer.sha256, self.unified, self.skip_non_text))

    def __repr__(self):
        return f"CM3TextVocabulary({self.tokenizer.path!r}, {self.unified})"


class CM3ImageVocabulary(_UnifiedSpaceVocabulary):
    """SeqIO vocabulary of VQ image codes: codes <-> unified ids.

    `encode` takes codes of any shape (a list, an array, a [h, w] grid) and
    returns the unified ids of the codes in row-major (raster) order; codes
    outside [0, image_codebook_size) raise (ValueError in Python,
    InvalidArgumentError in TF). `decode` returns the codes of the image ids
    up to the first <eos>, other ids (specials, text) dropped.
    """

    def __init__(self, vocabulary: Optional[vocab_lib.UnifiedVocabulary] = None):
        self.unified = vocabulary or vocab_lib.UnifiedVocabulary()
        super().__init__(extra_ids=0)

    def _encode(self, codes) -> Sequence[int]:
        if isinstance(codes, (str, bytes)):
            raise TypeError("CM3ImageVocabulary encodes image codes (integers), not strings")
        codes = np.asarray(codes)
        if codes.size == 0:
            return []
        if codes.dtype.kind not in "iu":
            raise TypeError(f"image codes must be integers, got dtype {codes.dtype}")
        return self.unified.image_code_to_id(codes.reshape(-1).astype(np.int64)).astype(np.int32).tolist()

    def _decode(self, ids) -> np.ndarray:
        ids = np.asarray(list(ids), np.int64)
        return (ids[self.unified.is_image(ids)] - self.unified.image_start).astype(np.int32)

    def _encode_tf(self, codes: tf.Tensor) -> tf.Tensor:
        codes = tf.reshape(tf.cast(codes, tf.int32), [-1])
        n = self.unified.image_codebook_size
        checks = [
            tf.debugging.assert_non_negative(codes, message="image codes must be >= 0"),
            tf.debugging.assert_less(codes, tf.constant(n, tf.int32),
                                     message=f"image codes must be < image_codebook_size={n}"),
        ]
        with tf.control_dependencies(checks):
            return codes + self.unified.image_start

    def _decode_tf(self, ids: tf.Tensor):
        """Ids [L] -> codes [None]; a batch [..., L] -> a RaggedTensor."""
        ids = tf.cast(tf.convert_to_tensor(ids), tf.int32)
        v = self.unified
        mask = (ids >= v.image_start) & (ids < v.text_start)
        if ids.shape.rank == 1:
            return tf.boolean_mask(ids, mask) - v.image_start
        return tf.ragged.boolean_mask(ids, mask) - v.image_start

    def __eq__(self, other):
        return isinstance(other, CM3ImageVocabulary) and self.unified == other.unified

    def __hash__(self):
        return hash((CM3ImageVocabulary, self.unified))

    def __repr__(self):
        return f"CM3ImageVocabulary({self.unified})"


class UnifiedIdsVocabulary(_UnifiedSpaceVocabulary):
    """SeqIO vocabulary of sequences that are already unified ids (mixed
    text, image codes and specials, as CM3 training sequences are): encode
    and decode pass the ids through unchanged.

    The size is looked up when first asked, from `vocabulary_fn()` (by
    default the gin-bound `UnifiedVocabulary` in force then), so a task
    registered at import time reports the vocabulary of the data or config
    it ends up reading, not the one in force at import."""

    def __init__(self, vocabulary_fn=None):
        self._vocabulary_fn = vocabulary_fn or vocab_lib.UnifiedVocabulary
        super().__init__(extra_ids=0)

    @property
    def unified(self) -> vocab_lib.UnifiedVocabulary:
        return self._vocabulary_fn()

    def _encode(self, s):
        return list(s)

    def _decode(self, ids):
        return list(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        return s

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return ids

    def __eq__(self, other):
        # Equal when the id layouts are (resolving both): the tasks of a mixture
        # over one prepared dataset share a vocabulary.
        if not isinstance(other, UnifiedIdsVocabulary):
            return False
        return self._vocabulary_fn == other._vocabulary_fn or self.unified == other.unified

    def __hash__(self):
        return hash(UnifiedIdsVocabulary)  # consistent with the layout equality

    def __repr__(self):
        return f"UnifiedIdsVocabulary({self._vocabulary_fn!r})"
