"""The model half a run trains (`config.stage`): its init, logical axes, loss and batch keys, and its analytic cost.

  build_stage(config, frozen=..., meta=...) -> Stage
  analytic_step_flops(config, stage), tokens_per_example(config, stage)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.data import locate
from ap_jax.model import config as model_config_lib
from ap_jax.model import dit as dit_lib
from ap_jax.model import flops as flops_lib
from ap_jax.model import vae as vae_lib
from ap_jax.train import config_utils
from ap_jax.train.errors import TrainError

STAGES = ("autoencoder", "denoiser")


@dataclasses.dataclass
class Stage:
  """One trainable half of the model. `loss(params, batch, rng, frozen)` -> (loss, metrics)."""

  name: str
  model_config: ml_collections.ConfigDict
  init: Callable[[jax.Array], Any]
  logical_axes: Any
  loss: Callable[..., tuple[jax.Array, dict]]
  batch_keys: tuple[str, ...]
  frozen: Any = None  # parameters of earlier stages (the autoencoder, for the denoiser), not trained
  frozen_axes: Any = None
  meta: dict = dataclasses.field(default_factory=dict)


def build_stage(config: ml_collections.ConfigDict, *, frozen: Any = None, meta: dict | None = None) -> Stage:
  """The stage `config.stage` names. The denoiser needs the trained autoencoder's parameters (`frozen`) and its
  latent statistics (`meta['latent_shift']`, `meta['latent_scale']`)."""
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  if config.stage == "autoencoder":
    crop = int(config.get("autoencoder_crop", 0))
    on_subjects = float(config.get("autoencoder_crop_on_subjects", 0.0))
    if not 0.0 <= on_subjects <= 1.0:
      raise config_utils.ConfigError(f"autoencoder_crop_on_subjects = {on_subjects}, expected a fraction in [0, 1]")
    if on_subjects and not crop:
      raise config_utils.ConfigError(f"autoencoder_crop_on_subjects = {on_subjects} needs autoencoder_crop > 0")
    foreground = model_config.vae.get("foreground", "colour")
    if foreground not in ("colour", "subjects"):
      raise config_utils.ConfigError(f"model.vae.foreground = {foreground!r}, expected 'colour' or 'subjects'")
    needs_positions = foreground == "subjects" or on_subjects > 0

    def ae_loss(params, batch, rng, frozen):
      del frozen
      frames, weights = batch["frames"], None
      if foreground == "subjects":
        weights = vae_lib.subject_weights(batch["positions"], batch["player_mask"], frames.shape[2:4],
                                          float(model_config.vae.subject_radius_px),
                                          float(model_config.vae.foreground_weight))
      if crop:
        rng, crop_rng = jax.random.split(rng)
        subjects = (batch["positions"], batch["player_mask"], on_subjects) if on_subjects else None
        if weights is None:
          frames = random_crops(frames, crop, crop_rng, subjects)
        else:  # the same crop of the frames and their weights
          both = random_crops(jnp.concatenate([frames, weights], axis=-1), crop, crop_rng, subjects)
          frames, weights = both[..., :-1], both[..., -1:]
      return vae_lib.vae_loss(params, model_config, frames, rng, weights)

    return Stage(
        name="autoencoder", model_config=model_config,
        init=lambda rng: vae_lib.vae_init(rng, model_config),
        logical_axes=vae_lib.vae_logical_axes(model_config), loss=ae_loss,
        batch_keys=("frames",) + (("positions", "player_mask") if needs_positions else ()))
  if config.stage == "denoiser":
    if frozen is None or meta is None:
      raise TrainError("the denoiser stage needs a trained autoencoder: set --config.autoencoder_workdir")
    model_config.vae.latent_shift = float(meta["latent_shift"])
    model_config.vae.latent_scale = float(meta["latent_scale"])

    def loss(params, batch, rng, frozen_params):
      if "latents" in batch:  # precomputed by the frozen autoencoder (data.cache_latents)
        latents = batch["latents"]
      else:
        latents = jax.lax.stop_gradient(vae_lib.vae_encode(frozen_params, model_config, batch["frames"]))
      dit_batch = dict(latents=latents, positions=batch["positions"], actions=batch["actions"],
                       player_mask=batch["player_mask"])
      if "orientations" in batch:
        dit_batch["orientations"] = batch["orientations"]
      return dit_lib.loss_fn(params, model_config, dit_batch, rng)

    return Stage(
        name="denoiser", model_config=model_config,
        init=lambda rng: dit_lib.init(rng, model_config),
        logical_axes=dit_lib.param_logical_axes(model_config), loss=loss,
        batch_keys=("latents" if config.data.get("cache_latents", False) else "frames", "actions", "positions",
                    "player_mask") + (("orientations",) if model_config.dit.get("state_facing", False) else ()),
        frozen=frozen, frozen_axes=vae_lib.vae_logical_axes(model_config), meta=dict(meta))
  raise config_utils.ConfigError(f"stage = {config.stage!r}, expected one of {STAGES}")


def random_crops(frames_BTHWC: jax.Array, size: int, rng: jax.Array,
                 subjects: tuple[jax.Array, jax.Array, float] | None = None) -> jax.Array:
  """One random size x size crop per frame, [B, T, H, W, C] -> [B T, 1, size, size, C]. The autoencoder is
  convolutional, so crops teach it the same thing as whole frames at a fraction of the cost.

  `subjects` = (positions [B, T, P, 2] in pixels (y, x), player_mask [B, P], fraction): that fraction of the crops
  contains a real player, drawn at random, anywhere in the crop's middle half (clipped to the frame); frames of
  clips without players keep uniform crops. Players are a few percent of a large canvas, so uniform crops mostly
  show the floor; but on Melting Pot's kitchens half the crops on players did not sharpen the sprites (SP 0.386
  against 0.418; docs/research_log.md entry 25), so configs leave it off.
  """
  b, t, h, w, c = frames_BTHWC.shape
  if size > min(h, w):
    raise config_utils.ConfigError(f"autoencoder_crop = {size} is larger than the {h}x{w} frames")
  flat = frames_BTHWC.reshape(b * t, h, w, c)
  ky, kx, kp, kj, kf = jax.random.split(rng, 5)
  ys = jax.random.randint(ky, (b * t,), 0, h - size + 1)
  xs = jax.random.randint(kx, (b * t,), 0, w - size + 1)
  if subjects is not None:
    positions, player_mask, fraction = subjects
    real = jnp.broadcast_to(player_mask.astype(bool)[:, None, :], positions.shape[:3]).reshape(b * t, -1)
    # A random real player per frame: the argmax of Gumbel-perturbed logits that are -inf on padding slots.
    logits = jnp.where(real, 0.0, -jnp.inf) + jax.random.gumbel(kp, real.shape)
    who = jnp.argmax(logits, axis=-1)
    centre = jnp.take_along_axis(positions.reshape(b * t, -1, 2).astype(jnp.float32), who[:, None, None], axis=1)[:, 0]
    jitter = jax.random.uniform(kj, (b * t, 2), minval=-size / 4, maxval=size / 4)
    corner = jnp.round(centre + jitter - size / 2).astype(jnp.int32)
    use = (jax.random.uniform(kf, (b * t,)) < fraction) & jnp.any(real, axis=-1)
    ys = jnp.where(use, jnp.clip(corner[:, 0], 0, h - size), ys)
    xs = jnp.where(use, jnp.clip(corner[:, 1], 0, w - size), xs)
  crop = lambda f, y, x: jax.lax.dynamic_slice(f, (y, x, 0), (size, size, c))
  return jax.vmap(crop)(flat, ys, xs)[:, None]


def analytic_step_flops(config, stage: Stage) -> float:
  """FLOPs of one training step of the whole global batch (ap_jax.model.flops; 2 per multiply-add)."""
  b, frames = int(config.data.global_batch_size), int(config.data.clip_steps) + 1
  hw = locate.frame_hw(config)
  # Without context tokens the denoiser's sequence holds only the clip's target frames (all are encoded, though).
  dit_frames = frames - (0 if stage.model_config.dit.get("context_tokens", True) else 1)
  if stage.name == "autoencoder":
    crop = int(config.get("autoencoder_crop", 0))
    return flops_lib.vae_train_step_flops(stage.model_config, b * frames, (crop, crop) if crop else hw)
  encode = 0.0 if "latents" in stage.batch_keys else flops_lib.vae_forward_flops(stage.model_config, b * frames, hw,
                                                                                  decoder=False)
  latent_hw = flops_lib.latent_hw(stage.model_config, hw)
  if stage.model_config.flow.get("own_context_prob", 0.0) > 0:
    # A 2-step clip trains one transition after one forward pass that estimates its context frame.
    return (encode + flops_lib.denoiser_train_step_flops(stage.model_config, b, 1, latent_hw)
            + flops_lib.denoiser_forward_flops(stage.model_config, b, 1, latent_hw)["total"])
  return encode + flops_lib.denoiser_train_step_flops(stage.model_config, b, dit_frames, latent_hw)


def tokens_per_example(config, stage: Stage) -> int:
  """Tokens one training example puts through the model (pixels for the autoencoder)."""
  data = config.data
  h, w = locate.frame_hw(config)
  frames = int(data.clip_steps) + 1
  if stage.name == "autoencoder":
    crop = int(config.get("autoencoder_crop", 0))
    return frames * (crop * crop if crop else h * w)  # pixels
  per_side = model_config_lib.pixels_per_token(stage.model_config)
  if h % per_side or w % per_side:
    raise config_utils.ConfigError(f"frames are {h} x {w} px, not a multiple of {per_side} px a token (the "
                                   f"autoencoder's compression x dit.patch_size): the token count would be floored")
  subjects = int(config.model.max_players) if stage.model_config.dit.subject_tokens else 0
  frames -= 0 if stage.model_config.dit.get("context_tokens", True) else 1
  if stage.model_config.flow.get("own_context_prob", 0.0) > 0:
    frames = 1  # the trained sequence is the clip's last transition
  return frames * ((h // per_side) * (w // per_side) + subjects)
