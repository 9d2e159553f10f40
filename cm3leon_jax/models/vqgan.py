"""VQ-GAN image tokenizer (Flax linen): encoder, vector quantiser, decoder.

The paper's tokenizer is Make-A-Scene's VQ-GAN (f=8, 8,192 codes, a 256x256
image -> 32x32 = 1,024 codes). Meta never released it; Chameleon's VQ-GAN has
the same shape and its layout (taming-transformers' encoder/decoder, kept by
transformers' Chameleon and Janus VQ-VAEs) is the one followed here, with
parameter names that mirror those checkpoints so `cm3leon convert vqgan` maps
them one to one. Images are NHWC in [-1, 1].
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp


@gin.configurable
@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Sizes of the VQ-GAN. Defaults: the paper's layout, 256^2 -> 32x32 codes
    of 8,192, codebook dim 256, f=8. The channel plan (1, 2, 2, 4) is
    taming-transformers' f8 one (assumption: Make-A-Scene's is unpublished);
    Chameleon's own checkpoint is f=16 at 512^2, also 32x32 codes."""

    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_multiplier: Tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    latent_channels: int = 256
    embed_dim: int = 256          # codebook vector size
    num_embeddings: int = 8192    # codebook size
    num_groups: int = 32          # GroupNorm groups
    beta: float = 0.25            # commitment weight
    # transformers' Janus VQ-VAE L2-normalises codebook vectors when decoding
    # codes (LlamaGen's habit) but not when encoding; Chameleon's does neither.
    l2_normalize_codes_on_decode: bool = False
    # ViT-VQGAN / LlamaGen's l2-normalised codes: latents and codebook vectors
    # are unit-normalised before the nearest-code search (cosine similarity)
    # and the decoder sees the normalised code vectors, in training, encode
    # and decode alike. Off for Chameleon / Janus checkpoints.
    l2_normalize_codes: bool = False
    # "conv": taming-transformers' encoder (its receptive field spans the
    # whole image at 64x64, and with its attention every code may carry
    # information about any part of the image). "patch": each code is a
    # function of its own f x f pixel patch only (an MLP per patch), so a
    # blank patch always gets the same code and a code says what is in its
    # cell: far easier for a small decoder LM to learn (the CPU demo).
    encoder: str = "conv"
    patch_encoder_width: int = 256
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "channel_multiplier", tuple(self.channel_multiplier))
        if self.resolution % self.downsample_factor:
            raise ValueError(f"VQGANConfig: resolution {self.resolution} is not divisible by the "
                             f"downsampling factor {self.downsample_factor}")
        if self.encoder not in ("conv", "patch"):
            raise ValueError(f"VQGANConfig: encoder must be 'conv' or 'patch', got {self.encoder!r}")
        for m in set(self.channel_multiplier) | {1}:
            if (self.base_channels * m) % self.num_groups:
                raise ValueError(f"VQGANConfig: {self.base_channels * m} channels are not divisible "
                                 f"by num_groups={self.num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.downsample_factor

    @property
    def codes_per_image(self) -> int:
        return self.latent_size ** 2


def _conv(features, kernel, name, stride=1, padding="SAME"):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, name=name)


def _group_norm(cfg: VQGANConfig, name: str):
    # torch GroupNorm(eps=1e-6, affine=True)
    return nn.GroupNorm(num_groups=cfg.num_groups, epsilon=1e-6, name=name)


class ResnetBlock(nn.Module):
    config: VQGANConfig
    out_channels: int

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = nn.swish(_group_norm(cfg, "norm1")(x))
        h = _conv(self.out_channels, 3, "conv1")(h)
        h = nn.swish(_group_norm(cfg, "norm2")(h))
        h = _conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 convs)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = _group_norm(self.config, "norm")(x)
        q = _conv(c, 1, "q")(h).reshape(b, hh * ww, c)
        k = _conv(c, 1, "k")(h).reshape(b, hh * ww, c)
        v = _conv(c, 1, "v")(h).reshape(b, hh * ww, c)
        w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5), axis=-1)
        out = jnp.einsum("bqk,bkc->bqc", w, v).reshape(b, hh, ww, c)
        return x + _conv(c, 1, "proj_out")(out)


class MidBlock(nn.Module):
    config: VQGANConfig
    channels: int

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.config, self.channels, name="block_1")(x)
        x = AttnBlock(self.config, name="attn_1")(x)
        return ResnetBlock(self.config, self.channels, name="block_2")(x)


class Downsample(nn.Module):
    @nn.compact
    def __call__(self, x):
        # taming's asymmetric padding: one pixel at the bottom and right only
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest, x2
        return _conv(c, 3, "conv")(x)


class Encoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        levels = len(cfg.channel_multiplier)
        h = _conv(cfg.base_channels, 3, "conv_in")(x)
        for i in range(levels):
            out_ch = cfg.base_channels * cfg.channel_multiplier[i]
            for j in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg, out_ch, name=f"down_{i}_block_{j}")(h)
                if i == levels - 1:  # attention at the lowest resolution only
                    h = AttnBlock(cfg, name=f"down_{i}_attn_{j}")(h)
            if i != levels - 1:
                h = Downsample(name=f"down_{i}_downsample")(h)
        h = MidBlock(cfg, h.shape[-1], name="mid")(h)
        h = nn.swish(_group_norm(cfg, "norm_out")(h))
        return _conv(cfg.latent_channels, 3, "conv_out")(h)


