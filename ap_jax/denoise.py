"""One chunk of a rollout as traced computations: its noise, the ODE from flow time 1 to 0 (Euler or Heun) over the
video latents and subject coordinates jointly, classifier-free guidance on actions, the causal model's passes over
the KV cache, and the context versions of generated frames. `sample.Sampler` jits these and runs the rollout loop
(module docstring there: how a rollout runs); this module holds no state between calls.

Dimension letters: B rollouts, F frames of one chunk, S subject slots, h, w latents, c latent channels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.model import config as model_config_lib
from ap_jax.model import dit as dit_lib
from ap_jax.model import flow as flow_lib
from ap_jax.model import vae as vae_lib


class ChunkDenoiser:
  """The per-chunk computations of one model under fixed sampler settings (validated by `sample.Sampler`)."""

  def __init__(self, model_config: ml_collections.ConfigDict, *, sampler: str, denoise_steps: int, guidance: float,
               context_noise: float, snap_px: float):
    self.config = model_config
    self.sampler, self.denoise_steps, self.guidance = sampler, int(denoise_steps), float(guidance)
    self.context_noise, self.snap_px = float(context_noise), float(snap_px)
    self.previous_frame_input = bool(model_config.dit.get("previous_frame_input", False))
    self.subject_tokens = bool(model_config.dit.subject_tokens)
    self.slots = int(model_config.max_players)
    self.state_dims = dit_lib.state_dims(model_config)
    self.times = flow_lib.sampling_times(self.denoise_steps, float(model_config.flow.shift))

  @property
  def _guided(self) -> bool:
    return self.guidance != 1.0

  def _branches(self, actions_BFP: jax.Array) -> jax.Array:
    """[B, F, P] -> [2B, F, P] (conditional, then all-null) when guiding; unchanged otherwise."""
    if not self._guided:
      return actions_BFP
    return jnp.concatenate([actions_BFP, jnp.full_like(actions_BFP, dit_lib.null_action_id(self.config))])

  def _twice(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, x]) if self._guided else x

  def _combine(self, v: jax.Array) -> jax.Array:
    if not self._guided:
      return v
    cond, null = jnp.split(v, 2)
    return null + self.guidance * (cond - null)

  def _noise(self, keys_B, shape_latents, shape_coords):
    """Per-rollout noise for one chunk: (video [B, F, h, w, c], coords [B, F, S, 2], context video, context
    coords), each drawn from that rollout's own key."""

    def one(key):
      kv, kc, kcv, kcc = jax.random.split(key, 4)
      return (jax.random.normal(kv, shape_latents), jax.random.normal(kc, shape_coords),
              jax.random.normal(kcv, shape_latents), jax.random.normal(kcc, shape_coords))

    return jax.vmap(one)(keys_B)

  def _integrate(self, velocity, x, y):
    """Runs the ODE from t = 1 to 0 on (latents x, coords y). velocity(x, y, t) -> (v_x, v_y), where v_y is the
    coordinates' velocity, or their predicted clean state with flow.coord_target = "displacement"."""
    ts = self.times
    k = self.denoise_steps

    # Coordinates move in their own time g(t) (flow.coord_time; g(t) = t unless they lead the video).
    g = lambda t: flow_lib.coord_time(t, self.config.flow.coord_time_lead)
    predicts_clean = self.config.flow.get("coord_target", "velocity") == "displacement"

    def coord_step(y, vy, t, t_next):
      if not predicts_clean:
        return y + (g(t_next) - g(t)) * vy
      # DDIM-style: keep the same noise, at the smaller coordinate time: y' = y0 + (g' / g) (y - y0). Coordinates
      # already clean (g = 0, below the lead) stay as they are.
      g_t, g_next = g(t), g(t_next)
      ratio = g_next / jnp.maximum(g_t, 1e-12)
      return jnp.where(g_t > 0, vy + ratio * (y - vy), y)

    def euler(i, xy):
      x, y = xy
      vx, vy = velocity(x, y, ts[i])
      return x + (ts[i + 1] - ts[i]) * vx, coord_step(y, vy, ts[i], ts[i + 1])

    def heun(i, xy):
      x, y = xy
      t, t_next = ts[i], ts[i + 1]
      dt = t_next - t
      vx, vy = velocity(x, y, t)
      xe, ye = x + dt * vx, coord_step(y, vy, t, t_next)
      vx2, vy2 = velocity(xe, ye, t_next)
      # Both coordinate rules take the average of the two evaluations (velocities, or clean-state predictions).
      return x + dt * 0.5 * (vx + vx2), coord_step(y, 0.5 * (vy + vy2), t, t_next)

    if self.sampler == "euler":
      return jax.lax.fori_loop(0, k, euler, (x, y))
    # Heun's correction needs the velocity at t_next; at t_next = 0 (the last step) that is the clean sample's,
    # which the model never sees in training for target frames, so the last step is plain Euler (as EDM).
    x, y = jax.lax.fori_loop(0, k - 1, heun, (x, y))
    return euler(k - 1, (x, y))

  def _model_inputs(self, latents, times, actions, player_mask, coords, initial_coords, previous=None):
    """previous: (latents, coords) of each frame's previous frame (dit.previous_frame_input), else None."""
    inputs = {"latents": latents, "times": times, "actions": actions, "player_mask": player_mask}
    if self.previous_frame_input:
      inputs["previous_latents"] = previous[0]
      if self.subject_tokens:
        inputs["previous_coords"] = previous[1] * player_mask[:, None, :, None]
    if self.subject_tokens:
      inputs["coords"] = coords * player_mask[:, None, :, None]
    else:
      inputs["initial_coords"] = initial_coords * player_mask[:, :, None]
    return inputs

  def _twice_opt(self, x):
    return None if x is None else jax.tree.map(self._twice, x)

  def _coord_source(self, centre_B1S2, noise_BFS2, player_mask):
    """The chunk's starting coordinates: a draw from the source distribution (flow.coord_prior) around the last
    context frame's coordinates."""
    centre = jnp.broadcast_to(centre_B1S2, noise_BFS2.shape)
    return flow_lib.coord_source(centre, noise_BFS2, self.config.flow) * player_mask[:, None, :, None]

  def _snap(self, coords, latent_hw):
    """Snaps normalised coordinates to the centres of `snap_px` grid cells (off when snap_px = 0)."""
    if not self.snap_px:
      return coords
    comp = model_config_lib.compression(self.config)
    canvas = (latent_hw[0] * comp, latent_hw[1] * comp)
    px = dit_lib.coords_to_positions(coords[..., :2], canvas)
    snapped = (jnp.floor(px / self.snap_px) + 0.5) * self.snap_px
    return jnp.concatenate([dit_lib.positions_to_coords(snapped, canvas), coords[..., 2:]], axis=-1)

  def encode_context(self, vae_params, frames_B1HWC, coords_B1S2, keys_B):
    """The context frame (frame 0) -> its context latents, coords and times (clean unless context_noise > 0)."""
    latents = vae_lib.vae_encode(vae_params, self.config, frames_B1HWC)
    _, _, noise_v, noise_c = self._noise(jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_B),
                                         latents.shape[1:], coords_B1S2.shape[1:])
    return self._context(latents, coords_B1S2, noise_v, noise_c)

  def window_cache(self, params, lat_ctx, coords_ctx, times, actions_between, player_mask, initial_coords):
    """A fresh cache from one causal pass over context frames [B, F0, ...], the first of which gets START, exactly as
    a training clip starts (actions_between [B, F0 - 1, S] produce frames 1..F0-1)."""
    previous = None
    if self.previous_frame_input:
      previous = (dit_lib.previous_latents(lat_ctx), dit_lib.previous_latents(coords_ctx))
    inputs = self._model_inputs(self._twice(lat_ctx), self._twice(times), self._branches(actions_between),
                                self._twice(player_mask), self._twice(coords_ctx), self._twice(initial_coords),
                                self._twice_opt(previous))
    return dit_lib.apply(params, self.config, inputs, return_cache=True)["cache"]

  def _finish(self, x0, y0, ctx_v, ctx_c, player_mask):
    """A denoised chunk's states (clipped to the canvas, snapped, padded slots zero) and its context versions:
    (states, context latents, context states, context times)."""
    y0 = self._snap(jnp.clip(y0, -1.0, 1.0), x0.shape[2:4]) * player_mask[:, None, :, None]
    return (y0,) + self._context(x0, y0, ctx_v, ctx_c)

  def _context(self, latents, coords, noise_v, noise_c):
    """Clean (or lightly noised) versions of generated frames, as the cache and later frames see them."""
    b, f = latents.shape[:2]
    times = jnp.full((b, f), self.context_noise, jnp.float32)
    if self.context_noise > 0:
      latents = flow_lib.add_noise(latents, noise_v, times)
      source = flow_lib.coord_source(coords, noise_c, self.config.flow)  # centred on themselves ("previous")
      coords = flow_lib.add_noise(coords, source, flow_lib.coord_time(times, self.config.flow.coord_time_lead))
    return latents, coords, times

  def chunk_cached(self, params, vae_params, cache, actions_BFP, player_mask, initial_coords, keys_B, last_latents,
                    last_coords, latent_hwc, append):
    """Denoises one chunk against the cache (None: a model without context tokens, whose window is the chunk alone)
    and decodes it; with `append`, also passes the chunk once more to append it to the cache.
    last_latents [B, 1, h, w, c], last_coords [B, 1, S, 2]: the context frame before the chunk
    (what previous_frame_input reads for a chunk of 1, and the centre of the coordinates' source distribution).
    Returns (frames [B, F, H, W, 3] in [-1, 1], coords [B, F, S, 2], new cache or None, the chunk's context latents,
    coords and times)."""
    cfg = self.config
    b, f = actions_BFP.shape[:2]
    noise_v, noise_c, ctx_v, ctx_c = self._noise(keys_B, (f,) + latent_hwc, (f, self.slots, self.state_dims))
    mask2, init2 = self._twice(player_mask), self._twice(initial_coords)
    actions2 = self._branches(actions_BFP)
    prev2 = self._twice_opt((last_latents, last_coords)) if self.previous_frame_input else None

    def velocity(x, y, t):
      times = jnp.full((b, f), t, jnp.float32)
      out = dit_lib.apply(params, cfg, self._model_inputs(self._twice(x), self._twice(times), actions2, mask2,
                                                          self._twice(y), init2, prev2), cache=cache)
      vy = out["coords"] if self.subject_tokens else jnp.zeros_like(y)
      return self._combine(out["video"]), self._combine(vy)

    x0, y0 = self._integrate(velocity, noise_v, self._coord_source(last_coords, noise_c, player_mask))
    y0, lat_ctx, coords_ctx, times = self._finish(x0, y0, ctx_v, ctx_c, player_mask)
    new_cache = None
    if append:
      out = dit_lib.apply(params, cfg, self._model_inputs(self._twice(lat_ctx), self._twice(times), actions2, mask2,
                                                          self._twice(coords_ctx), init2, prev2),
                          cache=cache, return_cache=True)
      new_cache = out["cache"]
    frames = vae_lib.vae_decode(vae_params, cfg, x0)
    return frames, y0, new_cache, lat_ctx, coords_ctx, times

  def chunk_full(self, params, vae_params, hist_latents, hist_coords, hist_times, hist_actions, actions_BFP,
                  player_mask, initial_coords, keys_B):
    """The reference path without a cache: every denoiser call re-runs the causal model over the history frames
    (their context versions, first one with START) and the noisy chunk. Returns (frames, coords, context latents,
    context coords, context times) of the chunk."""
    cfg = self.config
    b, f = actions_BFP.shape[:2]
    latent_hwc = hist_latents.shape[2:]
    noise_v, noise_c, ctx_v, ctx_c = self._noise(keys_B, (f,) + latent_hwc, (f, self.slots, self.state_dims))
    all_actions = self._branches(jnp.concatenate([hist_actions, actions_BFP], axis=1))
    mask2, init2 = self._twice(player_mask), self._twice(initial_coords)

    def velocity(x, y, t):
      times = jnp.concatenate([hist_times, jnp.full((b, f), t, jnp.float32)], axis=1)
      latents, coords = jnp.concatenate([hist_latents, x], 1), jnp.concatenate([hist_coords, y], 1)
      previous = None
      if self.previous_frame_input:
        previous = (dit_lib.previous_latents(latents), dit_lib.previous_latents(coords))
      inputs = self._model_inputs(self._twice(latents), self._twice(times), all_actions, mask2, self._twice(coords),
                                  init2, self._twice_opt(previous))
      out = dit_lib.apply(params, cfg, inputs)
      vy = out["coords"][:, -f:] if self.subject_tokens else jnp.zeros_like(y)
      return self._combine(out["video"][:, -f:]), self._combine(vy)

    x0, y0 = self._integrate(velocity, noise_v, self._coord_source(hist_coords[:, -1:], noise_c, player_mask))
    y0, lat_ctx, coords_ctx, times = self._finish(x0, y0, ctx_v, ctx_c, player_mask)
    return vae_lib.vae_decode(vae_params, cfg, x0), y0, lat_ctx, coords_ctx, times
