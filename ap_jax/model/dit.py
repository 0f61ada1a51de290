"""The latent denoiser: a Wan2.1-style causal DiT over video latents plus ActionParty's subject tokens.

Dimension letters: B batch, F latent frames (= T + 1: one latent frame per game frame), T actions, P subject
slots, h, w latent grid, c latent channels, Y, X token grid (h, w over patch size), N = Y X video tokens per
frame, Q = N + P tokens per frame, L = F Q sequence length, S action entries (P F), C width, K heads, D head
width, M MLP width.

Sequence. Each frame contributes its N video tokens (patchified latents) then its P subject tokens (one per
slot, embedding that subject's noisy coordinates). One joint self-attention runs over all F Q tokens.

Block (Wan2.1): adaLN-modulated self-attention with 3D RoPE and q/k RMSNorm, then cross-attention (LayerNorm
with affine, no modulation) to the action entries, then an adaLN-modulated GELU MLP. Modulation comes from each
frame's own flow time (per-frame t: diffusion forcing), so all Q tokens of frame f share frame f's modulation.

Masks (see attention.py): time-causal at frame granularity everywhere (a frame sees itself and the past, so the
same weights serve chunked autoregressive generation); subject tokens never see other subjects' tokens
(subject_isolation); subject token i reads only player i's action entries (masked_cross_attention), entries up
to its frame, or only its own frame's entry (frame_wise). Padded slots are masked out of every key set.

Coordinates. `coords` are subject positions normalised to [-1, 1] over the canvas: c = 2 pixel / size - 1
(positions_to_coords). They are noised and denoised like the latents. A subject token's rotary position is
(f, y, x) with (y, x) = its current noisy coordinates in token-grid units, (c + 1) / 2 * (Y, X) - 1/2, so a
subject centred on video token (i, j) rotates exactly like that token (fractional positions allowed).

Choices the paper leaves open (our reading):
- Video tokens do not cross-attend to actions when subject tokens exist: actions reach the frame only through
  the subject tokens' self-attention, which is what makes the binding explicit. Without masked
  cross-attention the subject tokens read every player's actions (the ablation changes only the mask).
- No learned per-slot embedding by default (`slot_embedding=False`): the data pipeline permutes slots at random,
  so a slot index says nothing about which sprite it is; identity comes from the isolation mask and the
  coordinates, and the model is exactly equivariant to slot permutations.
- `subject_rope=False` removes only the spatial (y, x) rotation of subject tokens; the temporal one stays, so the
  ablation isolates the spatial biasing.
- `subject_rope_previous=True` (ours, off by default): positions become (t, y, x, y', x'); a subject token's
  (y', x') is its previous frame's cell, a video token's its own cell again. A video token then meets, by rotary
  distance alone, the subject that leaves it as well as the one that arrives (erasing the sprite left behind is a
  local decision), and the subject token meets its own sprite in the previous frame's input.
- The "actions as text" baseline (subject_tokens=False): video tokens cross-attend to every player's action
  entries, each entry = action embedding + an embedding of that player's context-frame position (the task
  gives every subject's initial state; without it the baseline could not know which sprite an action is for).
- Action entries get temporal RoPE in cross-attention (query at frame f, entry at frame f'), so "the latest
  action" is a relative notion and sliding windows need no absolute frame index.

Code. The model is Flax NNX modules (dit_model.py: the `DiT` module, its embeddings, token sequence and heads;
dit_blocks.py: attention, the block, the stacked blocks; subjects.py: the subject state). This module is their
pure boundary: `init` returns the parameters as plain nested dicts, `apply` merges such parameters into the
config's cached graphdef (modules.py), and the loss and its inputs are plain functions over both.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.model import config as config_lib
from ap_jax.model import flow as flow_lib
from ap_jax.model import modules
from ap_jax.model.dit_model import DiT, Settings
# The subject state's helpers live in subjects.py; callers reach them here, beside the model that reads them.
from ap_jax.model.subjects import (coord_features, coords_to_positions, coords_to_token_grid, facing_vectors,
                                   positions_to_coords, state_dims, subject_state)

Params = dict[str, Any]


def start_action_id(config: ml_collections.ConfigDict) -> int:
  """Action id of the START entry that precedes frame 0."""
  return int(config.num_actions)


def null_action_id(config: ml_collections.ConfigDict) -> int:
  """Action id meaning "no action given": pass it in `actions` for the unconditional branch of guidance. The model
  learns it when trained with flow.action_dropout > 0."""
  return int(config.num_actions) + 1



# ------------------------------------------------------------------------------------------ the pure boundary

def _maker(settings: Settings):
  return lambda rngs: DiT(settings, rngs=rngs)


@functools.lru_cache(maxsize=32)
def _graphdef(settings: Settings):
  """The DiT's static structure for these settings, built abstractly once (modules.graphdef)."""
  return modules.graphdef(_maker(settings))


