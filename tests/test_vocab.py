"""Tests of the unified CM3Leon id space (cm3leon_jax/vocab.py)."""
from __future__ import annotations

import numpy as np
import pytest

from cm3leon_jax import vocab as vocab_lib
from cm3leon_jax.vocab import UnifiedVocabulary

FULL = UnifiedVocabulary()  # the paper's layout: the defaults


# -- sizes ---------------------------------------------------------------------

def test_full_config_sizes():
    v = FULL
    assert v.num_special_tokens == 64
    assert v.image_codebook_size == 8192
    assert v.size == 64_512
    # 56,320 text ids including the specials, + 8,192 image codes.
    assert v.num_special_tokens + v.text_vocab_size == 56_320
    assert v.size == 56_320 + 8_192
    assert v.size % 128 == 0
    assert v.image_start == 64
    assert v.text_start == 64 + 8192 == 8256
    assert vocab_lib.vocab_size() == 64_512
    assert vocab_lib.vocab_size(UnifiedVocabulary(text_vocab_size=10)) == 64 + 8192 + 10


def test_special_ids():
    assert (FULL.pad_id, FULL.eos_id, FULL.break_id, FULL.infill_id) == (0, 1, 2, 3)
    assert FULL.mask_id(0) == 4
    assert FULL.mask_id(31) == 35
    np.testing.assert_array_equal(FULL.mask_ids, np.arange(4, 36))
    for bad in (-1, 32, 100):
        with pytest.raises(ValueError, match="mask index"):
            FULL.mask_id(bad)


@pytest.mark.parametrize("v", [
    FULL,
    UnifiedVocabulary(num_special_tokens=16, num_mask_tokens=4, image_codebook_size=32,
                      text_vocab_size=50),
    UnifiedVocabulary(num_special_tokens=8, num_mask_tokens=4, image_codebook_size=0,
                      text_vocab_size=5),
])
def test_ranges_disjoint_and_cover(v):
    ids = np.arange(v.size)
    special = v.is_special(ids)
    image = v.is_image(ids)
    text = v.is_text(ids)
    mask = v.is_mask(ids)
    # Every id is exactly one of special / image / text.
    np.testing.assert_array_equal(special.astype(int) + image.astype(int) + text.astype(int),
                                  np.ones(v.size, int))
    assert special.sum() == v.num_special_tokens
    assert image.sum() == v.image_codebook_size
    assert text.sum() == v.text_vocab_size
    # Masks are a sub-block of the specials, right after <pad> <eos> <break> <infill>.
    assert not np.any(mask & ~special)
    np.testing.assert_array_equal(np.flatnonzero(mask), v.mask_ids)
    # Contiguous blocks in order: specials, image codes, text.
    np.testing.assert_array_equal(np.flatnonzero(special), np.arange(0, v.image_start))
    np.testing.assert_array_equal(np.flatnonzero(image), np.arange(v.image_start, v.text_start))
    np.testing.assert_array_equal(np.flatnonzero(text), np.arange(v.text_start, v.size))
    # Ids outside [0, size) are neither image nor text.
    assert not v.is_image(v.size) and not v.is_text(v.size)
    assert not v.is_image(-1) and not v.is_text(-1)


# -- round trips ----------------------------------------------------------------

def test_image_code_round_trip():
    codes = np.arange(FULL.image_codebook_size)
    ids = FULL.image_code_to_id(codes)
    assert ids[0] == 64 and ids[-1] == 8255
    assert FULL.is_image(ids).all()
    np.testing.assert_array_equal(FULL.id_to_image_code(ids), codes)
    # Any shape, and scalars.
    grid = np.random.default_rng(0).integers(0, 8192, size=(2, 32, 32))
    np.testing.assert_array_equal(FULL.id_to_image_code(FULL.image_code_to_id(grid)), grid)
    assert FULL.image_code_to_id(7) == 71
    assert FULL.id_to_image_code(71) == 7
    # Empty input is fine.
    assert FULL.image_code_to_id(np.zeros((0,), int)).shape == (0,)
    assert FULL.id_to_image_code(np.zeros((0,), int)).shape == (0,)


def test_text_round_trip():
    toks = np.arange(FULL.text_vocab_size)
    ids = FULL.text_token_to_id(toks)
    assert ids[0] == 8256 and ids[-1] == 64_511
    assert FULL.is_text(ids).all()
    np.testing.assert_array_equal(FULL.id_to_text_token(ids), toks)
    batch = np.random.default_rng(1).integers(0, FULL.text_vocab_size, size=(4, 17))
    np.testing.assert_array_equal(FULL.id_to_text_token(FULL.text_token_to_id(batch)), batch)
    assert FULL.text_token_to_id(0) == 8256
    assert FULL.id_to_text_token(8256 + 5) == 5


