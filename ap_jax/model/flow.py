"""Rectified flow (flow matching), as in Wan2.1: schedule, time sampling, noising, loss. Pure functions.

Convention: t in [0, 1], t = 0 is data and t = 1 is pure noise;
    x_t = (1 - t) x_0 + t eps,        velocity target v = eps - x_0,
so an Euler step from t to t' < t is x_t' = x_t + (t' - t) v. Each latent frame carries its own t (diffusion
forcing): context frames get a low t of their own, which autoregressive rollouts need against drift.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """Wan/SD3 timestep shift t' = s t / (1 + (s - 1) t); s > 1 spends more of training/sampling at high noise."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def sample_times(rng: jax.Array, shape: tuple[int, ...], flow_config: ml_collections.ConfigDict) -> jax.Array:
  """Training times in (0, 1): logit-normal(0, 1) or uniform, then shifted."""
  if flow_config.time_sampling == "logit_normal":
    t = jax.nn.sigmoid(jax.random.normal(rng, shape))
  elif flow_config.time_sampling == "uniform":
    t = jax.random.uniform(rng, shape)
  else:
    raise ValueError(f"flow.time_sampling = {flow_config.time_sampling!r}, expected logit_normal or uniform")
  return shift_time(t, flow_config.shift)


def sample_frame_times(rng: jax.Array, batch_size: int, num_frames: int,
                       flow_config: ml_collections.ConfigDict) -> jax.Array:
  """[B, F] per-frame times: context frames ~ U[0, context_noise_max], target frames one shared t per clip
  (what a chunked sampler sees) or, with independent_frame_times, one t per frame (full diffusion forcing)."""
  num_context = flow_config.num_context_frames
  if not 0 <= num_context < num_frames:
    raise ValueError(f"flow.num_context_frames = {num_context}, expected 0 <= it < {num_frames} frames")
  rng_ctx, rng_tgt = jax.random.split(rng)
  ctx = jax.random.uniform(rng_ctx, (batch_size, num_context)) * flow_config.context_noise_max
  num_target = num_frames - num_context
  if flow_config.independent_frame_times:
    tgt = sample_times(rng_tgt, (batch_size, num_target), flow_config)
  else:
    tgt = jnp.broadcast_to(sample_times(rng_tgt, (batch_size, 1), flow_config), (batch_size, num_target))
  return jnp.concatenate([ctx, tgt], axis=1)


def coord_time(t: jax.Array, lead: float) -> jax.Array:
  """Flow time of the subject coordinates when the video is at flow time t: (t - lead) / (1 - lead), clipped to
  [0, 1]. lead = 0 noises both at the same time (plain joint denoising); lead > 0 makes the coordinates lead, so
  they are clean once the video reaches t = lead and the rest of sampling renders the frame around known
  positions (the subject tokens' RoPE then sits exactly on their players). The coordinates' velocity target
  stays noise - x0 in their own time, so an ODE step from t to t' moves them by (g(t') - g(t)) v."""
  if not 0.0 <= lead < 1.0:
    raise ValueError(f"flow.coord_time_lead = {lead}, expected a value in [0, 1)")
  if lead == 0.0:
    return t
  return jnp.clip((t - lead) / (1.0 - lead), 0.0, 1.0)


COORD_PRIORS = ("standard", "previous")


def coord_prior_centre(coords_BFP2: jax.Array, num_context: int, flow_config: ml_collections.ConfigDict) -> jax.Array:
  """[B, F, P, 2] centre of each frame's coordinate source distribution (flow.coord_prior): zeros ("standard"), or
  ("previous") each context frame's own coordinates and, for every target frame, the last context frame's (what a
  sampler knows when it starts a chunk)."""
  if flow_config.coord_prior == "standard":
    return jnp.zeros_like(coords_BFP2)
  if flow_config.coord_prior != "previous":
    raise ValueError(f"flow.coord_prior = {flow_config.coord_prior!r}, expected one of {COORD_PRIORS}")
  f = coords_BFP2.shape[1]
  last = coords_BFP2[:, num_context - 1:num_context]
  return jnp.concatenate([coords_BFP2[:, :num_context], jnp.broadcast_to(last, (coords_BFP2.shape[0], f - num_context)
                                                                          + coords_BFP2.shape[2:])], axis=1)


def coord_source(centre: jax.Array, noise: jax.Array, flow_config: ml_collections.ConfigDict) -> jax.Array:
  """A draw from the coordinates' source distribution: centre + coord_noise_std * noise ("previous"), or noise."""
  if flow_config.coord_prior == "standard":
    return noise
  return centre + float(flow_config.coord_noise_std) * noise


def add_noise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t noise; t broadcasts from the left ([B, F] against [B, F, ...])."""
  t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim)).astype(x0.dtype)
  return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  return noise - x0


def flow_loss(pred: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
  """Weighted mean squared velocity error; weight broadcasts from the left and is normalised by its sum times
  the number of trailing elements per weight entry."""
  weight = weight.astype(jnp.float32)
  w = weight.reshape(weight.shape + (1,) * (pred.ndim - weight.ndim))
  sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  per_entry = pred.size // weight.size
  return jnp.sum(sq * w) / jnp.maximum(jnp.sum(weight) * per_entry, 1.0)


def sampling_times(num_steps: int, shift: float) -> jax.Array:
  """[num_steps + 1] decreasing times from 1 to 0 for an ODE sampler, with the same shift as training."""
  return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1), shift)


def euler_step(x_t: jax.Array, velocity: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
  """One Euler step of dx/dt = v from t to t_next (t, t_next broadcast from the left)."""
  dt = (t_next - t)
  dt = dt.reshape(dt.shape + (1,) * (x_t.ndim - dt.ndim)) if jnp.ndim(dt) else dt
  return x_t + dt * velocity
