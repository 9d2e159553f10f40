"""CLIP bi-encoder (Flax linen): the frozen retriever of CM3Leon.

CM3Leon's retriever (paper, Sec. 2.1, following RA-CM3) is a frozen CLIP
ViT-B/32 bi-encoder: a query or memory document `m` is encoded by the text
encoder, the image encoder or both, and its dense key is the mean of the
L2-normalised embeddings of the modalities it has ("mean of the normalised
text and image embeddings"); relevance is the inner product of keys.

The layout is OpenAI CLIP as kept by transformers' `CLIPModel`, with module
and parameter names that mirror its state dict so `cm3leon convert clip`
maps a Hugging Face checkpoint one to one:

    text_model.encoder.layers.3.self_attn.q_proj.weight
        -> text_model/encoder/layers_3/self_attn/q_proj/kernel   (transposed)
    vision_model.pre_layrnorm.weight  -> vision_model/pre_layrnorm/scale  (sic)
    vision_model.embeddings.patch_embedding.weight (OIHW)
        -> vision_model/embeddings/patch_embedding/kernel (HWIO)

Images are NHWC float32, already normalised (`preprocess_images`). Text is
int ids [B, L] with L <= max_position_embeddings (`data/clip_tokenizer.py`).

    model = CLIP(cfg)
    model.apply({"params": p}, ids, mask, method=CLIP.encode_text)   # [B, P]
    model.apply({"params": p}, pixels, method=CLIP.encode_image)     # [B, P]
    document_key(l2_normalize(t), ...)  # or document_key(t, i): normalises itself
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

# transformers.image_utils.OPENAI_CLIP_MEAN / _STD: the statistics every
# OpenAI CLIP checkpoint was trained with.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = ("quick_gelu", "gelu")

# transformers' pre-2023 CLIP configs carry eos_token_id=2 (a bug fixed by its
# PR #24773); for them the pooled position is the argmax of the ids (the EOS
# of OpenAI's tokenizer, 49407, is the largest id) instead of the first EOS.
LEGACY_EOS_TOKEN_ID = 2


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Sizes of the CLIP bi-encoder. Defaults: OpenAI's ViT-B/32, the
    retriever of the paper (`vit_b32_config()`).

    Text tower: token + learned position embeddings, a causal pre-LN
    transformer, a final LayerNorm; its output is the hidden state at the
    EOS position (see `legacy_argmax_pooling`). Vision tower: ViT with a
    class token, LayerNorm before (`pre_layrnorm`) and after (on the class
    token) the transformer. Both are projected (no bias) to `projection_dim`.
    """

    # text tower
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    text_hidden_size: int = 512
    text_intermediate_size: int = 2048
    text_num_layers: int = 12
    text_num_heads: int = 8
    bos_token_id: int = 49406
    eos_token_id: int = 49407   # the pooled position: the first occurrence of this id
    # The id a tokenizer pads with; the model never reads it (padding is
    # removed by the attention mask and never pooled). OpenAI's tokenizer pads
    # with its EOS, transformers' configs say 1: kept for the record only.
    pad_token_id: int = 1
    # vision tower
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    vision_hidden_size: int = 768
    vision_intermediate_size: int = 3072
    vision_num_layers: int = 12
    vision_num_heads: int = 12
    # shared
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # OpenAI's x * sigmoid(1.702 x); "gelu" is the exact (erf) one
    logit_scale_init: float = 2.6592  # ln(1 / 0.07), CLIP's initial temperature

    def __post_init__(self):
        for tower in ("text", "vision"):
            hidden, heads = getattr(self, f"{tower}_hidden_size"), getattr(self, f"{tower}_num_heads")
            if hidden % heads:
                raise ValueError(f"CLIPConfig: {tower}_hidden_size={hidden} is not divisible by "
                                 f"{tower}_num_heads={heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPConfig: hidden_act={self.hidden_act!r}; expected one of {ACTIVATIONS}")
        for name in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"CLIPConfig: {name}={getattr(self, name)} outside the vocabulary "
                                 f"[0, {self.vocab_size})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def legacy_argmax_pooling(self) -> bool:
        """True for transformers' legacy configs (eos_token_id == 2): the text
        output is taken at argmax(input_ids), as transformers does for them."""
        return self.eos_token_id == LEGACY_EOS_TOKEN_ID


def vit_b32_config(**overrides) -> CLIPConfig:
    """OpenAI CLIP ViT-B/32 (openai/clip-vit-base-patch32): the paper's retriever."""
    return CLIPConfig(**overrides)


def tiny_config(**overrides) -> CLIPConfig:
    """64x64 images, patch 8, width 64, 2 layers: for CPU tests and the demo."""
    base = dict(vocab_size=512, max_position_embeddings=16, text_hidden_size=64, text_intermediate_size=128,
                text_num_layers=2, text_num_heads=2, bos_token_id=510, eos_token_id=511, pad_token_id=511,
                image_size=64, patch_size=8, vision_hidden_size=64, vision_intermediate_size=128,
                vision_num_layers=2, vision_num_heads=2, projection_dim=64)
    base.update(overrides)
    return CLIPConfig(**base)


