"""Autoregressive rollouts of a trained ActionParty model: an initial frame, each player's initial position and
per-player actions in; generated frames and each player's predicted position out. The sampler knows only the model:
what to roll out, how to score it and how to show it are `ap_jax.eval` (cases, run, render, report). This module
validates the settings, lays rollouts out (player slots, batch shards, noise keys) and runs the chunk loop below;
the traced computations of one chunk (noise, ODE steps, guidance, the model's passes) are `ap_jax.denoise`.

Dimension letters: B rollouts, N actions (steps) per rollout, P players given (<= S slots = model.max_players),
F frames of one chunk, H, W pixels, h, w latents, c latent channels, K denoising steps.

How a rollout runs (our reading of the paper's Self-Forcing-style inference; choices marked):
1. The initial frame is encoded by the VAE (posterior mean); the players' pixel positions become normalised
   coordinates. One causal pass over this context frame (`dit.apply(..., return_cache=True)`) fills the KV cache.
2. Each chunk of `chunk` frames starts from Gaussian noise in its latents AND its subject
   coordinates, which are denoised jointly by an Euler or Heun ODE sampler over `denoise_steps` steps of the
   rectified-flow schedule (`flow.sampling_times`, with the model's training shift); the coordinates move in
   their own time `flow.coord_time(t, flow.coord_time_lead)`, so with a lead they are clean before the video.
   Every denoiser call reads the cached past frames; the chunk's actions (the ones that produce its frames) go in
   as the chunk's entries.
3. The clean chunk is passed once more with `return_cache=True` to append it to the cache, as context: at flow
   time `context_noise` (default 0, i.e. clean; training draws context times from U[0, flow.context_noise_max],
   so any level in that range is in distribution, and a small one re-noises the chunk with seeded noise against
   drift). Its predicted coordinates, clipped to the canvas, are the state the next chunk starts from.
4. Sliding window: the model was trained on clips of `clip_steps + 1` frames, so no denoiser call attends over
   more than `window` frames (default that clip length): before each chunk the cache is trimmed
   (`dit.trim_cache`) to its last `window - chunk` frames. Cached keys keep their absolute RoPE positions, so only
   relative distances matter and a rollout continues past the window without a seam (our choice: trimming the
   cache rather than re-encoding the window, which would cost a pass over the window per chunk).

Note on the chunk: training (by default) denoises all `clip_steps` target frames at one shared noise level
after one clean context frame, so `chunk = clip_steps` with `window = clip_steps + 1` matches training exactly at
every chunk; `Sampler.from_trained` picks that. Chunk 1 (the finest control) conditions frame k on clean frames
1..k-1, which a shared-time model never saw beyond its first target frame; measured on the tiny model (2,600
steps), chunk 4 scored 18.3 dB PSNR against chunk 1's 16.0 dB. Models trained with independent frame times
(diffusion forcing) default to chunk 1.

Guidance on actions (optional, `guidance != 1`): classifier-free guidance, v = v_null + g (v_cond - v_null), where
the unconditional branch replaces every action, cached ones included, by `dit.null_action_id`. The two branches
run as one batch of 2B with two caches. Only meaningful for a model trained with `flow.action_dropout > 0`.

Determinism: the noise of rollout b's chunk k is drawn from fold_in(fold_in(key(seed), rollout_ids[b]), k), so a
rollout depends on neither the batch it runs in nor its total length (a longer rollout repeats a shorter one's
frames exactly until the window first slides).

Frame 0 of the returned frames is the given initial frame itself (not its VAE reconstruction), as the metrics
expect: index 0 is the conditioning frame, 1..N are generated.

Sharding: with a mesh, rollouts are laid out over the mesh axes `batch` maps to (data, fsdp) and the denoiser
traces under `sharding.logical_sharding`, so its activations are constrained as in training; parameters keep the
shardings they were loaded with (`restore.load_trained(workdir, mesh, rules)` lays them out by `sharding.tree_shardings`).
The batch is padded to a multiple of the batch shards with copies of rollout 0, whose results are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ap_jax import actions as A
from ap_jax import denoise as denoise_lib
from ap_jax.data import frames as frames_lib
from ap_jax.model import config as model_config_lib
from ap_jax.model import dit as dit_lib
from ap_jax.model import sharding as sharding_lib
from ap_jax.train import mesh as mesh_lib

log = logging.getLogger("ap_jax.sample")

SAMPLERS = ("euler", "heun")


class SampleError(ValueError):
  """Bad sampling settings or inputs; the message names the value and what was expected."""


@dataclasses.dataclass
class Rollouts:
  """What `Sampler.rollout` returns.

  frames     uint8 [B, N+1, H, W, 3]   frame 0 = the given initial frame; 1..N generated
  positions  float32 [B, N+1, P, 2]    predicted pixel centres (y, x); row 0 = the given initial positions.
                                       None for a model without subject tokens (the global baseline)
  timing     dict                       seconds: total, first_chunk (includes compilation), steady-state frames/s
  """

  frames: np.ndarray
  positions: np.ndarray | None
  timing: dict[str, Any]


class Sampler:
  """Generates rollouts with one trained denoiser and its autoencoder. Build once, call `rollout` many times:
  the jitted chunk functions are cached per cache length (at most `window` of them)."""

  def __init__(self, params, model_config: ml_collections.ConfigDict, vae_params, *, sampler: str = "euler",
               denoise_steps: int = 20, chunk: int = 1, window: int = 5, guidance: float = 1.0,
               context_noise: float = 0.0, use_cache: bool = True, reencode: bool = True, snap_px: float = 0.0,
               mesh=None, rules=None):
    if sampler not in SAMPLERS:
      raise SampleError(f"sampler = {sampler!r}, expected one of {SAMPLERS}")
    if denoise_steps < 1:
      raise SampleError(f"denoise_steps = {denoise_steps}, expected at least 1")
    if chunk < 1:
      raise SampleError(f"chunk = {chunk}, expected at least 1 frame")
    if window < chunk + 1:
      raise SampleError(f"window = {window} frames, expected at least chunk + 1 = {chunk + 1} (the chunk and one "
                        "context frame)")
    if not 0.0 <= context_noise < 1.0:
      raise SampleError(f"context_noise = {context_noise}, expected a flow time in [0, 1) (training uses "
                        f"[0, {model_config.flow.context_noise_max}])")
    if snap_px < 0:
      raise SampleError(f"snap_px = {snap_px}, expected 0 (off) or the grid cell size in pixels")
    self.previous_frame_input = bool(model_config.dit.get("previous_frame_input", False))
    self.context_tokens = bool(model_config.dit.get("context_tokens", True))
    self.state_dims = dit_lib.state_dims(model_config)
    if self.previous_frame_input and chunk != 1:
      raise SampleError(f"chunk = {chunk}, but the model reads the previous frame's latents "
                        "(dit.previous_frame_input), which exist only for chunk = 1")
    if self.previous_frame_input and use_cache and not reencode:
      raise SampleError("reencode = False with dit.previous_frame_input: a cached window must be re-encoded so its "
                        "first frame sees no previous frame, as in training")
    if guidance != 1.0 and float(model_config.flow.get("action_dropout", 0.0)) <= 0.0:
      log.warning("guidance = %s, but the model was trained with flow.action_dropout = 0: the null action it "
                  "guides against was never trained, so guidance is not meaningful", guidance)
    self.params, self.vae_params, self.config = params, vae_params, model_config
    self.sampler, self.denoise_steps, self.chunk, self.window = sampler, int(denoise_steps), int(chunk), int(window)
    self.guidance, self.context_noise, self.use_cache = float(guidance), float(context_noise), bool(use_cache)
    self.reencode, self.snap_px = bool(reencode), float(snap_px)
    self.mesh, self.rules = mesh, (rules if rules is not None else sharding_lib.DEFAULT_RULES)
    self.subject_tokens = bool(model_config.dit.subject_tokens)
    self.slots = int(model_config.max_players)
    self.denoiser = denoise_lib.ChunkDenoiser(model_config, sampler=self.sampler, denoise_steps=self.denoise_steps,
                                              guidance=self.guidance, context_noise=self.context_noise,
                                              snap_px=self.snap_px)
    self._jitted: dict[Any, Any] = {}

  @classmethod
  def from_trained(cls, trained, **kwargs) -> "Sampler":
    """A sampler for `restore.load_trained(...)`'s TrainedModel. Defaults follow its training layout: the window
    is the training clip (clip_steps + 1 frames); snap_px and context_noise are the config's `sampling` ones; the
    chunk is clip_steps frames when the model was trained with one shared time over its target frames (then every chunk sees what training showed: one clean context frame
    and clip_steps frames at one noise level), and 1 frame when it was trained with independent frame times
    (diffusion forcing covers clean-past / noisy-present at any position)."""
    clip = int(trained.config.data.clip_steps)
    kwargs.setdefault("window", clip + 1)
    defaults = trained.config.get("sampling", {})
    for key in ("snap_px", "context_noise"):
      if kwargs.get(key) is None:
        kwargs[key] = float(defaults.get(key, 0.0))
    if kwargs.get("chunk") is None:
      flow = trained.model_config.flow
      one = flow.independent_frame_times or trained.model_config.dit.get("previous_frame_input", False)
      kwargs["chunk"] = 1 if one else clip + 1 - int(flow.num_context_frames)
    return cls(trained.params, trained.model_config, trained.vae_params, **kwargs)

  # ------------------------------------------------------------------------------------------ jit + sharding

  def _jit(self, name: str, fn, static_argnums=()):
    # One jitted function per piece; jax caches one executable per input shape (cache length) under it.
    if name not in self._jitted:
      self._jitted[name] = jax.jit(fn, static_argnums=static_argnums)
    return self._jitted[name]

  def _call(self, name, fn, *args, static_argnums=()):
    jitted = self._jit(name, fn, static_argnums)
    if self.mesh is None:
      return jitted(*args)
    with sharding_lib.logical_sharding(self.mesh, self.rules):  # active while a new shape traces
      return jitted(*args)

  def _batch_shards(self) -> int:
    return 1 if self.mesh is None else mesh_lib.batch_shards(self.mesh, self.rules)

  def _put(self, x):
    """Places a batch-leading host array on the mesh (batch over the `batch` axes), or leaves it to jit."""
    x = jnp.asarray(x)
    if self.mesh is None:
      return x
    return jax.device_put(x, mesh_lib.batch_sharding(self.mesh, self.rules))

  # ------------------------------------------------------------------------------------------------ rollout

  def check_inputs(self, initial_frames, initial_positions, actions, player_mask=None):
    """Validates shapes and values; returns them as numpy (frames float in [-1, 1])."""
    try:
      frames = frames_lib.to_model_range(initial_frames)
    except ValueError as e:
      raise SampleError(f"initial {e}") from None
    positions = np.asarray(initial_positions, np.float32)
    actions = np.asarray(actions)
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise SampleError(f"initial frames have shape {frames.shape}, expected [B, H, W, 3]")
    b, h, w, _ = frames.shape
    per_token = model_config_lib.pixels_per_token(self.config)
    if h % per_token or w % per_token:
      raise SampleError(f"frames are {h} x {w} px, expected multiples of {per_token} (VAE stride x patch size)")
    if actions.ndim != 3 or actions.shape[0] != b:
      raise SampleError(f"actions have shape {actions.shape}, expected [B={b}, N steps, P players]")
    _, n, p = actions.shape
    if n < 1:
      raise SampleError("actions hold 0 steps, expected at least 1")
    if not 1 <= p <= self.slots:
      raise SampleError(f"actions give {p} players, but the model has {self.slots} subject slots (expected 1 to "
                        f"{self.slots})")
    actions = A.check_actions(actions)
    if positions.shape != (b, p, 2):
      raise SampleError(f"initial positions have shape {positions.shape}, expected [B={b}, P={p}, 2] pixel (y, x)")
    if player_mask is None:
      player_mask = np.ones((b, p), bool)
    player_mask = np.asarray(player_mask, bool)
    if player_mask.shape != (b, p):
      raise SampleError(f"player_mask has shape {player_mask.shape}, expected [B={b}, P={p}]")
    return frames, positions, actions, player_mask

  def rollout(self, initial_frames, initial_positions, actions, *, player_mask=None, seed: int = 0,
              rollout_ids=None, initial_orientations=None) -> Rollouts:
    """Generates B rollouts of N steps.

    initial_frames [B, H, W, 3] uint8 (or float in [-1, 1]); initial_positions [B, P, 2] pixel centres (y, x);
    initial_orientations int [B, P] (0 N, 1 E, 2 S, 3 W): each player's initial facing, needed by a model whose
    subject state carries it (dit.state_facing) and ignored otherwise;
    actions int [B, N, P] (P <= model slots; padded to the slots with NOOP, as in training); player_mask bool
    [B, P] (default all True: every given player is real); rollout_ids int [B] name each rollout's noise stream
    (default 0..B-1).
    """
    start_time = time.perf_counter()
    frames, positions, actions, player_mask = self.check_inputs(initial_frames, initial_positions, actions,
                                                                player_mask)
    b, n, p = actions.shape
    ids = np.arange(b) if rollout_ids is None else np.asarray(rollout_ids, np.int64)
    if ids.shape != (b,):
      raise SampleError(f"rollout_ids has shape {ids.shape}, expected [B={b}]")
    # Pad the batch to a multiple of the batch shards (copies of rollout 0, dropped at the end).
    shards = self._batch_shards()
    bp = -(-b // shards) * shards
    take = np.concatenate([np.arange(b), np.zeros(bp - b, np.int64)]).astype(np.int64)
    if self.state_dims > 2:
      if initial_orientations is None:
        raise SampleError("the model's subject state carries each player's facing (dit.state_facing): pass "
                          f"initial_orientations [B={b}, P={p}] (0 N, 1 E, 2 S, 3 W)")
      orientations = np.asarray(initial_orientations)
      if orientations.shape != (b, p) or not np.isin(orientations, np.arange(A.NUM_ORIENTATIONS)).all():
        raise SampleError(f"initial_orientations has shape {orientations.shape} and values "
                          f"{sorted(set(np.unique(orientations).tolist()))[:8]}, expected [B={b}, P={p}] in 0..3")
    else:
      orientations = np.zeros((b, p), np.int32)
    frames, positions, actions, player_mask, ids, orientations = (
        x[take] for x in (frames, positions, actions, player_mask, ids, orientations))
    # Player slots: padded with NOOP actions, zero positions and a False mask.
    pad = self.slots - p
    actions_S = np.pad(actions, [(0, 0), (0, 0), (0, pad)], constant_values=A.NOOP)
    mask_S = np.pad(player_mask, [(0, 0), (0, pad)])
    positions_S = np.pad(positions, [(0, 0), (0, pad), (0, 0)])
    canvas = frames.shape[1:3]
    orientations_S = np.pad(orientations, [(0, 0), (0, pad)])
    coords0 = np.asarray(dit_lib.subject_state(positions_S, orientations_S, canvas, self.config)) * mask_S[..., None]

    base = jax.random.key(int(seed))
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids % (1 << 31), jnp.int32))
    put, den = self._put, self.denoiser
    mask_d, init_d = put(mask_S), put(coords0)
    params, vae_params = self.params, self.vae_params

    # Context frame. `hist` holds the context versions of the last `window` frames (latents, coords, times) and the
    # actions between them (entry k produces frame k + 1 of the history).
    lat_ctx, coords_ctx, times_ctx = self._call("context", den.encode_context, vae_params, put(frames[:, None]),
                                                put(coords0[:, None]), keys)
    hist = dict(latents=lat_ctx, coords=coords_ctx, times=times_ctx, actions=jnp.zeros((bp, 0, self.slots), jnp.int32))
    latent_hwc = tuple(lat_ctx.shape[2:])
    cache = None
    if self.use_cache and not self.reencode and self.context_tokens:
      cache = self._call("window", den.window_cache, params, lat_ctx, coords_ctx, times_ctx, hist["actions"],
                         mask_d, init_d)

    out_frames, out_coords = [], []
    chunk_times, compiled_shapes, steady = [], set(), []
    max_frames_in_view = 1
    done = 0
    chunk_index = 0
    while done < n:
      f = min(self.chunk, n - done)
      chunk_actions = put(actions_S[:, done:done + f])
      chunk_keys = jax.vmap(lambda k: jax.random.fold_in(k, chunk_index + 1))(keys)
      t0 = time.perf_counter()
      keep = self.window - f
      total = hist["latents"].shape[1]
      start = max(0, total - keep)
      cached = total - start
      shape_key = (cached, f)
      last_latents, last_coords = hist["latents"][:, -1:], hist["coords"][:, -1:]
      if not self.context_tokens:
        cached, shape_key = 0, (0, f)
        # No cache: the window holds only the frame to generate, which reads the last one as previous_frame_input.
        gen, coords, _, lat_c, coords_c, times_c = self._call(
            "chunk_channels", den.chunk_cached, params, vae_params, None, chunk_actions, mask_d, init_d, chunk_keys,
            last_latents, last_coords, latent_hwc, False, static_argnums=(9, 10))
      elif self.use_cache and self.reencode:
        # Re-encode the kept context frames as a fresh clip start (first frame with START, attending only to the
        # window), exactly the layout of training; trimming an appended cache instead keeps keys computed while
        # those frames saw older frames, and the action into the first kept frame.
        cache = self._call("window", den.window_cache, params, hist["latents"][:, start:], hist["coords"][:, start:],
                           hist["times"][:, start:], hist["actions"][:, start:], mask_d, init_d)
        gen, coords, _, lat_c, coords_c, times_c = self._call(
            "chunk_cached", den.chunk_cached, params, vae_params, cache, chunk_actions, mask_d, init_d, chunk_keys,
            last_latents, last_coords, latent_hwc, False, static_argnums=(9, 10))
      elif self.use_cache:
        if cache["entries"].shape[1] > keep:
          cache = dit_lib.trim_cache(cache, keep)
        cached = cache["entries"].shape[1]
        shape_key = (cached, f)
        gen, coords, cache, lat_c, coords_c, times_c = self._call(
            "chunk_append", den.chunk_cached, params, vae_params, cache, chunk_actions, mask_d, init_d, chunk_keys,
            last_latents, last_coords, latent_hwc, True, static_argnums=(9, 10))
      else:
        gen, coords, lat_c, coords_c, times_c = self._call(
            "chunk_full", den.chunk_full, params, vae_params, hist["latents"][:, start:], hist["coords"][:, start:],
            hist["times"][:, start:], hist["actions"][:, start:], chunk_actions, mask_d, init_d, chunk_keys)
      # The action entry of history frame k is the action into it; the history's first frame has none. Only the
      # last `window` frames are kept, so memory stays flat over long rollouts.
      hist = dict(latents=jnp.concatenate([hist["latents"], lat_c], 1)[:, -self.window:],
                  coords=jnp.concatenate([hist["coords"], coords_c], 1)[:, -self.window:],
                  times=jnp.concatenate([hist["times"], times_c], 1)[:, -self.window:],
                  actions=jnp.concatenate([hist["actions"], chunk_actions], 1)[:, -(self.window - 1):])
      max_frames_in_view = max(max_frames_in_view, cached + f)
      gen, coords = jax.device_get((gen, coords))
      elapsed = time.perf_counter() - t0
      chunk_times.append(elapsed)
      if shape_key in compiled_shapes:
        steady.append((elapsed, f))
      compiled_shapes.add(shape_key)
      out_frames.append(np.asarray(gen))
      out_coords.append(np.asarray(coords))
      done += f
      chunk_index += 1

    gen_frames = frames_lib.to_uint8(np.concatenate(out_frames, axis=1))[:b]
    all_frames = np.concatenate([frames_lib.to_uint8(frames[:b, None]), gen_frames], axis=1)
    pred_positions = None
    if self.subject_tokens:
      states = np.concatenate(out_coords, axis=1)[..., :2]  # the position part of the subject state
      pred = np.asarray(dit_lib.coords_to_positions(states, canvas))[:b, :, :p]
      pred_positions = np.concatenate([positions[:b, None], pred], axis=1).astype(np.float32)
    total_s = time.perf_counter() - start_time
    steady_s = sum(s for s, _ in steady)
    timing = dict(
        seconds_total=total_s, seconds_first_chunk=chunk_times[0], chunks=len(chunk_times),
        frames_generated=int(b * n), rollouts=int(b), max_frames_in_view=int(max_frames_in_view),
        # Frames per second over the chunks whose shapes were already compiled (compilation excluded).
        steady_frames_per_s=(sum(f for _, f in steady) * b / steady_s) if steady_s > 0 else None,
        denoiser_calls_per_chunk=self.denoise_steps * (2 if self.sampler == "heun" else 1)
        - (1 if self.sampler == "heun" else 0) + (1 if self.use_cache else 0))
    return Rollouts(frames=all_frames, positions=pred_positions, timing=timing)


def sample(trained, initial_frame, initial_positions, actions, *, seed: int = 0, initial_orientations=None,
           **sampler_kwargs):
  """One rollout from a TrainedModel. initial_frame [H, W, 3] uint8; initial_positions [P, 2] pixels (y, x);
  actions int [N, P]. Returns (frames uint8 [N+1, H, W, 3] with frame 0 the given initial frame, predicted
  positions float32 [N+1, P, 2] or None for the global baseline, timing dict)."""
  sampler = Sampler.from_trained(trained, **sampler_kwargs)
  out = sampler.rollout(np.asarray(initial_frame)[None], np.asarray(initial_positions)[None],
                        np.asarray(actions)[None], seed=seed,
                        initial_orientations=None if initial_orientations is None else
                        np.asarray(initial_orientations)[None])
  return out.frames[0], (None if out.positions is None else out.positions[0]), out.timing
