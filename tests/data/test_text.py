"""The ingestion text policy (cm3leon_jax/data/text.py) on hand-worked
cases, then fuzzed: whatever str or bytes comes in, what comes out encodes as
UTF-8, holds no control character but tab and newline, fits the length cap,
is a fixed point of the cleaning, and the BPE tokenises it; text the BPE
cannot take is a ValueError naming it, not a TypeError from Rust; a prompts
file is read or refused naming its line. Each fuzz test prints how many
examples it tried (pytest -s)."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cm3leon_jax.data import text as text_lib
from cm3leon_jax.data.text import BadText, clean_field, clean_text, decode_utf8, read_prompts, strict_text
from tests.data.test_tokenizers import tokenizer

CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# any code point, lone surrogates and controls included
any_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=200)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("raw, want", [
    ("abc \udcff", "abc \ufffd"),                   # the lone surrogate of issue 26
    ("\ud83d\ude00 ok", "\U0001F600 ok"),           # a pair held as two code points is the character
    ("a\x00b\x07c\x1bd\x7fe\x85f", "abcdef"),       # C0, DEL and C1 controls removed
    ("line1\r\nline2\rline3\tx", "line1\nline2\nline3\tx"),
    ("\ufeffcaption", "caption"),                   # a leading byte-order mark
    ("caf\u00e9 \u6771\u4eac \U0001F408", "caf\u00e9 \u6771\u4eac \U0001F408"),  # untouched
])
def test_clean_text_by_hand(raw, want):
    assert clean_text(raw) == want
    want.encode("utf-8")


def test_clean_field_reasons_and_cap():
    assert clean_field(None) is None and clean_field("  \x00\t ") is None  # blank after cleaning
    for value in (3, 2.5, ["a"], {"t": "x"}, True):
        with pytest.raises(BadText, match="caption is not a string") as e:
            clean_field(value)
        assert e.value.reason == "caption is not a string"
    with pytest.raises(BadText, match="instruction is not a string"):
        clean_field(7, "instruction")
    assert clean_field(b"caf\xc3\xa9") == "caf\u00e9"
    assert clean_field(b"caf\xe9 au lait") == "caf\ufffd au lait"  # Latin-1 byte: one replacement
    with pytest.raises(BadText, match="caption is not UTF-8 text"):
        clean_field(bytes(range(128, 256)))  # binary junk
    with pytest.raises(BadText, match="not UTF-8"):
        clean_field("\udcff\udcfe\udcfd x")
    big = "word " * 300_000  # 1.5 MB
    assert clean_field(big) == big[:text_lib.MAX_TEXT_CHARS]
    assert decode_utf8(b"ab\xe6\x9d")[0] == "ab"  # a character cut by a bounded read is dropped


def test_strict_text_names_the_input():
    assert strict_text(" a\x00 red circle ", "--prompt") == " a red circle "
    with pytest.raises(ValueError, match="--prompt is not valid UTF-8 text .*character 3"):
        strict_text("caf\udce9", "--prompt")  # what Python makes of a Latin-1 argv byte


def test_read_prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_bytes(b"\xef\xbb\xbfa red circle\r\n\n  \x00 \nblue\tsquare\n")
    assert read_prompts(str(p)) == ["a red circle", "blue\tsquare"]
    p.write_bytes(b"ok\nbad \xff here\n")
    with pytest.raises(ValueError, match=r"prompts.txt, line 2: not UTF-8 text \(byte 0xff at column 5\)"):
        read_prompts(str(p))


def test_tokenizer_names_text_it_cannot_encode():
    tok = tokenizer()
    with pytest.raises(ValueError, match="encode's text holds a lone surrogate .* at character 4"):
        tok.encode("abc \udcff")
    with pytest.raises(ValueError, match="encode_batch's text 1 holds a lone surrogate"):
        tok.encode_batch(["fine", "abc \udcff"])
    np.testing.assert_array_equal(tok.encode(clean_text("abc \udcff")), tok.encode("abc \ufffd"))


def _check_clean(out: str, cap: int):
    out.encode("utf-8")  # never raises: no lone surrogate survives
    assert not CONTROL.search(out) and not out.startswith("\ufeff") and len(out) <= cap
    assert clean_text(out, cap) == out  # a fixed point: cleaning once is enough


def test_fuzz_clean_text_and_field(record_property):
    tried = [0]

    @FUZZ
    @given(value=st.one_of(any_text, st.binary(max_size=200)), cap=st.integers(1, 300))
    def run(value, cap):
        tried[0] += 1
        if isinstance(value, str):
            _check_clean(clean_text(value, cap), cap)
        try:
            out = clean_field(value, "caption", cap)
        except BadText as e:
            assert e.reason == "caption is not UTF-8 text"
            return
        if out is not None:
            _check_clean(out, cap)
            assert out.strip()

    run()
    print(f"\nfuzz clean_text/clean_field: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


def test_fuzz_tokenizer_takes_any_cleaned_text_and_names_the_rest(record_property):
    tok, tried = tokenizer(), [0]

    @settings(max_examples=150, deadline=None)
    @given(any_text)
    def run(raw):
        tried[0] += 1
        try:
            ids = tok.encode(raw)
        except ValueError as e:
            assert "lone surrogate" in str(e)
            assert re.search("[\ud800-\udfff]", raw)
        else:
            assert tok.decode(ids) == raw  # a byte-level BPE round-trips all valid text
        cleaned = clean_text(raw)
        assert tok.decode(tok.encode(cleaned)) == cleaned
        [a] = tok.encode_batch([cleaned])
        np.testing.assert_array_equal(a, tok.encode(cleaned))

    run()
    print(f"\nfuzz tokenizer: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


def test_fuzz_prompts_file(tmp_path_factory, record_property):
    d, tried = tmp_path_factory.mktemp("prompts"), [0]

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=300))
    def run(data):
        tried[0] += 1
        path = os.path.join(d, "p.txt")
        with open(path, "wb") as f:
            f.write(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            with pytest.raises(ValueError, match=r"p.txt, line \d+: not UTF-8 text"):
                read_prompts(path)
            return
        prompts = read_prompts(path)
        want = [p for p in (clean_text(x).strip() for x in text.split("\n")) if p]
        assert prompts == want
        for p in prompts:
            _check_clean(p, text_lib.MAX_TEXT_CHARS)

    run()
    print(f"\nfuzz prompts file: {tried[0]} examples")
    record_property("fuzz_examples", tried[0])


def test_tokenizer_corpus_is_cleaned(tmp_path):
    """`cm3leon tokenizer train-text` reads its corpus under the same policy:
    a lone surrogate (valid JSON) or control characters do not reach the BPE
    trainer; a caption that is not a string is counted, not fatal; JSON that
    Python cannot read is an error naming the line."""
    from cm3leon_jax.data.bpe_training import iter_documents

    p = tmp_path / "c.jsonl"
    p.write_text('{"caption": "abc \\udcff"}\n{"caption": 3}\n{"caption": "a\\u0000b\\r\\nc"}\n')
    stats = {}
    assert list(iter_documents(str(p), stats)) == ["abc \ufffd", "ab\nc"]
    assert stats == {"documents": 2, "skipped": 1}
    p.write_text('{"caption": "ok"}\n{"caption": ' + "9" * 5000 + "}\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: invalid JSON \(ValueError: Exceeds the limit"):
        list(iter_documents(str(p)))