# -- modules -------------------------------------------------------------------------

def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    return lambda x: jax.nn.gelu(x, approximate=False)  # torch's nn.GELU() default


_init = nn.initializers.normal(0.02)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (biased)."""

    hidden: int
    heads: int

    @nn.compact
    def __call__(self, x, mask=None):
        b, n, _ = x.shape
        head_dim = self.hidden // self.heads

        def proj(name):
            return nn.Dense(self.hidden, kernel_init=_init, name=name)

        q = proj("q_proj")(x).reshape(b, n, self.heads, head_dim)
        k = proj("k_proj")(x).reshape(b, n, self.heads, head_dim)
        v = proj("v_proj")(x).reshape(b, n, self.heads, head_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
        if mask is not None:
            # A finite minimum, not -inf: a query whose keys are all masked (a
            # left-padding position) gets uniform weights instead of NaN; it
            # is never pooled and no valid query attends to it.
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        w = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, self.hidden)
        return proj("out_proj")(out)


class MLP(nn.Module):
    hidden: int
    intermediate: int
    act: str

    @nn.compact
    def __call__(self, x):
        x = _activation(self.act)(nn.Dense(self.intermediate, kernel_init=_init, name="fc1")(x))
        return nn.Dense(self.hidden, kernel_init=_init, name="fc2")(x)


class EncoderLayer(nn.Module):
    """Pre-LN transformer block (CLIP's ResidualAttentionBlock)."""

    hidden: int
    intermediate: int
    heads: int
    act: str
    eps: float

    @nn.compact
    def __call__(self, x, mask=None):
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm1")(x)
        x = x + Attention(self.hidden, self.heads, name="self_attn")(h, mask)
        h = nn.LayerNorm(epsilon=self.eps, name="layer_norm2")(x)
        return x + MLP(self.hidden, self.intermediate, self.act, name="mlp")(h)


class Encoder(nn.Module):
    hidden: int
    intermediate: int
    heads: int
    num_layers: int
    act: str
    eps: float

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.num_layers):
            x = EncoderLayer(self.hidden, self.intermediate, self.heads, self.act, self.eps,
                             name=f"layers_{i}")(x, mask)
        return x


class TextEmbeddings(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.text_hidden_size, embedding_init=_init, name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.text_hidden_size, embedding_init=_init,
                       name="position_embedding")
        return tok(input_ids) + pos.embedding[None, :input_ids.shape[1]]


class TextTransformer(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """Pooled (EOS-position) hidden state [B, text_hidden_size]."""
        cfg = self.config
        n = input_ids.shape[1]
        x = TextEmbeddings(cfg, name="embeddings")(input_ids)
        # CLIP's text encoder is causal (a GPT-style mask), and transformers
        # also removes padded keys when an attention mask is given.
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] != 0)
        x = Encoder(cfg.text_hidden_size, cfg.text_intermediate_size, cfg.text_num_heads, cfg.text_num_layers,
                    cfg.hidden_act, cfg.layer_norm_eps, name="encoder")(x, mask)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="final_layer_norm")(x)
        if cfg.legacy_argmax_pooling:
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            # The first EOS (a tokenizer may pad with EOS); a row without EOS
            # pools position 0, as transformers does.
            pos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]


class VisionEmbeddings(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(cfg.vision_hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          kernel_init=_init, name="patch_embedding")(pixel_values)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.vision_hidden_size)  # row-major, as torch's flatten(2)
        cls = self.param("class_embedding", _init, (cfg.vision_hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.vision_hidden_size)), patches], axis=1)
        pos = nn.Embed(cfg.num_patches + 1, cfg.vision_hidden_size, embedding_init=_init,
                       name="position_embedding")
        return x + pos.embedding[None]


class VisionTransformer(nn.Module):
    config: CLIPConfig

    @nn.compact
    def __call__(self, pixel_values):
        """Pooled (class-token) hidden state [B, vision_hidden_size]."""
        cfg = self.config
        x = VisionEmbeddings(cfg, name="embeddings")(pixel_values)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="pre_layrnorm")(x)
        x = Encoder(cfg.vision_hidden_size, cfg.vision_intermediate_size, cfg.vision_num_heads,
                    cfg.vision_num_layers, cfg.hidden_act, cfg.layer_norm_eps, name="encoder")(x)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="post_layernorm")(x[:, 0])


