"""Per-frame convolutional VAE: frames <-> latents, with no temporal compression (one latent frame per frame).

Dimension letters: B batch, T frames, H, W pixels, h, w latent grid (H / s, W / s with s = compression),
c latent channels, C conv channels.

Interface (the only thing the denoiser and trainer use, so a pretrained video VAE such as Wan2.1's can replace
this one behind it):
  vae_init(rng, config) -> params
  vae_logical_axes(config) -> logical-axes pytree (same structure)
  vae_encode(params, config, frames_BTHWC, rng=None) -> latents_BThwc, scaled for the denoiser
  vae_decode(params, config, latents_BThwc) -> frames_BTHWC in about [-1, 1]
  vae_loss(params, config, frames_BTHWC, rng) -> (loss, metrics)
A Wan2.1 VAE would plug in as encode/decode with c = 16, s = 8; it compresses time 4x (1 + 4k frames -> 1 + k
latents), so the denoiser's frames <-> actions bookkeeping would then group 4 actions per latent frame.

Architecture (config.vae): conv_in, then per resolution level `num_res_blocks` ResBlocks (GroupNorm, SiLU,
conv 3x3, twice, plus skip) and a stride-2 conv down; a middle ResBlock; GroupNorm, SiLU, conv_out to 2c
(mean, log-variance). The decoder mirrors it with nearest-neighbour upsampling + conv. Nearest upsampling suits
pixel art: sprites are blocky, and it avoids checkerboard artefacts of transposed convs.

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

import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.model import config as config_lib
from ap_jax.model import layers
from ap_jax.model.layers import ParamSpec

Params = dict[str, Any]


def _conv_spec(c_in: int, c_out: int, k: int = 3) -> dict:
  return {"kernel": ParamSpec((k, k, c_in, c_out), (None, None, "conv_in", "conv_out"), "normal", fan_in=k * k * c_in),
          "bias": ParamSpec((c_out,), ("conv_out",), "zeros")}


def _norm_spec(c: int) -> dict:
  return {"scale": ParamSpec((c,), ("channels",), "ones"), "bias": ParamSpec((c,), ("channels",), "zeros")}


def _resblock_spec(c_in: int, c_out: int) -> dict:
  spec = {"norm1": _norm_spec(c_in), "conv1": _conv_spec(c_in, c_out), "norm2": _norm_spec(c_out),
          "conv2": _conv_spec(c_out, c_out)}
  if c_in != c_out:
    spec["skip"] = _conv_spec(c_in, c_out, 1)
  return spec


def vae_specs(config: ml_collections.ConfigDict) -> dict:
  v = config.vae
  chans = [v.channels * m for m in v.channel_mult]
  enc: dict[str, Any] = {"conv_in": _conv_spec(3, chans[0])}
  for i, ch in enumerate(chans):
    enc[f"level{i}"] = {f"res{j}": _resblock_spec(ch, ch) for j in range(v.num_res_blocks)}
    if i + 1 < len(chans):
      enc[f"level{i}"]["down"] = _conv_spec(ch, chans[i + 1])
  enc["mid"] = _resblock_spec(chans[-1], chans[-1])
  enc["norm_out"] = _norm_spec(chans[-1])
  enc["conv_out"] = _conv_spec(chans[-1], 2 * v.latent_channels)

  dec: dict[str, Any] = {"conv_in": _conv_spec(v.latent_channels, chans[-1]), "mid": _resblock_spec(chans[-1], chans[-1])}
  for i in reversed(range(len(chans))):
    dec[f"level{i}"] = {f"res{j}": _resblock_spec(chans[i], chans[i]) for j in range(v.num_res_blocks)}
    if i > 0:
      dec[f"level{i}"]["up"] = _conv_spec(chans[i], chans[i - 1])
  dec["norm_out"] = _norm_spec(chans[0])
  dec["conv_out"] = _conv_spec(chans[0], 3)
  return {"encoder": enc, "decoder": dec}


def vae_init(rng: jax.Array, config: ml_collections.ConfigDict) -> Params:
  return layers.init_from_specs(rng, vae_specs(config))


def vae_logical_axes(config: ml_collections.ConfigDict):
  return layers.axes_from_specs(vae_specs(config))


# ------------------------------------------------------------------------------------------------------ layers

def _conv(p: Params, x: jax.Array, dtype, stride: int = 1) -> jax.Array:
  y = jax.lax.conv_general_dilated(
      x.astype(dtype), p["kernel"].astype(dtype), window_strides=(stride, stride), padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["bias"].astype(dtype)


def _group_norm(p: Params, x: jax.Array, groups: int, eps: float = 1e-6) -> jax.Array:
  """GroupNorm in float32 over (H, W, channels of the group)."""
  n, h, w, c = x.shape
  g = math.gcd(groups, c)
  x32 = x.astype(jnp.float32).reshape(n, h, w, g, c // g)
  mean = jnp.mean(x32, axis=(1, 2, 4), keepdims=True)
  var = jnp.var(x32, axis=(1, 2, 4), keepdims=True)
  y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).reshape(n, h, w, c)
  return y * p["scale"] + p["bias"]


def _resblock(p: Params, x: jax.Array, groups: int, dtype) -> jax.Array:
  h = _conv(p["conv1"], jax.nn.silu(_group_norm(p["norm1"], x, groups)), dtype)
  h = _conv(p["conv2"], jax.nn.silu(_group_norm(p["norm2"], h, groups)), dtype)
  skip = _conv(p["skip"], x, dtype) if "skip" in p else x.astype(dtype)
  return skip + h


def _encoder(p: Params, v, x_NHWC: jax.Array) -> jax.Array:
  dtype = layers.compute_dtype(v.dtype)
  x = _conv(p["conv_in"], x_NHWC, dtype)
  for i in range(len(v.channel_mult)):
    level = p[f"level{i}"]
    for j in range(v.num_res_blocks):
      x = _resblock(level[f"res{j}"], x, v.norm_groups, dtype)
    if "down" in level:
      x = _conv(level["down"], x, dtype, stride=2)
  x = _resblock(p["mid"], x, v.norm_groups, dtype)
  x = _conv(p["conv_out"], jax.nn.silu(_group_norm(p["norm_out"], x, v.norm_groups)), dtype)
  return x.astype(jnp.float32)


def _decoder(p: Params, v, z_NHWC: jax.Array) -> jax.Array:
  dtype = layers.compute_dtype(v.dtype)
  x = _conv(p["conv_in"], z_NHWC, dtype)
  x = _resblock(p["mid"], x, v.norm_groups, dtype)
  for i in reversed(range(len(v.channel_mult))):
    level = p[f"level{i}"]
    for j in range(v.num_res_blocks):
      x = _resblock(level[f"res{j}"], x, v.norm_groups, dtype)
    if "up" in level:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      x = _conv(level["up"], x, dtype)
  x = _conv(p["conv_out"], jax.nn.silu(_group_norm(p["norm_out"], x, v.norm_groups)), dtype)
  return x.astype(jnp.float32)


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
  out = _encoder(params["encoder"], config.vae, frames_BTHWC.reshape(b * t, hh, ww, 3))
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
  x = _decoder(params["decoder"], config.vae, z.reshape(b * t, h, w, c))
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
  recon = _decoder(params["decoder"], v, z.reshape(b * t, h, w, c)).reshape(frames_BTHWC.shape)
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