class PatchEncoder(nn.Module):
    """Latents from each non-overlapping f x f patch alone: a 3-layer MLP on
    the patch's pixels (ViT-style patch embedding, no mixing between
    patches)."""

    config: VQGANConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        f = cfg.downsample_factor
        b, hh, ww, c = x.shape
        p = x.reshape(b, hh // f, f, ww // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh // f, ww // f, -1)
        h = nn.swish(nn.Dense(cfg.patch_encoder_width, name="fc_in")(p))
        h = nn.swish(nn.Dense(cfg.patch_encoder_width, name="fc_mid")(h))
        return nn.Dense(cfg.latent_channels, name="fc_out")(h)


class Decoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, z):
        cfg = self.config
        levels = len(cfg.channel_multiplier)
        ch = cfg.base_channels * cfg.channel_multiplier[-1]
        h = _conv(ch, 3, "conv_in")(z)
        h = MidBlock(cfg, ch, name="mid")(h)
        # up_0 is the lowest resolution (as in the transformers checkpoints)
        for i, level in enumerate(reversed(range(levels))):
            out_ch = cfg.base_channels * cfg.channel_multiplier[level]
            for j in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg, out_ch, name=f"up_{i}_block_{j}")(h)
                if level == levels - 1:
                    h = AttnBlock(cfg, name=f"up_{i}_attn_{j}")(h)
            if level != 0:
                h = Upsample(name=f"up_{i}_upsample")(h)
        h = nn.swish(_group_norm(cfg, "norm_out")(h))
        return _conv(cfg.out_channels, 3, "conv_out")(h)


def _unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_codes(z, codebook):
    """argmin_j ||z - e_j||^2 over the codebook, computed as ||e||^2 - 2 z.e
    (||z||^2 is constant per row). z: [..., D], codebook: [N, D]."""
    dist = jnp.sum(jnp.square(codebook), axis=-1) - 2.0 * jnp.einsum("...d,nd->...n", z, codebook)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


class VQGAN(nn.Module):
    """`encode(images) -> codes [B, h*w]`, `decode(codes) -> images`,
    `__call__(images) -> (reconstruction, codes, aux losses)` for training."""

    config: VQGANConfig

    def setup(self):
        cfg = self.config
        self.encoder = PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv(cfg.embed_dim, (1, 1), name="quant_conv")
        self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), name="post_quant_conv")
        self.codebook = self.param("codebook", nn.initializers.uniform(scale=2.0 / cfg.num_embeddings),
                                   (cfg.num_embeddings, cfg.embed_dim))

    def _check_images(self, images):
        cfg = self.config
        if images.ndim != 4 or images.shape[1:] != (cfg.resolution, cfg.resolution, cfg.in_channels):
            raise ValueError(f"VQGAN expects images [B, {cfg.resolution}, {cfg.resolution}, "
                             f"{cfg.in_channels}] in [-1, 1]; got {images.shape}")

    def latents(self, images):
        """Encoder output before quantisation [B, h, w, embed_dim] (unit
        vectors with `l2_normalize_codes`)."""
        self._check_images(images)
        z = self.quant_conv(self.encoder(images))
        return _unit(z) if self.config.l2_normalize_codes else z

    def codebook_vectors(self):
        """The codebook as the quantiser uses it [N, embed_dim]."""
        return _unit(self.codebook) if self.config.l2_normalize_codes else self.codebook

    def encode(self, images):
        z = self.latents(images)
        codes = nearest_codes(z, self.codebook_vectors())
        return codes.reshape(codes.shape[0], -1)

    def code_vectors(self, codes):
        cfg = self.config
        if codes.ndim != 2 or codes.shape[1] != cfg.codes_per_image:
            raise ValueError(f"VQGAN.decode expects codes [B, {cfg.codes_per_image}]; got {codes.shape}")
        e = jnp.take(self.codebook_vectors(), codes, axis=0)
        if cfg.l2_normalize_codes_on_decode:
            e = _unit(e)
        return e.reshape(codes.shape[0], cfg.latent_size, cfg.latent_size, cfg.embed_dim)

    def decode_latents(self, zq):
        return self.decoder(self.post_quant_conv(zq))

    def decode(self, codes):
        return self.decode_latents(self.code_vectors(codes))

    def __call__(self, images):
        """Training forward: straight-through quantisation; returns the
        reconstruction, codes and the codebook/commitment losses."""
        z = self.latents(images)
        codebook = self.codebook_vectors()
        codes = nearest_codes(jax.lax.stop_gradient(z), codebook)
        zq = jnp.take(codebook, codes, axis=0)
        codebook_loss = jnp.mean(jnp.square(zq - jax.lax.stop_gradient(z)))
        commitment_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - z))
        zq_st = z + jax.lax.stop_gradient(zq - z)
        recon = self.decode_latents(zq_st)
        quant_error = jnp.sum(jnp.square(jax.lax.stop_gradient(zq - z)), axis=-1)
        return recon, codes.reshape(codes.shape[0], -1), {
            "codebook_loss": codebook_loss, "commitment_loss": commitment_loss, "latents": z,
            "quant_error": quant_error}


def small_config(**overrides) -> VQGANConfig:
    """64x64 -> 8x8 codes; the CPU layout of the demo."""
    base = dict(resolution=64, base_channels=32, channel_multiplier=(1, 2, 2, 4), num_res_blocks=1,
                latent_channels=64, embed_dim=64, num_embeddings=512, num_groups=8)
    base.update(overrides)
    return VQGANConfig(**base)


def stage_shapes(cfg: VQGANConfig) -> Sequence[int]:
    return [cfg.resolution // 2 ** i for i in range(len(cfg.channel_multiplier))]
