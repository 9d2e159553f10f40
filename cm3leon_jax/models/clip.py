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
int ids [B, L] with L <= max_position_embeddings (`CLIPTextTokenizer`).

    model = CLIP(cfg)
    model.apply({"params": p}, ids, mask, method=CLIP.encode_text)   # [B, P]
    model.apply({"params": p}, pixels, method=CLIP.encode_image)     # [B, P]
    document_key(l2_normalize(t), ...)  # or document_key(t, i): normalises itself
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence, Tuple

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


# -- caption tokenisation ------------------------------------------------------------

HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")
TOKENIZER_SUBDIR = "tokenizer"
# Where a CLIP trained here keeps the project's BPE (`cm3leon clip train`).
TEXT_TOKENIZER_SUBDIR = "text_tokenizer"


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
