"""CLIP reranking (PAPER.md: 8 samples per prompt, reranked by CLIP score):
order a prompt's sampled images by the cosine similarity of their CLIP image
embedding to the prompt's CLIP text embedding, best first."""
from __future__ import annotations

import numpy as np


def clip_scores(encoder, prompt: str, images) -> np.ndarray:
    """Cosine similarities [N] of each image to the prompt (a
    `retrieval.clip_encoder.ClipEncoder`; both embeddings are L2-normalised)."""
    text = encoder.encode_texts([prompt])[0]
    return np.asarray(encoder.encode_images(list(images)) @ text, np.float64)


def rerank(encoder, prompt: str, images, keep: int | None = None):
    """(order: indices best first, the first `keep` of them; scores [N])."""
    scores = clip_scores(encoder, prompt, images)
    order = np.argsort(-scores, kind="stable")
    return order[:keep] if keep else order, scores
