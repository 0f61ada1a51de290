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

Modules: Flax NNX (`VAE` = `Encoder` + `Decoder`, built of `Level`s of `ResBlock`s over `nnx.Conv` and
`nnx.GroupNorm`, every `nnx.Param` carrying logical axis names via `nnx.with_partitioning`); the functions above are
the pure boundary around them (ap_jax/model/modules.py): `vae_init` returns the Param state as plain dicts, and the
forward functions merge such params into the cached graphdef of the config's VAE (`nnx.merge`), so jitted steps see
plain pytrees only. Attributes are named so the parameters are the tree the hand-written VAE had ({"encoder":
{"conv_in", "level0": {"res0": {"norm1", "conv1", ...}, "down"}, ..., "mid", "norm_out", "conv_out"}, "decoder":
{...}}, every leaf the same shape and logical axes): autoencoder checkpoints written before the move to Flax restore
as they are.

Loss: l1_weight |x - x^| + mse_weight (x - x^)^2 (per-pixel means, foreground pixels weighted up by
`foreground_weight`, see `foreground_weights`) + kl_weight KL(q(z|x) || N(0, I)) (per-latent
mean). L1 is median-seeking, so flat colours come out exact and edges sharp instead of the blur MSE alone gives;
the small MSE term punishes the rare large miss (a vanished sprite) harder than L1 does. The KL weight is tiny, as
in SD/Wan VAEs: it keeps the latent scale tame without trading away reconstruction. No GAN or perceptual loss:
pixel-art frames are simple enough not to need them.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.model import config as config_lib
from ap_jax.model import layers
from ap_jax.model import modules

Params = dict[str, Any]

# ------------------------------------------------------------------------------------------------------ modules


def _conv(in_features: int, features: int, dtype: str, rngs: nnx.Rngs, kernel: int = 3, stride: int = 1) -> nnx.Conv:
  """A "SAME" conv computed in `dtype` on float32 weights; the HWIO kernel's channels are named conv_in, conv_out."""
  return nnx.Conv(
      in_features, features, (kernel, kernel), strides=stride, padding="SAME", dtype=layers.compute_dtype(dtype),
      param_dtype=jnp.float32, rngs=rngs,
      kernel_init=nnx.with_partitioning(modules.clipped_normal(), (None, None, "conv_in", "conv_out")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("conv_out",)))


