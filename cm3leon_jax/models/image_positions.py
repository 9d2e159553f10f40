"""2-D positions of image codes (`DecoderConfig.image_positions="rows_cols"`):
which cell of the image grid each code of a run of image codes is in, and
the learned row + column embedding added to it (DALL-E's 2-D positions).
Used by the decoder's forward pass, the KV-cached decoding and the sampler,
which carries the run across decoding steps."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def image_cells(tokens, cfg):
    """(is_image [B, T] bool, cell [B, T] int32) for `image_positions`: the
    i-th token of each run of consecutive image codes (i from 0) is in cell
    i mod image_grid^2; cell is 0 where the token is not an image code."""
    lo, hi = tuple(cfg.image_id_range)
    is_image = (tokens >= lo) & (tokens < hi)
    t = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    last_other = jax.lax.cummax(jnp.where(is_image, -1, t[None, :]), axis=1)
    run = t[None, :] - last_other - 1
    return is_image, jnp.where(is_image, run % (cfg.image_grid * cfg.image_grid), 0)


def image_cell_embedding(row_table, col_table, is_image, cell, grid: int):
    """row_table[cell // grid] + col_table[cell % grid] where `is_image`, else 0."""
    emb = jnp.take(row_table, cell // grid, axis=0) + jnp.take(col_table, cell % grid, axis=0)
    return jnp.where(is_image[..., None], emb, 0)