def init(rng: jax.Array, config: ml_collections.ConfigDict) -> Params:
  """Draws the denoiser's parameters: a plain dict pytree of float arrays (dit.param_dtype). Kernels a normal
  clipped to +-2 over sqrt(fan_in), biases zero, norm scales one, modulation tables normal / sqrt(width), embedding
  tables standard normal. Works under jax.jit and jax.eval_shape."""
  return modules.init_params(_maker(Settings.from_config(config)), rng)


def param_logical_axes(config: ml_collections.ConfigDict):
  """Same structure as `init`'s params; leaves are PartitionSpecs of logical axis names (see sharding.py), read
  from each parameter's Flax partitioning metadata."""
  return modules.param_logical_axes(_maker(Settings.from_config(config)))


# ----------------------------------------------------------------------------------------------------- apply

def _check_inputs(config, inputs, cache) -> None:
  latents = inputs["latents"]
  if latents.ndim != 5:
    raise ValueError(f"inputs['latents'] has shape {latents.shape}, expected [B, F, h, w, c]")
  b, f, h, w, c = latents.shape
  ps = config.dit.patch_size
  if c != config.vae.latent_channels:
    raise ValueError(f"inputs['latents'] has {c} channels, expected vae.latent_channels = "
                     f"{config.vae.latent_channels}")
  if h % ps or w % ps:
    raise ValueError(f"latent grid {h}x{w} is not divisible by dit.patch_size = {ps}")
  # Without a cache a window starts with a context frame that gets START, unless the context is not in the sequence.
  num_actions = f if (cache is not None or not config.dit.context_tokens) else f - 1
  expect = {"times": (b, f), "actions": (b, num_actions, config.max_players), "player_mask": (b, config.max_players)}
  if config.dit.subject_tokens:
    expect["coords"] = (b, f, config.max_players, state_dims(config))
  else:
    expect["initial_coords"] = (b, config.max_players, state_dims(config))
  if config.dit.previous_frame_input:
    expect["previous_latents"] = (b, f, h, w, c)
    if config.dit.subject_tokens:
      expect["previous_coords"] = (b, f, config.max_players, state_dims(config))
  for key, shape in expect.items():
    if key not in inputs:
      raise ValueError(f"inputs lacks {key!r}; expected an array of shape {list(shape)}")
    if tuple(inputs[key].shape) != shape:
      raise ValueError(f"inputs[{key!r}] has shape {tuple(inputs[key].shape)}, expected {list(shape)} "
                       f"(B={b}, F={f} latent frames, {num_actions} actions, P={config.max_players} slots)")
  if cache is not None:
    n = (h // ps) * (w // ps) + (config.max_players if config.dit.subject_tokens else 0)
    k = cache["k"]
    if k.ndim != 5 or k.shape[0] != config.dit.depth or k.shape[1] != b or k.shape[2] % n:
      raise ValueError(f"cache['k'] has shape {k.shape}, expected [depth={config.dit.depth}, B={b}, "
                       f"frames * {n} tokens, heads, head width]")


def apply(params: Params, config: ml_collections.ConfigDict, inputs: dict[str, jax.Array],
          cache: dict[str, jax.Array] | None = None, return_cache: bool = False) -> dict[str, jax.Array]:
  """Predicts flow velocities for noisy latents (and noisy subject coordinates). Pure and jittable.

  inputs:
    latents         [B, F, h, w, c]  noisy latents x_t (frame f at noise level times[:, f])
    times           [B, F]           flow time per frame (0 = clean, 1 = noise)
    actions         [B, F-1, P] int  action t takes frame t to t+1 (or null_action_id); padded slots ignored.
                                     With a cache: [B, F, P], the actions that produce each of these F frames.
    player_mask     [B, P] bool      real players
    coords          [B, F, P, S]     noisy subject states (subject_tokens=True): normalised coordinates (y, x),
                                     then the facing vector when dit.state_facing (S = state_dims(config))
    initial_coords  [B, P, S]        clean context-frame subject states (subject_tokens=False baseline)
    previous_latents [B, F, h, w, c] the (context version of the) frame before each frame, zeros before the
                                     window's first frame (dit.previous_frame_input=True; `previous_latents`)
    previous_coords [B, F, P, S]     likewise the previous frame's coordinates (previous_frame_input with subject
                                     tokens)
  cache: from an earlier call with return_cache=True: these F frames follow the cached ones. Because attention
    is causal per frame, apply(frames 0..k) then apply(frames k+1.., cache) gives exactly the outputs of one
    apply over all frames. Keys are cached after RoPE at absolute frame indices, so `trim_cache` (a sliding
    window) keeps relative positions intact.
  Returns {"video": [B, F, h, w, c] float32 velocity, "coords": [B, F, P, S] float32 velocity, or the predicted
  clean state with flow.coord_target = "displacement" (zero in padded
  slots; absent without subject tokens)}, plus "cache" (covering the cached and these frames) if return_cache.
  """
  _check_inputs(config, inputs, cache)
  model = modules.bind(_graphdef(Settings.from_config(config)), params)
  return model(inputs, cache, return_cache)


def trim_cache(cache: dict[str, jax.Array], keep_frames: int) -> dict[str, jax.Array]:
  """Keeps the last `keep_frames` frames of a cache (sliding window). Positions stay absolute, so the next
  chunk's RoPE distances to the kept frames are unchanged."""
  total = cache["entries"].shape[1]
  if not 0 < keep_frames <= total:
    raise ValueError(f"keep_frames = {keep_frames}, expected 1 to {total} (frames in the cache)")
  per_frame = cache["k"].shape[2] // total
  return {"k": cache["k"][:, :, -keep_frames * per_frame:], "v": cache["v"][:, :, -keep_frames * per_frame:],
          "entries": cache["entries"][:, -keep_frames:], "next_frame": cache["next_frame"]}


# ------------------------------------------------------------------------------------------------------ loss

def training_inputs(config: ml_collections.ConfigDict, batch: dict[str, jax.Array], rng: jax.Array,
                    times: jax.Array | None = None):
  """Noises a clean batch for flow-matching training.

  batch: `latents` [B, F, h, w, c] (VAE latents of the frames, already scaled), `positions` [B, F, P, 2]
  pixels, `actions` [B, F-1, P], `player_mask` [B, P]. times: [B, F] or None to sample them (flow config).
  Returns (inputs for `apply`, velocity targets {"video", "coords"}, times).
  """
  if "latents" not in batch:
    raise ValueError("batch lacks 'latents': encode batch['frames'] with vae.encode first (the trainer does)")
  latents = batch["latents"].astype(jnp.float32)
  b, f, h, w, _ = latents.shape
  rng_t, rng_v, rng_c = jax.random.split(rng, 3)
  if times is None:
    times = flow_lib.sample_frame_times(rng_t, b, f, config.flow)
  canvas = (h * config_lib.compression(config), w * config_lib.compression(config))
  if "states" in batch:  # subject states given directly (own_context_batch: a generated one for frame 0)
    coords0 = batch["states"].astype(jnp.float32)
  else:
    coords0 = subject_state(batch["positions"], batch.get("orientations"), canvas, config)
  noise_v = jax.random.normal(rng_v, latents.shape)
  noise_c = jax.random.normal(rng_c, coords0.shape)
  player_mask = batch["player_mask"].astype(bool)
  actions = batch["actions"].astype(jnp.int32)
  if config.flow.action_dropout > 0:
    # Whole clips lose their actions (all players, all steps), so the model learns p(video | context) too.
    drop = jax.random.bernoulli(jax.random.fold_in(rng, 1), config.flow.action_dropout, (b, 1, 1))
    actions = jnp.where(drop, null_action_id(config), actions)
  inputs = {
      "latents": flow_lib.add_noise(latents, noise_v, times),
      "times": times,
      "actions": actions,
      "player_mask": player_mask,
  }
  if config.dit.previous_frame_input:
    # The frame before each frame as a sampler holds it: a context version, at a context noise level of its own
    # (frame 0's is exactly the context frame's input, so the first target sees what is in the sequence).
    ctx_times = jax.random.uniform(jax.random.fold_in(rng, 2), (b, f)) * config.flow.context_noise_max
    ctx_times = ctx_times.at[:, 0].set(times[:, 0])
    inputs["previous_latents"] = previous_latents(flow_lib.add_noise(latents, noise_v, ctx_times))
  centre = flow_lib.coord_prior_centre(coords0, config.flow.num_context_frames, config.flow)
  source_c = flow_lib.coord_source(centre, noise_c, config.flow)
  if config.dit.subject_tokens:
    coord_times = flow_lib.coord_time(times, config.flow.coord_time_lead)
    inputs["coords"] = flow_lib.add_noise(coords0, source_c, coord_times) * player_mask[:, None, :, None]
    if config.dit.previous_frame_input:
      # As for the latents: frame 1 reads the context frame's input, later frames the clean previous frame.
      clean = coords0 * player_mask[:, None, :, None]
      inputs["previous_coords"] = previous_latents(jnp.concatenate([inputs["coords"][:, :1], clean[:, 1:]], axis=1))
  else:
    inputs["initial_coords"] = coords0[:, 0] * player_mask[:, :, None]
  targets = {"video": flow_lib.velocity_target(latents, noise_v),
             "coords": flow_lib.velocity_target(coords0, source_c)}
  if config.flow.get("coord_target", "velocity") == "displacement":
    if config.flow.coord_prior != "previous" or not config.dit.previous_frame_input:
      raise ValueError("flow.coord_target = 'displacement' needs flow.coord_prior = 'previous' and "
                       "dit.previous_frame_input = True (the displacement is from the previous frame's state)")
    targets["coords"] = coords0
  if not config.dit.context_tokens:
    # The context frame leaves the sequence: it is only the previous frame of the first target (channels).
    if config.flow.num_context_frames != 1:
      raise ValueError(f"dit.context_tokens = False needs flow.num_context_frames = 1, got "
                       f"{config.flow.num_context_frames}")
    per_frame = ("latents", "times", "coords", "previous_latents", "previous_coords")
    inputs = {k: (v[:, 1:] if k in per_frame else v) for k, v in inputs.items()}
    targets = {k: v[:, 1:] for k, v in targets.items()}
    times = times[:, 1:]
  return inputs, targets, times


def previous_latents(latents_BFhwc: jax.Array) -> jax.Array:
  """[B, F, ...] -> each frame's previous frame: zeros, then frames 0..F-2 (latents, or coordinates [B, F, P, 2])."""
  return jnp.concatenate([jnp.zeros_like(latents_BFhwc[:, :1]), latents_BFhwc[:, :-1]], axis=1)


def predict(params: Params, config: ml_collections.ConfigDict, batch: dict[str, jax.Array], times: jax.Array,
            rng: jax.Array) -> dict[str, jax.Array]:
  """`apply` on a dataset batch (with `latents`) noised to `times` [B, F] with noise drawn from rng.

  Returns apply's outputs plus the noisy inputs ("noisy_latents", "noisy_coords") and the velocity targets
  ("target_video", "target_coords"), so callers can form their own losses or diagnostics."""
  inputs, targets, _ = training_inputs(config, batch, rng, times)
  out = dict(apply(params, config, inputs))
  out.update(noisy_latents=inputs["latents"], target_video=targets["video"], target_coords=targets["coords"])
  if "coords" in inputs:
    out["noisy_coords"] = inputs["coords"]
  return out


def subject_region_weight(config: ml_collections.ConfigDict, positions_BFP2: jax.Array, player_mask_BP: jax.Array,
                          latent_hw: tuple[int, int]) -> jax.Array:
  """[B, F, h, w] loss weight of each latent cell: 1 + flow.subject_loss_weight where a real player is in frame f
  or was in frame f - 1 (the cells where a move draws or erases a sprite), else 1.

  "Is in" means the latent cell's centre lies within 0.75 token widths of the player's pixel centre (Chebyshev),
  which on the built-in game's token-sized cells covers exactly the player's cell. Sprites are a few percent of a
  frame: unweighted, the velocity loss is dominated by the background. Off by default: on the tiny model it cost
  PSNR and did not help the players (README "Training the denoiser: what was measured")."""
  h, w = latent_hw
  comp = config_lib.compression(config)
  reach = 0.75 * config_lib.pixels_per_token(config)
  centre_y = (jnp.arange(h, dtype=jnp.float32) + 0.5) * comp
  centre_x = (jnp.arange(w, dtype=jnp.float32) + 0.5) * comp
  pos = positions_BFP2.astype(jnp.float32)
  near_y = jnp.abs(centre_y[None, None, None, :] - pos[..., 0:1]) < reach  # [B, F, P, h]
  near_x = jnp.abs(centre_x[None, None, None, :] - pos[..., 1:2]) < reach  # [B, F, P, w]
  occupied = near_y[..., :, None] & near_x[..., None, :] & player_mask_BP.astype(bool)[:, None, :, None, None]
  occupied = jnp.any(occupied, axis=2)  # [B, F, h, w]
  previous = jnp.concatenate([occupied[:, :1], occupied[:, :-1]], axis=1)
  return 1.0 + config.flow.subject_loss_weight * (occupied | previous).astype(jnp.float32)


def own_context_batch(params: Params, config: ml_collections.ConfigDict, batch: dict[str, jax.Array],
                      rng: jax.Array) -> dict[str, jax.Array]:
  """flow.own_context_prob: a batch of 2-step clips (latents [B, 3, ...]) -> a batch of 1-step clips (frames 1, 2)
  whose context frame is, for a random fraction of the clips, the model's own one-pass estimate of frame 1 from
  frame 0 (latents and subject state; no gradient flows through it), and otherwise the true frame 1. The
  returned batch carries `states` (the subject states of its two frames), which `training_inputs` uses as is."""
  flow = config.flow
  if batch["latents"].shape[1] != 3:
    raise ValueError(f"flow.own_context_prob needs clips of 2 steps (data.clip_steps = 2, latents [B, 3, ...]), "
                     f"got latents of shape {batch['latents'].shape}")
  if (not config.dit.previous_frame_input or config.dit.context_tokens
      or flow.get("coord_target", "velocity") != "displacement" or not config.dit.subject_tokens):
    raise ValueError("flow.own_context_prob needs dit.previous_frame_input = True, dit.context_tokens = False, "
                     "dit.subject_tokens = True and flow.coord_target = 'displacement'")
  latents = batch["latents"].astype(jnp.float32)
  b, _, h, w, _ = latents.shape
  canvas = (h * config_lib.compression(config), w * config_lib.compression(config))
  states = subject_state(batch["positions"], batch.get("orientations"), canvas, config)
  first = dict(latents=latents[:, :2], positions=batch["positions"][:, :2], actions=batch["actions"][:, :1],
               player_mask=batch["player_mask"], states=states[:, :2])
  rng_t, rng_n, rng_pick = jax.random.split(rng, 3)
  t = jax.random.uniform(rng_t, (b,)) * float(flow.own_context_max_time)
  times = jnp.stack([jnp.zeros((b,)), t], axis=1)  # a clean frame 0, frame 1 noised to t
  inputs, _, _ = training_inputs(config, first, rng_n, times)
  out = apply(jax.lax.stop_gradient(params), config, inputs)
  # x_t = (1 - t) x0 + t noise and v = noise - x0, so x0 = x_t - t v; the state head predicts the clean state.
  est_latents = jax.lax.stop_gradient(inputs["latents"][:, 0] - t[:, None, None, None] * out["video"][:, 0])
  est_states = jax.lax.stop_gradient(out["coords"][:, 0])
  pick = jax.random.bernoulli(rng_pick, float(flow.own_context_prob), (b,))
  frame1 = jnp.where(pick[:, None, None, None], est_latents, latents[:, 1])
  state1 = jnp.where(pick[:, None, None], est_states, states[:, 1])
  second = dict(latents=jnp.stack([frame1, latents[:, 2]], axis=1), positions=batch["positions"][:, 1:],
                actions=batch["actions"][:, 1:], player_mask=batch["player_mask"],
                states=jnp.stack([state1, states[:, 2]], axis=1))
  if "orientations" in batch:
    second["orientations"] = batch["orientations"][:, 1:]
  return second


def loss_fn(params: Params, config: ml_collections.ConfigDict, batch: dict[str, jax.Array], rng: jax.Array):
  """Flow-matching loss of the denoiser on one batch: (loss, metrics).

  Video velocity MSE over the target frames (frames >= num_context_frames) plus coord_loss_weight times the
  coordinate velocity MSE over real players of the target frames (with dit.state_facing, metrics also split it
  into position_loss and facing_loss, their mean). With flow.own_context_prob, the batch's 2-step
  clips first become 1-step clips whose context is partly the model's own estimate (own_context_batch).
  """
  if config.flow.get("own_context_prob", 0.0) > 0:
    rng, rng_own = jax.random.split(rng)
    batch = own_context_batch(params, config, batch, rng_own)
  inputs, targets, times = training_inputs(config, batch, rng)
  out = apply(params, config, inputs)
  b, f = times.shape
  first_target = config.flow.num_context_frames if config.dit.context_tokens else 0
  frame_weight = (jnp.arange(f) >= first_target).astype(jnp.float32)
  frame_weight = jnp.broadcast_to(frame_weight, (b, f))
  video_weight = frame_weight
  if config.flow.subject_loss_weight > 0:
    region = subject_region_weight(config, batch["positions"], batch["player_mask"], batch["latents"].shape[2:4])
    video_weight = frame_weight[:, :, None, None] * region[:, region.shape[1] - f:]
  video_loss = flow_lib.flow_loss(out["video"], targets["video"], video_weight)
  metrics = {"video_loss": video_loss}
  loss = video_loss
  if config.dit.subject_tokens:
    # Frames whose coordinates are already clean (coord_time 0, possible with a lead) carry no coordinate target.
    noisy = (flow_lib.coord_time(times, config.flow.coord_time_lead) > 0).astype(jnp.float32)
    w = (frame_weight * noisy)[:, :, None] * inputs["player_mask"][:, None, :].astype(jnp.float32)
    scale = 1.0
    if config.flow.get("coord_target", "velocity") == "displacement":  # MSE in units of the prior's spread
      scale = 1.0 / float(config.flow.coord_noise_std)
    pred_coords, target_coords = out["coords"] * scale, targets["coords"] * scale
    coord_loss = flow_lib.flow_loss(pred_coords, target_coords, w)
    metrics["coord_loss"] = coord_loss
    if pred_coords.shape[-1] > 2:  # with the facing in the state: its share and the position's, for the logs
      metrics["position_loss"] = flow_lib.flow_loss(pred_coords[..., :2], target_coords[..., :2], w)
      metrics["facing_loss"] = flow_lib.flow_loss(pred_coords[..., 2:], target_coords[..., 2:], w)
    loss = loss + config.flow.coord_loss_weight * coord_loss
  metrics["loss"] = loss
  return loss, metrics
