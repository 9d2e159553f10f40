"""Text cleaning at ingestion: the one policy every caption, instruction and
prompt goes through before anything tokenises, hashes or stores it.

Scraped text breaks libraries in ways valid JSON allows: a lone UTF-16
surrogate (`"\\udcff"`, or bytes a scraper decoded with `surrogateescape`)
is a Python str that cannot be encoded as UTF-8, so the BPE, msgpack and
`str.encode` all raise on it deep inside a pipeline. The policy:

- lone surrogates -> U+FFFD (a surrogate *pair* held as two code points is
  joined into its character); undecodable bytes -> U+FFFD, as Python's
  `errors="replace"` does. A text that is mostly such replacements (more
  than half its characters) is not text: `BadText("... is not UTF-8 text")`.
- control characters other than tab and newline are removed; `\\r\\n` and a
  lone `\\r` become `\\n`; a leading byte-order mark is dropped.
- longer than `MAX_TEXT_CHARS` (64 Ki characters): cut there. The model
  reads at most `max_text_tokens` tokens of a caption (128 by default) and
  CLIP 77, so nothing a model would see is lost, and one 1 MB caption cannot
  dominate a shard's memory.
- a field that is present but not a string (a number, a list, an object):
  `BadText("... is not a string")`; blank after cleaning: None (the record
  has no text; callers count "empty caption" / "empty text" as before).

Unicode normalisation (NFC) is deliberately not applied: the byte-level BPE
encodes any code point, and the stored caption stays the one the user gave.
"""
from __future__ import annotations

import codecs
import re
from typing import Optional

MAX_TEXT_CHARS = 65536
REPLACEMENT = "\ufffd"

_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls except \t \n (\r is rewritten first), DEL and the C1 block
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class BadText(ValueError):
    """A text field that cannot be used; `.reason` is a short category for
    skip counts ("caption is not a string")."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}{': ' + detail if detail else ''}")


def _replace_surrogates(text: str) -> tuple:
    """(text with lone surrogates -> U+FFFD, number replaced)."""
    if text.isascii() or not _SURROGATE.search(text):
        return text, 0
    # UTF-16 with surrogatepass joins a valid high+low pair; lone halves
    # fail to decode and are replaced one for one.
    fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return fixed, fixed.count(REPLACEMENT) - text.count(REPLACEMENT)


def clean_text(text: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """`text` under the module's policy (possibly ""); always encodable as
    UTF-8. Raises TypeError for a non-str (callers that read records use
    `clean_field`, which names the field)."""
    return _clean(text, max_chars)[0]


def _clean(text: str, max_chars: int) -> tuple:
    if not isinstance(text, str):
        raise TypeError(f"clean_text takes a str, got {type(text).__name__}")
    text, replaced = _replace_surrogates(str(text))
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.isprintable():  # fast path: most captions have no control character
        text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    if len(text) > max_chars:
        text = text[:max_chars]
    return text, replaced


def decode_utf8(data: bytes) -> tuple:
    """(str, number of undecodable byte runs replaced by U+FFFD). An
    incomplete character at the very end (a cut read) is dropped, not
    replaced."""
    data = bytes(data)
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)
    return text, text.count(REPLACEMENT) - data.count(REPLACEMENT.encode("utf-8"))


def clean_field(value, what: str = "caption", max_chars: int = MAX_TEXT_CHARS) -> Optional[str]:
    """A record's text field (`what` names it in reasons: "caption",
    "instruction", ...) -> the cleaned text, or None when it is absent or
    blank. Bytes are decoded as UTF-8. Raises `BadText` for a value that is
    not text: "{what} is not a string", "{what} is not UTF-8 text"."""
    if value is None:
        return None
    replaced = 0
    if isinstance(value, (bytes, bytearray, memoryview)):
        value, replaced = decode_utf8(value)
    if not isinstance(value, str):
        raise BadText(f"{what} is not a string", f"got {type(value).__name__}")
    text, more = _clean(value, max_chars)
    replaced += more
    if replaced and 2 * replaced > len(text):
        raise BadText(f"{what} is not UTF-8 text", f"{replaced} undecodable sequence(s) in {len(text)} characters")
    return text if text.strip() else None


def strict_text(value, where: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """Text a person typed (a prompt): cleaned like a caption, but text that
    had to be repaired is an error naming `where`, since guessing what they
    meant would be worse than asking. Returns "" for blank text."""
    if not isinstance(value, str):
        raise ValueError(f"{where} is not text (got {type(value).__name__})")
    m = _SURROGATE.search(value)
    if m:
        raise ValueError(f"{where} is not valid UTF-8 text (undecodable at character {m.start()}: "
                         f"{value[max(0, m.start() - 20):m.start()]!r}...): check the terminal's or the file's "
                         "encoding and save it as UTF-8")
    return clean_text(value, max_chars)


def read_prompts(path: str, max_chars: int = MAX_TEXT_CHARS) -> list:
    """The prompts of a file, one a line (blank lines skipped), each cleaned
    by `clean_text` and stripped. A line that is not UTF-8 is an error naming
    the file, the line and the byte, since a prompt the program had to guess
    at would give images of something else."""
    prompts = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"prompts file {path}, line {line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} "
                                 f"at column {e.start + 1}): save the file as UTF-8") from None
            line = clean_text(line, max_chars).strip()
            if line:
                prompts.append(line)
    return prompts