def _norm(features: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm in float32 over (H, W, channels of the group), with gcd(groups, channels) groups. The variance is
  the two-pass mean((x - mean)^2), as jnp.var computes it (Flax's default one-pass E[x^2] - E[x]^2 loses digits)."""
  return nnx.GroupNorm(
      features, num_groups=math.gcd(groups, features), epsilon=1e-6, use_fast_variance=False, dtype=jnp.float32,
      param_dtype=jnp.float32, rngs=rngs,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ("channels",)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("channels",)))


class ResBlock(nnx.Module):
  """GroupNorm, SiLU, conv 3x3, twice, plus a skip (a 1x1 conv when the width changes)."""

  def __init__(self, in_features: int, features: int, groups: int, dtype: str, *, rngs: nnx.Rngs):
    self.dtype = dtype
    self.norm1 = _norm(in_features, groups, rngs)
    self.conv1 = _conv(in_features, features, dtype, rngs)
    self.norm2 = _norm(features, groups, rngs)
    self.conv2 = _conv(features, features, dtype, rngs)
    if in_features != features:
      self.skip = _conv(in_features, features, dtype, rngs, kernel=1)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = self.skip(x) if hasattr(self, "skip") else x.astype(layers.compute_dtype(self.dtype))
    return skip + h


class Level(nnx.Module):
  """One resolution: `num_res_blocks` ResBlocks (res0, res1, ...), then optionally a change of resolution to
  `resample_features` channels: "down" (a stride-2 conv) or "up" (nearest-neighbour 2x, then a conv)."""

  def __init__(self, in_features: int, features: int, num_res_blocks: int, groups: int, dtype: str,
               resample: str | None = None, resample_features: int = 0, *, rngs: nnx.Rngs):
    if resample not in ("down", "up", None):
      raise ValueError(f"Level resample = {resample!r}, expected 'down', 'up' or None")
    self.num_res_blocks, self.resample = num_res_blocks, resample
    for j in range(num_res_blocks):  # attributes res0, res1, ...: the parameter tree's names
      setattr(self, f"res{j}", ResBlock(in_features if j == 0 else features, features, groups, dtype, rngs=rngs))
    if resample == "down":
      self.down = _conv(features, resample_features, dtype, rngs, stride=2)
    elif resample == "up":
      self.up = _conv(features, resample_features, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(self.num_res_blocks):
      x = getattr(self, f"res{j}")(x)
    if self.resample == "down":
      x = self.down(x)
    elif self.resample == "up":
      x = self.up(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    return x


class Encoder(nnx.Module):
  """Frames [N, H, W, 3] -> posterior moments [N, h, w, 2c] (mean, then log-variance), in float32. `widths`: conv
  channels per resolution level."""

  def __init__(self, widths: tuple[int, ...], latent_channels: int, num_res_blocks: int, groups: int, dtype: str,
               *, rngs: nnx.Rngs):
    self.num_levels = len(widths)
    self.conv_in = _conv(3, widths[0], dtype, rngs)
    for i, width in enumerate(widths):
      last = i + 1 == len(widths)
      setattr(self, f"level{i}", Level(width, width, num_res_blocks, groups, dtype, resample=None if last else "down",
                                        resample_features=0 if last else widths[i + 1], rngs=rngs))
    self.mid = ResBlock(widths[-1], widths[-1], groups, dtype, rngs=rngs)
    self.norm_out = _norm(widths[-1], groups, rngs)
    self.conv_out = _conv(widths[-1], 2 * latent_channels, dtype, rngs)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    x = self.conv_in(x_NHWC)
    for i in range(self.num_levels):
      x = getattr(self, f"level{i}")(x)
    x = self.mid(x)
    return self.conv_out(nnx.silu(self.norm_out(x))).astype(jnp.float32)


class Decoder(nnx.Module):
  """Latents [N, h, w, c] (unnormalised) -> frames [N, H, W, 3], in float32: the encoder mirrored, with
  nearest-neighbour upsampling."""

  def __init__(self, widths: tuple[int, ...], latent_channels: int, num_res_blocks: int, groups: int, dtype: str,
               *, rngs: nnx.Rngs):
    self.num_levels = len(widths)
    self.conv_in = _conv(latent_channels, widths[-1], dtype, rngs)
    self.mid = ResBlock(widths[-1], widths[-1], groups, dtype, rngs=rngs)
    for i in reversed(range(len(widths))):
      setattr(self, f"level{i}", Level(widths[i], widths[i], num_res_blocks, groups, dtype,
                                        resample="up" if i else None, resample_features=widths[i - 1] if i else 0,
                                        rngs=rngs))
    self.norm_out = _norm(widths[0], groups, rngs)
    self.conv_out = _conv(widths[0], 3, dtype, rngs)

  def __call__(self, z_NHWC: jax.Array) -> jax.Array:
    x = self.mid(self.conv_in(z_NHWC))
    for i in reversed(range(self.num_levels)):
      x = getattr(self, f"level{i}")(x)
    return self.conv_out(nnx.silu(self.norm_out(x))).astype(jnp.float32)


class VAE(nnx.Module):
  """The autoencoder's two halves; its parameters are {"encoder": ..., "decoder": ...}."""

  def __init__(self, widths: tuple[int, ...], latent_channels: int, num_res_blocks: int, groups: int, dtype: str,
               *, rngs: nnx.Rngs):
    self.encoder = Encoder(widths, latent_channels, num_res_blocks, groups, dtype, rngs=rngs)
    self.decoder = Decoder(widths, latent_channels, num_res_blocks, groups, dtype, rngs=rngs)

  def encode(self, x_NHWC: jax.Array) -> jax.Array:
    return self.encoder(x_NHWC)

  def decode(self, z_NHWC: jax.Array) -> jax.Array:
    return self.decoder(z_NHWC)

  def __call__(self, x_NHWC: jax.Array) -> jax.Array:
    """Reconstruction of the posterior mean."""
    return self.decode(jnp.split(self.encode(x_NHWC), 2, axis=-1)[0])


def _hyper(config: ml_collections.ConfigDict) -> tuple:
  """The VAE's constructor arguments from the config, hashable (the graphdef cache's key)."""
  v = config.vae
  return (tuple(int(v.channels * m) for m in v.channel_mult), int(v.latent_channels), int(v.num_res_blocks),
          int(v.norm_groups), str(v.dtype))


def _maker(hyper: tuple):
  return lambda rngs: VAE(*hyper, rngs=rngs)


@functools.lru_cache(maxsize=32)
def _graphdef(hyper: tuple) -> nnx.GraphDef:
  """The VAE's static structure for these constructor arguments, built abstractly once."""
  return modules.graphdef(_maker(hyper))


def _module(params: Params, config: ml_collections.ConfigDict) -> VAE:
  """The VAE of `config` computing with `params` (plain dicts): the cached graphdef merged with them."""
  return modules.bind(_graphdef(_hyper(config)), params)


def vae_init(rng: jax.Array, config: ml_collections.ConfigDict) -> Params:
  """The autoencoder's parameters (plain nested dicts): conv kernels a standard normal clipped to +-2, over
  sqrt(fan_in); conv biases zero; norms scale one and bias zero."""
  return modules.init_params(_maker(_hyper(config)), rng)


def vae_logical_axes(config: ml_collections.ConfigDict):
  """Logical axis names of `vae_init`'s parameters (same structure, PartitionSpec leaves), from their Flax
  partitioning metadata."""
  return modules.param_logical_axes(_maker(_hyper(config)))


def _encoder(params: Params, config: ml_collections.ConfigDict, x_NHWC: jax.Array) -> jax.Array:
  return _module(params, config).encode(x_NHWC)


def _decoder(params: Params, config: ml_collections.ConfigDict, z_NHWC: jax.Array) -> jax.Array:
  return _module(params, config).decode(z_NHWC)


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
