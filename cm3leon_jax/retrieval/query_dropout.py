"""Query dropout's embedder: the CLIP key of a query document after 20% of
its tokens were dropped (PAPER.md, "Retrieval augmentation": "drop 20% of
query tokens before embedding, in training").

`RetrievalAugmenter` drops the tokens (its `query_embedder` hook receives the
kept ones, text ids then image ids, and the query document). This embedder
decodes the kept text ids back to a caption with the data's BPE, embeds it
with CLIP's text tower, and averages it with the query's stored image
embedding, as a bank key is made (`bank.document_keys`).

Assumption (the paper does not say how dropped image tokens are embedded):
image tokens are never dropped from the key. CLIP's image tower sees pixels,
and a VQ grid with holes has no defined decoding, so the image half of the
key is the stored embedding of the whole image. A query without kept text
ids (text-less, or every text token dropped) uses its image embedding alone.
"""
from __future__ import annotations

import os

import numpy as np

from cm3leon_jax.retrieval.clip_encoder import ClipEncoder, same_model


class ClipQueryEmbedder:
    """`(kept tokens, query document) -> key` with a CLIP model dir and the
    data's BPE (`data.tokenizers.TextTokenizer`)."""

    def __init__(self, clip_dir: str, text_tokenizer, vocabulary, expect_identity: str | None = None,
                 batch_size: int = 3):
        # batch_size: captions per CLIP call (the augmenter embeds its 3
        # retrieval sets' dropouts together)
        self.encoder = ClipEncoder(clip_dir, batch_size=batch_size)
        if expect_identity is not None and not same_model(self.encoder.identity, expect_identity):
            raise ValueError(f"query dropout: CLIP dir {clip_dir!r} ({self.encoder.identity}) is not the CLIP "
                             f"the data was embedded with ({expect_identity}); the re-scored keys would not "
                             "be comparable")
        self.text_tokenizer, self.vocabulary = text_tokenizer, vocabulary
        self.calls = 0

    @classmethod
    def for_prepared(cls, prepared, batch_size: int = 3) -> "ClipQueryEmbedder":
        """The CLIP and BPE a prepared dataset was made with (its manifest)."""
        from cm3leon_jax.data.tokenizers import TextTokenizer

        models = prepared.manifest["models"]
        for key in ("clip_dir", "text_tokenizer"):
            if not os.path.exists(models[key]):
                raise ValueError(f"query dropout needs the {key} prepared dataset {prepared.path!r} was made "
                                 f"with ({models[key]!r}), which is gone: restore it or turn query dropout off")
        return cls(models["clip_dir"], TextTokenizer(models["text_tokenizer"], prepared.vocabulary),
                   prepared.vocabulary, expect_identity=prepared.clip_identity, batch_size=batch_size)

    def __call__(self, kept, query: dict) -> np.ndarray:
        return self.embed_batch([kept], query)[0]

    def embed_batch(self, kept_list, query: dict) -> np.ndarray:
        """Keys [len(kept_list), D], one per dropped copy of the query."""
        texts = []
        for kept in kept_list:
            kept = np.asarray(kept, np.int64).reshape(-1)
            text_ids = kept[self.vocabulary.is_text(kept)]
            texts.append(self.text_tokenizer.decode(text_ids, skip_non_text=True) if text_ids.size else None)
        rows = [i for i, t in enumerate(texts) if t is not None]
        text_emb = self.encoder.encode_texts([texts[i] for i in rows]) if rows else None
        image = None
        if query.get("has_image", False) and query.get("image_embedding") is not None:
            image = np.asarray(query["image_embedding"], np.float32)
        out = np.zeros((len(texts), self.encoder.dim), np.float32)
        for i in range(len(texts)):
            parts = ([text_emb[rows.index(i)]] if i in rows else []) + ([image] if image is not None else [])
            if not parts:
                raise ValueError(f"query dropout: document {query.get('id')!r} has neither text nor an image "
                                 "embedding to build a key from")
            out[i] = np.mean(np.stack(parts), axis=0)
        self.calls += len(texts)
        return out