class CLIP(nn.Module):
    """The two towers, their projections and the contrastive temperature."""

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        self.text_model = TextTransformer(cfg)
        self.vision_model = VisionTransformer(cfg)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, kernel_init=_init)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, kernel_init=_init)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init), ())

    def encode_text(self, input_ids, attention_mask=None):
        """Projected text embeddings [B, projection_dim], not normalised.

        input_ids: int [B, L], L <= max_position_embeddings, each row holding
        its EOS (what `CLIPTextTokenizer` returns). attention_mask: [B, L],
        1 for tokens, 0 for padding (optional: with right padding and
        first-EOS pooling the result does not depend on it)."""
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"encode_text: input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"encode_text: {input_ids.shape[1]} tokens exceed max_position_embeddings="
                             f"{cfg.max_position_embeddings}; truncate (CLIPTextTokenizer does)")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"encode_text: attention_mask shape {attention_mask.shape} differs from "
                             f"input_ids shape {input_ids.shape}")
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def encode_image(self, pixel_values):
        """Projected image embeddings [B, projection_dim], not normalised.
        pixel_values: float NHWC [B, image_size, image_size, num_channels],
        normalised as `preprocess_images` does."""
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            hint = (" (that looks NCHW: transpose to NHWC)"
                    if pixel_values.ndim == 4 and pixel_values.shape[1] == cfg.num_channels else
                    " (resize and crop with preprocess_images)")
            raise ValueError(f"encode_image: pixel_values must be NHWC [batch, {want[0]}, {want[1]}, "
                             f"{want[2]}], got shape {tuple(pixel_values.shape)}{hint}")
        return self.visual_projection(self.vision_model(pixel_values))

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        """(text_embeds, image_embeds, logit_scale): unnormalised projections
        and the log temperature; CLIP's logits are
        exp(logit_scale) * l2_normalize(text) @ l2_normalize(image).T."""
        return (self.encode_text(input_ids, attention_mask), self.encode_image(pixel_values),
                self.logit_scale)


def init_params(config: CLIPConfig, rng=None):
    """Random parameters of `CLIP(config)` (shapes only matter for conversion)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    # jit: op-by-op initialisation compiles every op on its own (~10x slower)
    return jax.jit(lambda r: CLIP(config).init(r, ids, pixels)["params"])(rng)


def abstract_params(config: CLIPConfig):
    """Shapes and dtypes of the parameter tree, without computing it."""
    return jax.eval_shape(lambda: init_params(config))


# -- retrieval keys ------------------------------------------------------------------

def l2_normalize(x, axis: int = -1, eps: float = 1e-12):
    """x / ||x|| along `axis` (eps keeps a zero vector zero, not NaN)."""
    x = jnp.asarray(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def document_key(text_emb=None, image_emb=None):
    """The dense retrieval key of a (multimodal) document.

    Paper (Sec. 2.1, after RA-CM3): the key is the "mean of the normalised
    text and image embeddings" of the document; a document with one modality
    is keyed by that modality's normalised embedding. Both arguments are
    CLIP projections [..., D] (normalised here, so raw `encode_*` outputs are
    fine); either may be None, not both.

    The mean is deliberately NOT re-normalised: that is the paper's
    definition, and its norm (between 0 and 1) is smaller the more text and
    image disagree, which the maximum-inner-product search sees.
    """
    embs = [l2_normalize(e) for e in (text_emb, image_emb) if e is not None]
    if not embs:
        raise ValueError("document_key: give text_emb, image_emb or both (both are None)")
    if len(embs) == 2 and embs[0].shape != embs[1].shape:
        raise ValueError(f"document_key: text embedding shape {embs[0].shape} differs from image "
                         f"embedding shape {embs[1].shape}")
    return sum(embs) / len(embs)


# -- images ----------------------------------------------------------------------------

def preprocess_images(images, config: CLIPConfig, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                      std: Sequence[float] = OPENAI_CLIP_STD) -> np.ndarray:
    """uint8 RGB images [N, H, W, 3] (or one [H, W, 3], or a list of
    differently sized ones) -> float32 NHWC [N, S, S, 3], S = image_size.

    CLIP's own preprocessing (transformers' CLIPImageProcessor): resize the
    shortest side to S with PIL bicubic (the long side to int(S * long /
    short)), centre crop S x S, scale to [0, 1], normalise per channel."""
    from PIL import Image

    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    size = config.image_size
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    out = []
    for i, img in enumerate(images):
        img = np.asarray(img)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"preprocess_images: image {i} must be uint8 [H, W, 3], got {img.dtype} "
                             f"{img.shape}")
        h, w = img.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), resample=Image.BICUBIC))
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crop = resized[top:top + size, left:left + size].astype(np.float32) / 255.0
        out.append((crop - mean) / std)
    if not out:
        raise ValueError("preprocess_images: no images")
    return np.stack(out).astype(np.float32)


# -- a model dir's caption tokeniser (data/clip_tokenizer.py reads it) ------------------

HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")
TOKENIZER_SUBDIR = "tokenizer"
# Where a CLIP trained here keeps the project's BPE (`cm3leon clip train`).
TEXT_TOKENIZER_SUBDIR = "text_tokenizer"