# -- out of range -------------------------------------------------------------------

@pytest.mark.parametrize("codes", [[-1], [8192], [0, 5, 9000], -3])
def test_image_code_out_of_range_raises(codes):
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 8192\)"):
        FULL.image_code_to_id(codes)


@pytest.mark.parametrize("ids", [[63], [8256], [0], [-1], [64_512], [64, 100, 8256]])
def test_non_image_ids_raise(ids):
    with pytest.raises(ValueError, match="not image codes"):
        FULL.id_to_image_code(ids)


@pytest.mark.parametrize("toks", [[-1], [56_256], [0, 1, 10**6]])
def test_text_token_out_of_range_raises(toks):
    with pytest.raises(ValueError, match=r"text BPE ids must lie in \[0, 56256\)"):
        FULL.text_token_to_id(toks)


@pytest.mark.parametrize("ids", [[8255], [0], [4], [64_512], [-1], [8256, 3]])
def test_non_text_ids_raise(ids):
    with pytest.raises(ValueError, match="not text ids"):
        FULL.id_to_text_token(ids)


# -- names ----------------------------------------------------------------------------

@pytest.mark.parametrize("i, name", [
    (0, "<pad>"),
    (1, "<eos>"),
    (2, "<break>"),
    (3, "<infill>"),
    (4, "<mask:0>"),
    (5, "<mask:1>"),
    (35, "<mask:31>"),        # 4 + 32 masks - 1
    (36, "<reserved:36>"),    # first id after the masks
    (63, "<reserved:63>"),    # last special id
    (64, "<img:0>"),          # image_start
    (64 + 1000, "<img:1000>"),
    (8255, "<img:8191>"),     # 64 + 8192 - 1
    (8256, "<txt:0>"),        # text_start
    (8256 + 42, "<txt:42>"),
    (64_511, "<txt:56255>"),  # size - 1 = 8256 + 56256 - 1
])
def test_token_name_examples(i, name):
    assert FULL.token_name(i) == name
    assert FULL.token_name(np.int64(i)) == name


def test_token_name_image_start():
    assert FULL.token_name(FULL.image_start) == "<img:0>"
    assert FULL.token_name(FULL.text_start) == "<txt:0>"
    assert FULL.token_name(FULL.mask_id(7)) == "<mask:7>"


@pytest.mark.parametrize("i", [64_512, 10**6])
def test_token_name_out_of_range_raises(i):
    with pytest.raises(ValueError, match="outside the vocabulary of size 64512"):
        FULL.token_name(i)


def test_token_name_negative_raises():
    with pytest.raises(ValueError):
        FULL.token_name(-1)
    assert not FULL.is_special(-1)


def test_token_name_small_layout():
    v = UnifiedVocabulary(num_special_tokens=8, num_mask_tokens=2, image_codebook_size=3,
                          text_vocab_size=4)
    assert v.size == 15
    names = [v.token_name(i) for i in range(v.size)]
    assert names == [
        "<pad>", "<eos>", "<break>", "<infill>", "<mask:0>", "<mask:1>",
        "<reserved:6>", "<reserved:7>",
        "<img:0>", "<img:1>", "<img:2>",
        "<txt:0>", "<txt:1>", "<txt:2>", "<txt:3>",
    ]
    with pytest.raises(ValueError, match="outside the vocabulary of size 15"):
        v.token_name(15)


# -- construction checks ----------------------------------------------------------------

def test_too_many_masks_raises():
    # 4 fixed specials + 60 masks fill 64 exactly; 61 do not fit.
    assert UnifiedVocabulary(num_mask_tokens=60).mask_id(59) == 63
    with pytest.raises(ValueError, match="61 mask tokens do not fit in 64 special ids"):
        UnifiedVocabulary(num_mask_tokens=61)
    with pytest.raises(ValueError, match="num_special_tokens"):
        UnifiedVocabulary(num_special_tokens=8, num_mask_tokens=5)


@pytest.mark.parametrize("field", ["image_codebook_size", "text_vocab_size"])
def test_negative_sizes_raise(field):
    with pytest.raises(ValueError, match=field):
        UnifiedVocabulary(**{field: -1})


def test_vocabulary_is_frozen():
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.num_mask_tokens = 3  # type: ignore[misc]
