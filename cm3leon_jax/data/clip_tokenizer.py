"""CLIP's caption tokeniser: captions -> fixed-length ids and attention
masks for `models/clip.py`'s text tower, from OpenAI's BPE (a converted
checkpoint's `tokenizer/`) or the project's byte-level BPE (a CLIP trained
here). A tokenizer, so layer 3 (ARCHITECTURE.md): the model stays free of it."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from cm3leon_jax.models.clip import HF_TOKENIZER_FILES, TEXT_TOKENIZER_SUBDIR, TOKENIZER_SUBDIR, CLIPConfig


class CLIPTextTokenizer:
    """Captions -> fixed-length CLIP ids [N, max_length] int32 and attention
    mask [N, max_length] int32 (1 = token, 0 = padding).

    Every row is BOS, the caption's tokens, EOS, then padding; a caption
    longer than max_length - 2 tokens is truncated so that EOS stays last
    (the pooled position); "" gives BOS, EOS.

    Two sources of tokens:
      * OpenAI's BPE via transformers' CLIPTokenizer(Fast), read offline from
        `<model_dir>/tokenizer/` (what `cm3leon convert clip` copies there).
        Its ids are the checkpoint's; it pads with its pad token (EOS for
        OpenAI's).
      * the project's byte-level BPE (`cm3leon_jax.data.tokenizers.
        TextTokenizer`), for a CLIP trained here. Scheme, with V the BPE's
        size: BPE id b -> CLIP id b, BOS = V, EOS = V + 1 (the largest id, so
        legacy argmax pooling finds it too), padding = EOS (as OpenAI's);
        the CLIP vocabulary is V + 2 (`config_overrides()`).
    """

    def __init__(self, max_length: int, hf_tokenizer=None, text_tokenizer=None):
        if (hf_tokenizer is None) == (text_tokenizer is None):
            raise ValueError("CLIPTextTokenizer: give exactly one of hf_tokenizer and text_tokenizer")
        if max_length < 2:
            raise ValueError(f"CLIPTextTokenizer: max_length={max_length} leaves no room for BOS and EOS")
        self.max_length = int(max_length)
        self.hf = hf_tokenizer
        self.bpe = text_tokenizer
        if hf_tokenizer is not None:
            for name in ("bos_token_id", "eos_token_id"):
                if getattr(hf_tokenizer, name) is None:
                    raise ValueError(f"CLIPTextTokenizer: the HF tokenizer has no {name[:-3]}")
            self.bos_id = int(hf_tokenizer.bos_token_id)
            self.eos_id = int(hf_tokenizer.eos_token_id)
            pad = hf_tokenizer.pad_token_id
            self.pad_id = int(self.eos_id if pad is None else pad)
            self.vocab_size = len(hf_tokenizer)
        else:
            n = text_tokenizer.vocab_size
            self.bos_id, self.eos_id, self.pad_id, self.vocab_size = n, n + 1, n + 1, n + 2

    # -- construction --------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str, max_length: int) -> "CLIPTextTokenizer":
        """transformers' CLIP tokenizer from `path` (offline: local files only)."""
        import transformers

        klass = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
        try:
            tok = klass.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - name the directory, keep the cause
            raise ValueError(f"{path}: could not load a CLIP tokenizer from {', '.join(HF_TOKENIZER_FILES)} "
                             f"({type(e).__name__}: {e})") from e
        return cls(max_length, hf_tokenizer=tok)

    @classmethod
    def from_text_tokenizer(cls, path: str, max_length: int) -> "CLIPTextTokenizer":
        """The project's byte-level BPE at `path` (a tokenizer.json or its dir)."""
        from tokenizers import Tokenizer

        from cm3leon_jax import vocab as vocab_lib
        from cm3leon_jax.data import tokenizers as tok_lib

        file = tok_lib._tokenizer_file(path)
        if not os.path.isfile(file):
            raise ValueError(f"no text tokenizer at {path!r} (expected {tok_lib.TOKENIZER_FILE}; train one "
                             "with `cm3leon tokenizer train-text`)")
        # Sized by the file itself: CLIP's id space is independent of the
        # decoder's unified vocabulary (only the BPE ids are shared).
        size = Tokenizer.from_file(file).get_vocab_size(with_added_tokens=True)
        vocabulary = vocab_lib.UnifiedVocabulary(image_codebook_size=0, text_vocab_size=size)
        return cls(max_length, text_tokenizer=tok_lib.TextTokenizer(file, vocabulary))

    @classmethod
    def from_model_dir(cls, model_dir: str, text_tokenizer: Optional[str] = None,
                       max_length: Optional[int] = None) -> "CLIPTextTokenizer":
        """The tokenizer of a CLIP model dir: HF files in `<model_dir>/tokenizer/`
        when present, else the project's BPE at `text_tokenizer`, else the one
        a CLIP trained here saved in `<model_dir>/text_tokenizer/`. max_length
        defaults to the model's max_position_embeddings; the ids are checked
        against `clip_config.json` when it exists."""
        from cm3leon_jax.models import clip_convert

        cfg = None
        if os.path.exists(os.path.join(model_dir, clip_convert.CONFIG_FILE)):
            cfg = clip_convert.load_config(model_dir)
        if max_length is None:
            if cfg is None:
                raise ValueError(f"{model_dir}: no {clip_convert.CONFIG_FILE}; pass max_length")
            max_length = cfg.max_position_embeddings
        hf_dir = os.path.join(model_dir, TOKENIZER_SUBDIR)
        has_hf = os.path.isdir(hf_dir) and (
            os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
            or all(os.path.exists(os.path.join(hf_dir, f)) for f in ("vocab.json", "merges.txt")))
        if has_hf:
            tok = cls.from_hf_dir(hf_dir, max_length)
        elif text_tokenizer:
            tok = cls.from_text_tokenizer(text_tokenizer, max_length)
        elif os.path.isfile(os.path.join(model_dir, TEXT_TOKENIZER_SUBDIR, "tokenizer.json")):
            tok = cls.from_text_tokenizer(os.path.join(model_dir, TEXT_TOKENIZER_SUBDIR), max_length)
        else:
            raise ValueError(f"{model_dir}: no HF tokenizer files in {hf_dir} (vocab.json + merges.txt or "
                             f"tokenizer.json) and no project BPE in {TEXT_TOKENIZER_SUBDIR}/; pass "
                             "text_tokenizer=<dir of the project's BPE>")
        if cfg is not None:
            tok.check_config(cfg)
        return tok

    # -- use ---------------------------------------------------------------------------
    def config_overrides(self) -> dict:
        """CLIPConfig fields for a model that reads these ids, e.g.
        `tiny_config(**tok.config_overrides())`."""
        return dict(vocab_size=self.vocab_size, bos_token_id=self.bos_id, eos_token_id=self.eos_id,
                    pad_token_id=self.pad_id, max_position_embeddings=self.max_length)

    def check_config(self, cfg: CLIPConfig) -> None:
        """ValueError unless `cfg`'s model can read these ids and pools at EOS."""
        if self.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.vocab_size} ids but the CLIP model's vocab_size is "
                             f"{cfg.vocab_size}")
        if self.max_length > cfg.max_position_embeddings:
            raise ValueError(f"tokenizer max_length={self.max_length} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        ok = (self.eos_id == cfg.vocab_size - 1 if cfg.legacy_argmax_pooling
              else self.eos_id == cfg.eos_token_id)
        if not ok:
            raise ValueError(f"tokenizer EOS id {self.eos_id} is not where the model pools (eos_token_id="
                             f"{cfg.eos_token_id}{', legacy argmax pooling' if cfg.legacy_argmax_pooling else ''})")

    def _content_ids(self, texts) -> list:
        if self.hf is not None:
            # truncating here too spares the work (and transformers' warning
            # about sequences over model_max_length) on very long captions
            return self.hf(list(texts), add_special_tokens=False, truncation=True,
                           max_length=self.max_length - 2)["input_ids"]
        return [np.asarray(ids) - self.bpe.vocabulary.text_start for ids in self.bpe.encode_batch(texts)]

    def __call__(self, texts) -> Tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int32 [N, max_length]."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"CLIPTextTokenizer takes strs, got {type(t).__name__}")
        n, length = len(texts), self.max_length
        ids = np.full((n, length), self.pad_id, np.int32)
        mask = np.zeros((n, length), np.int32)
        for i, content in enumerate(self._content_ids(texts) if texts else []):
            row = [self.bos_id, *list(content)[:length - 2], self.eos_id]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask
