"""Per-frame convolutional VAE: frames <-> latents, with no temporal compression (one latent frame per frame).

Dimension letters: B batch, T frames, H, W pixels, h, w latent grid (H / s, W / s with s = compression),
c latent channels, C conv channels.

Interface (the only thing the denoiser and trainer use, so a pretrained video VAE such as Wan2.1's can replace
this one behind it):
  vae_init(rng, config) -> params
  vae_logical_axes(config) -> logical-axes pytree (same structure, PartitionSpec leaves)
  vae_encode(params, config, frames_BTHWC, rng=None) -> latents_BThwc, scaled for the denoiser
  vae_decode(params, config, latents_BThwc) -> frames_BTHWC in about [-1, 1]
  vae_loss(params, config, frames_BTHWC, rng) -> (loss, metrics)
A Wan2.1 VAE would plug in as encode/decode with c = 16, s = 8; it compresses time 4x (1 + 4k frames -> 1 + k
latents), so the denoiser's frames <-> actions bookkeeping would then group 4 actions per latent frame.

Architecture (config.vae): conv_in, then per resolution level `num_res_blocks` ResBlocks (GroupNorm, SiLU,
conv 3x3, twice, plus skip) and a stride-2 conv down; a middle ResBlock; GroupNorm, SiLU, conv_out to 2c
(mean, log-variance). The decoder mirrors it with nearest-neighbour upsampling + conv. Nearest upsampling suits
pixel art: sprites are blocky, and it avoids checkerboard artefacts of transposed convs.

Modules: Flax Linen (`VAE` = `Encoder` + `Decoder`, built of `Level`s of `ResBlock`s over `nn.Conv` and
`nn.GroupNorm`); the functions above are the pure boundary around them (ap_jax/model/modules.py). Submodules are
named explicitly, so the parameters are the tree the hand-written VAE had ({"encoder": {"conv_in", "level0":
{"res0": {"norm1", "conv1", ...}, "down"}, ..., "mid", "norm_out", "conv_out"}, "decoder": {...}}, every leaf
the same shape and logical axes): autoencoder checkpoints written before the move to Flax restore as they are.

Loss: l1_weight |x - x^| + mse_weight (x - x^)^2 (per-pixel means, foreground pixels weighted up by
`foreground_weight`, see `foreground_weights`) + kl_weight KL(q(z|x) || N(0, I)) (per-latent
mean). L1 is median-seeking, so flat colours come out exact and edges sharp instead of the blur MSE alone gives;
the small MSE term punishes the rare large miss (a vanished sprite) harder than L1 does. The KL weight is tiny, as
in SD/Wan VAEs: it keeps the latent scale tame without trading away reconstruction. No GAN or perceptual loss:
pixel-art frames are simple enough not to need them.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.model import config as config_lib
from ap_jax.model import layers
from ap_jax.model import modules

Params = dict[str, Any]

# ------------------------------------------------------------------------------------------------------ modules


def _conv(features: int, dtype: str, name: str, kernel: int = 3, stride: int = 1) -> nn.Conv:
  """A "SAME" conv computed in `dtype` on float32 weights; the HWIO kernel's channels are named conv_in, conv_out."""
  return nn.Conv(
      features, (kernel, kernel), strides=stride, padding="SAME", dtype=layers.compute_dtype(dtype),
      param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(modules.clipped_normal(), (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def _norm(x: jax.Array, groups: int, name: str) -> jax.Array:
  """GroupNorm in float32 over (H, W, channels of the group), with gcd(groups, channels) groups. The variance is
  the two-pass mean((x - mean)^2), as jnp.var computes it (Flax's default one-pass E[x^2] - E[x]^2 loses digits)."""
  return nn.GroupNorm(
      num_groups=math.gcd(groups, x.shape[-1]), epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32,
      param_dtype=jnp.float32, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("channels",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("channels",)))(x)


class ResBlock(nn.Module):
  """GroupNorm, SiLU, conv 3x3, twice, plus a skip (a 1x1 conv when the width changes)."""

  features: int
  groups: int
  dtype: str

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = _conv(self.features, self.dtype, "conv1")(nn.silu(_norm(x, self.groups, "norm1")))
    h = _conv(self.features, self.dtype, "conv2")(nn.silu(_norm(h, self.groups, "norm2")))
    if x.shape[-1] != self.features:
      skip = _conv(self.features, self.dtype, "skip", kernel=1)(x)
    else:
      skip = x.astype(layers.compute_dtype(self.dtype))
    return skip + h


class Level(nn.Module):
  """One resolution: `num_res_blocks` ResBlocks (res0, res1, ...), then optionally a change of resolution to
  `resample_features` channels: "down" (a stride-2 conv) or "up" (nearest-neighbour 2x, then a conv)."""

  features: int
  num_res_blocks: int
  groups: int
  dtype: str
  resample: str | None = None
  resample_features: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_res_blocks):
      x = ResBlock(self.features, self.groups, self.dtype, name=f"res{j}")(x)
    if self.resample == "down":
      x = _conv(self.resample_features, self.dtype, "down", stride=2)(x)
    elif self.resample == "up":
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = _conv(self.resample_features, self.dtype, "up")(x)
    elif self.resample is not None:
      raise ValueError(f"Level resample = {self.resample!r}, expected 'down', 'up' or None")
    return x


class Encoder(nn.Module):
  """Frames [N, H, W, 3] -> posterior moments [N, h, w, 2c] (mean, then log-variance), in float32."""

  widths: tuple[int, ...]  # conv channels per resolution level
  latent_channels: int
  num_res_blocks: int
  groups: int
  dtype: str

  @nn.compact
  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    x = _conv(self.widths[0], self.dtype, "conv_in")(x_NHWC)
    for i, width in enumerate(self.widths):
      last = i + 1 == len(self.widths)
      x = Level(width, self.num_res_blocks, self.groups, self.dtype, resample=None if last else "down",
                resample_features=0 if last else self.widths[i + 1], name=f"level{i}")(x)
    x = ResBlock(self.widths[-1], self.groups, self.dtype, name="mid")(x)
    x = nn.silu(_norm(x, self.groups, "norm_out"))
    return _conv(2 * self.latent_channels, self.dtype, "conv_out")(x).astype(jnp.float32)


class Decoder(nn.Module):
  """Latents [N, h, w, c] (unnormalised) -> frames [N, H, W, 3], in float32: the encoder mirrored, with
  nearest-neighbour upsampling."""

  widths: tuple[int, ...]
  num_res_blocks: int
  groups: int
  dtype: str

  @nn.compact
  def __call__(self, z_NHWC: jax.Array) -> jax.Array:
    x = _conv(self.widths[-1], self.dtype, "conv_in")(z_NHWC)
    x = ResBlock(self.widths[-1], self.groups, self.dtype, name="mid")(x)
    for i in reversed(range(len(self.widths))):
      x = Level(self.widths[i], self.num_res_blocks, self.groups, self.dtype, resample="up" if i else None,
                resample_features=self.widths[i - 1] if i else 0, name=f"level{i}")(x)
    x = nn.silu(_norm(x, self.groups, "norm_out"))
    return _conv(3, self.dtype, "conv_out")(x).astype(jnp.float32)


class VAE(nn.Module):
  """The autoencoder's two halves; its parameters are {"encoder": ..., "decoder": ...}."""

  widths: tuple[int, ...]
  latent_channels: int
  num_res_blocks: int
  groups: int
  dtype: str

  def setup(self):
    self.encoder = Encoder(self.widths, self.latent_channels, self.num_res_blocks, self.groups, self.dtype)
    self.decoder = Decoder(self.widths, self.num_res_blocks, self.groups, self.dtype)

  def encode(self, x_NHWC: jax.Array) -> jax.Array:
    return self.encoder(x_NHWC)

  def decode(self, z_NHWC: jax.Array) -> jax.Array:
    return self.decoder(z_NHWC)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    """Reconstruction of the posterior mean (creates both halves' parameters on `init`)."""
    return self.decode(jnp.split(self.encode(x_NHWC), 2, axis=-1)[0])


def _module(config: ml_collections.ConfigDict) -> VAE:
  v = config.vae
  return VAE(widths=tuple(v.channels * m for m in v.channel_mult), latent_channels=v.latent_channels,
             num_res_blocks=v.num_res_blocks, groups=v.norm_groups, dtype=v.dtype)


def _example_frames(config: ml_collections.ConfigDict) -> jax.Array:
  """The smallest frame batch `init` can trace: one frame of compression x compression pixels."""
  s = config_lib.compression(config)
  return jnp.zeros((1, s, s, 3), jnp.float32)


def vae_init(rng: jax.Array, config: ml_collections.ConfigDict) -> Params:
  """The autoencoder's parameters (plain nested dicts): conv kernels a standard normal clipped to +-2, over
  sqrt(fan_in); conv biases zero; norms scale one and bias zero."""
  return modules.init_params(_module(config), rng, _example_frames(config))


def vae_logical_axes(config: ml_collections.ConfigDict):
  """Logical axis names of `vae_init`'s parameters (same structure, PartitionSpec leaves), from their Flax
  partitioning metadata."""
  return modules.param_logical_axes(_module(config), _example_frames(config))


def _encoder(params: Params, config: ml_collections.ConfigDict, x_NHWC: jax.Array) -> jax.Array:
  return _module(config).apply({"params": params}, x_NHWC, method=VAE.encode)


def _decoder(params: Params, config: ml_collections.ConfigDict, z_NHWC: jax.Array) -> jax.Array:
  return _module(config).apply({"params": params}, z_NHWC, method=VAE.decode)


def _check_frames(config, frames: jax.Array) -> None:
  s = config_lib.compression(config)
  if frames.ndim != 5 or frames.shape[-1] != 3:
    raise ValueError(f"frames has shape {frames.shape}, expected [B, T, H, W, 3] in [-1, 1]")
  if frames.shape[2] % s or frames.shape[3] % s:
    raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[3]} pixels, expected multiples of the VAE "
                     f"compression {s}")


# ---------------------------------------------------------------------------------------------------- public

def encode_moments(params: Params, config: ml_collections.ConfigDict, frames_BTHWC: jax.Array):
  """Posterior mean and log-variance [B, T, h, w, c] (unscaled), frame by frame."""
  _check_frames(config, frames_BTHWC)
  b, t, hh, ww, _ = frames_BTHWC.shape
  out = _encoder(params, config, frames_BTHWC.reshape(b * t, hh, ww, 3))
  mean, logvar = jnp.split(out, 2, axis=-1)
  logvar = jnp.clip(logvar, -30.0, 20.0)
  shape = (b, t) + mean.shape[1:]
  return mean.reshape(shape), logvar.reshape(shape)


def vae_encode(params: Params, config: ml_collections.ConfigDict, frames_BTHWC: jax.Array,
               rng: jax.Array | None = None) -> jax.Array:
  """Frames [B, T, H, W, 3] in [-1, 1] -> denoiser latents [B, T, h, w, c]: the posterior mean (or a sample when
  rng is given), normalised as (z - latent_shift) * latent_scale."""
  mean, logvar = encode_moments(params, config, frames_BTHWC)
  z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
  return (z - config.vae.latent_shift) * config.vae.latent_scale


def vae_decode(params: Params, config: ml_collections.ConfigDict, latents_BThwc: jax.Array) -> jax.Array:
  """Denoiser latents [B, T, h, w, c] -> frames [B, T, H, W, 3] (about [-1, 1]; clip before display)."""
  if latents_BThwc.ndim != 5 or latents_BThwc.shape[-1] != config.vae.latent_channels:
    raise ValueError(f"latents have shape {latents_BThwc.shape}, expected [B, T, h, w, "
                     f"{config.vae.latent_channels}]")
  z = latents_BThwc / config.vae.latent_scale + config.vae.latent_shift
  b, t, h, w, c = z.shape
  x = _decoder(params, config, z.reshape(b * t, h, w, c))
  return x.reshape((b, t) + x.shape[1:])


