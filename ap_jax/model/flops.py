"""Analytic FLOP counts of the denoiser and the VAE (forward, and a training step).

Counts multiply-adds as 2 FLOPs (as XLA's cost analysis does) for every matmul and conv, plus the elementwise
work that is not negligible at small widths: softmax over attention scores, normalisation, GELU/SiLU and the
residual/modulation arithmetic, with per-element costs chosen to match what XLA reports for these ops (the
matmul terms dominate from "small" up). A training step is forward + backward = 3x the forward (the backward
pass does two matmuls per forward matmul), plus one more forward of each block under full rematerialisation.
Attention is counted dense (all L x L scores), which is what the XLA path computes; a splash kernel skips
fully masked blocks and does less.

Used by the trainer for MFU (with the compiled cost as a cross-check) and by benchmarks/model_flops.py.
"""

from __future__ import annotations

import ml_collections

from ap_jax.model import config as config_lib

# Elementwise FLOPs per element, fitted to XLA's HLO cost analysis on CPU (see tests/test_model_flops.py).
_SOFTMAX_PER_SCORE = 5  # max, subtract, exp, sum, divide (+ mask select)
_NORM_PER_ELEMENT = 8  # LayerNorm / RMSNorm with affine or modulation
_GELU_PER_ELEMENT = 12  # tanh-approximate GELU
_RESIDUAL_PER_ELEMENT = 4  # gated residual adds, bias adds


def denoiser_forward_flops(config: ml_collections.ConfigDict, batch_size: int, num_frames: int,
                           latent_hw: tuple[int, int]) -> dict[str, float]:
  """Forward FLOPs of `dit.apply` by component, for B = batch_size clips of F = num_frames latent frames."""
  d = config.dit
  b, f = batch_size, num_frames
  ps, c_lat = d.patch_size, config.vae.latent_channels
  n = (latent_hw[0] // ps) * (latent_hw[1] // ps)
  p_max = config.max_players
  p = p_max if d.subject_tokens else 0
  q = n + p
  length = f * q
  width, mlp = d.width, d.mlp
  heads = d.heads
  s = p_max * f  # action entries
  cross_queries = f * p if d.subject_tokens else f * n
  patch_dim = ps * ps * c_lat
  dims = 4 if d.get("state_facing", False) else 2  # dit.state_dims
  coord_in = dims + 2 * dims * d.coord_freqs
  previous = bool(d.get("previous_frame_input", False))  # a second patch embedding (and state embedding)

  per_block = {
      "self_attn_proj": 8 * length * width * width,
      "self_attn_scores": 4 * length * length * width,
      "softmax": _SOFTMAX_PER_SCORE * heads * (length * length + cross_queries * s),
      "cross_attn_proj": 4 * cross_queries * width * width + 4 * s * width * width,
      "cross_attn_scores": 4 * cross_queries * s * width,
      "mlp": 4 * length * width * mlp + _GELU_PER_ELEMENT * length * mlp,
      "norms_residuals": (3 * _NORM_PER_ELEMENT + 3 * _RESIDUAL_PER_ELEMENT) * length * width
                         + 2 * _NORM_PER_ELEMENT * (length + s) * width,
  }
  out = {k: b * d.depth * v for k, v in per_block.items()}
  out["embed_and_head"] = b * (
      (4 + 2 * previous) * f * n * patch_dim * width  # patch embedding(s) and video head
      + 2 * f * (d.freq_dim * width + width * width + 6 * width * width)  # time MLP and modulation
      + ((2 + 2 * previous) * f * p * (coord_in * width + width * width) + 2 * f * p * width * dims
         if d.subject_tokens else 2 * p_max * (coord_in * width + width * width))
      + _NORM_PER_ELEMENT * length * width)
  out["total"] = float(sum(out.values()))
  return out


def denoiser_train_step_flops(config: ml_collections.ConfigDict, batch_size: int, num_frames: int,
                              latent_hw: tuple[int, int]) -> float:
  """FLOPs of one denoiser training step (forward + backward; + a block re-forward under full remat)."""
  fwd = denoiser_forward_flops(config, batch_size, num_frames, latent_hw)
  blocks = fwd["total"] - fwd["embed_and_head"]
  recompute = blocks if config.dit.remat_policy == "full" else 0.0
  return 3.0 * fwd["total"] + recompute


def vae_forward_flops(config: ml_collections.ConfigDict, num_frames: int, frame_hw: tuple[int, int],
                      encoder: bool = True, decoder: bool = True) -> float:
  """Conv FLOPs (2 per multiply-add) of encoding and/or decoding `num_frames` frames of frame_hw pixels."""
  v = config.vae
  chans = [v.channels * m for m in v.channel_mult]
  conv = lambda hw, cin, cout, k=3: 2 * hw[0] * hw[1] * k * k * cin * cout
  res = lambda hw, cin, cout: conv(hw, cin, cout) + conv(hw, cout, cout) + (conv(hw, cin, cout, 1) if cin != cout else 0)
  enc = dec = 0.0
  hw = tuple(frame_hw)
  enc += conv(hw, 3, chans[0])
  for i, ch in enumerate(chans):
    enc += v.num_res_blocks * res(hw, ch, ch)
    if i + 1 < len(chans):
      hw = (hw[0] // 2, hw[1] // 2)
      enc += conv(hw, ch, chans[i + 1])
  enc += res(hw, chans[-1], chans[-1]) + conv(hw, chans[-1], 2 * v.latent_channels)
  lat_hw = hw
  dec += conv(lat_hw, v.latent_channels, chans[-1]) + res(lat_hw, chans[-1], chans[-1])
  hw = lat_hw
  for i in reversed(range(len(chans))):
    dec += v.num_res_blocks * res(hw, chans[i], chans[i])
    if i > 0:
      hw = (hw[0] * 2, hw[1] * 2)
      dec += conv(hw, chans[i], chans[i - 1])
  dec += conv(hw, chans[0], 3)
  return num_frames * ((enc if encoder else 0.0) + (dec if decoder else 0.0))


def vae_train_step_flops(config: ml_collections.ConfigDict, num_frames: int, frame_hw: tuple[int, int]) -> float:
  return 3.0 * vae_forward_flops(config, num_frames, frame_hw)


def latent_hw(config: ml_collections.ConfigDict, frame_hw: tuple[int, int]) -> tuple[int, int]:
  s = config_lib.compression(config)
  return frame_hw[0] // s, frame_hw[1] // s
