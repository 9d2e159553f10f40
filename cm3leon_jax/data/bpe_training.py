"""Training the project's byte-level BPE (`cm3leon tokenizer train-text`):
reading a caption corpus (`iter_documents`) and `train_text_tokenizer`,
which writes the `tokenizer.json` that `data.tokenizers.TextTokenizer`
reads (the BPE's design: data/tokenizers.py).

Size control. The BPE's vocabulary is exactly `vocab_size` =
`UnifiedVocabulary.text_vocab_size` ids: the 256 byte characters plus
`vocab_size - 256` merges (so `vocab_size >= 256`). When the corpus supports
fewer merges (a small corpus, `min_frequency`), the learned tokens are
followed by `⟨unused:i⟩` padding entries up to `vocab_size`; they are made of
characters outside the byte alphabet, have no merge, and can never be
produced by `encode`; `decode` drops them. `manifest.json` records the
learned size.

    train_text_tokenizer(files, vocab_size, out_dir) -> out_dir
"""
from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import sys
import warnings
from typing import Iterator, Optional, Sequence

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.data import text as text_lib
from cm3leon_jax.data.tokenizers import PAD_TOKEN_PREFIX, TOKENIZER_FILE

MANIFEST_FILE = "manifest.json"
NUM_BYTES = 256  # the byte-level alphabet: the smallest possible BPE


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