def psnr(frames_a: jax.Array, frames_b: jax.Array) -> jax.Array:
  """PSNR in dB of frames in [-1, 1] (peak-to-peak 2), over the whole batch, after clipping to the range."""
  mse = jnp.mean(jnp.square(jnp.clip(frames_a, -1, 1) - jnp.clip(frames_b, -1, 1)))
  return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def foreground_weights(frames_BTHWC: jax.Array, foreground_weight: float) -> jax.Array:
  """Per-pixel loss weights [B, T, H, W, 1]: 1 + foreground_weight where a pixel differs from its frame's
  background (the per-channel median colour), else 1.

  Why: in top-down game frames the players are a few percent of the pixels. An unweighted loss reaches a good
  PSNR by drawing the floor and walls and blurring the players away, which is exactly what the world model must
  not lose (the detector reads players by colour and facing). Weighting the rare foreground pixels fixes that
  without knowing the game's palette.
  """
  if not foreground_weight:
    return jnp.ones(frames_BTHWC.shape[:-1] + (1,), jnp.float32)
  background = jnp.median(frames_BTHWC, axis=(2, 3), keepdims=True)
  foreground = jnp.max(jnp.abs(frames_BTHWC - background), axis=-1, keepdims=True) > 0.1
  return 1.0 + foreground_weight * foreground.astype(jnp.float32)


def subject_weights(positions_BTP2: jax.Array, player_mask_BP: jax.Array, frame_hw: tuple[int, int],
                    radius_px: float, foreground_weight: float) -> jax.Array:
  """Per-pixel loss weights [B, T, H, W, 1]: 1 + foreground_weight on pixels whose centre lies within `radius_px`
  (per axis: a square) of a real player's position (pixel coordinates, y then x), else 1."""
  h, w = frame_hw
  ys = jnp.arange(h, dtype=jnp.float32) + 0.5
  xs = jnp.arange(w, dtype=jnp.float32) + 0.5
  pos = positions_BTP2.astype(jnp.float32)
  near_y = jnp.abs(ys[None, None, None, :] - pos[..., 0:1]) <= radius_px  # [B, T, P, H]
  near_x = jnp.abs(xs[None, None, None, :] - pos[..., 1:2]) <= radius_px  # [B, T, P, W]
  near = near_y[..., :, None] & near_x[..., None, :] & player_mask_BP[:, None, :, None, None].astype(bool)
  return 1.0 + foreground_weight * jnp.any(near, axis=2)[..., None].astype(jnp.float32)


def vae_loss(params: Params, config: ml_collections.ConfigDict, frames_BTHWC: jax.Array, rng: jax.Array,
             weights: jax.Array | None = None):
  """(loss, metrics) for a batch of frames in [-1, 1]; see the module docstring for the terms. `weights`
  [B, T, H, W, 1]: per-pixel loss weights (`subject_weights`), instead of the colour test of `foreground_weights`."""
  v = config.vae
  mean, logvar = encode_moments(params, config, frames_BTHWC)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
  b, t, h, w, c = z.shape
  recon = _decoder(params, config, z.reshape(b * t, h, w, c)).reshape(frames_BTHWC.shape)
  target = frames_BTHWC.astype(jnp.float32)
  err = recon - target
  weight = foreground_weights(target, v.get("foreground_weight", 0.0)) if weights is None else weights
  l1 = jnp.mean(weight * jnp.abs(err)) / jnp.mean(weight)
  mse = jnp.mean(weight * jnp.square(err)) / jnp.mean(weight)
  kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  loss = v.l1_weight * l1 + v.mse_weight * mse + v.kl_weight * kl
  return loss, {"loss": loss, "l1": l1, "mse": mse, "kl": kl, "psnr": psnr(recon, frames_BTHWC)}


def latent_statistics(params: Params, config: ml_collections.ConfigDict, frames_BTHWC: jax.Array):
  """(latent_shift, latent_scale) that give the denoiser zero-mean, unit-variance latents on these frames;
  store them in config.vae after stage 1."""
  mean, _ = encode_moments(params, config, frames_BTHWC)
  return float(jnp.mean(mean)), float(1.0 / (jnp.std(mean) + 1e-6))
