"""The denoiser as one Flax NNX module: its settings, its embeddings, the token sequence with its RoPE positions
and masks, the stack of blocks and the heads. The pure functions over plain parameter pytrees that callers use
(`dit.init`, `dit.apply`, ...) are in dit.py; the design and dimension letters are in its docstring.

Parameter tree (attribute names; checkpoints written before the move to Flax restore unchanged):
  patch_embed, previous_embed (previous_frame_input)      {kernel [ps ps c, C], bias [C]}
  time_embed {fc1, fc2}, time_proj                        sinusoid -> MLP -> e; e -> 6 modulations per block
  action_embed [actions + 2, C]                           the actions, START, NULL
  blocks                                                  one Block, every leaf with a leading layers axis
  head {modulation [2, C], out}
  coord_embed, previous_coord_embed, coord_head, slot_embed   (subject tokens)
  player_coord_embed                                      (the actions-as-text baseline)
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.model import attention as attn_lib
from ap_jax.model import dit_blocks
from ap_jax.model import layers
from ap_jax.model import rope as rope_lib
from ap_jax.model import subjects
from ap_jax.model.dit_blocks import dense
from ap_jax.model.sharding import constrain

VIDEO_TARGETS = ("velocity", "residual")
# The smallest flow time residual_velocity divides by: below it the velocity is the clean-frame error times 20.
RESIDUAL_MIN_TIME = 0.05


def residual_velocity(head_BFhwc: jax.Array, previous_BFhwc: jax.Array, noisy_BFhwc: jax.Array,
                      times_BF: jax.Array) -> jax.Array:
  """flow.video_target = "residual": the head's output is the clean frame's change from the previous frame, so
  x0 = previous + head, and the flow velocity is (x_t - x0) / t (x_t = (1 - t) x0 + t eps gives v = eps - x0 exactly
  when x0 is right). t is floored at RESIDUAL_MIN_TIME, as x-prediction models floor it (float32)."""
  f32 = jnp.float32
  x0 = previous_BFhwc.astype(f32) + head_BFhwc.astype(f32)
  t = jnp.maximum(times_BF.astype(f32), RESIDUAL_MIN_TIME)[:, :, None, None, None]
  return (noisy_BFhwc.astype(f32) - x0) / t


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the module reads from the model config, hashable: one graphdef is built (and cached) per Settings."""
  width: int
  heads: int
  depth: int
  mlp: int
  patch_size: int
  latent_channels: int
  freq_dim: int
  rope_theta: float
  coord_freqs: int
  eps: float
  num_actions: int
  max_players: int
  state_dims: int
  subject_tokens: bool
  subject_isolation: bool
  masked_cross_attention: bool
  frame_wise: bool
  subject_rope: bool
  subject_rope_previous: bool
  slot_embedding: bool
  previous_frame_input: bool
  context_tokens: bool
  attention_impl: str
  scan_layers: bool
  remat_policy: str
  ln_grad_barrier: bool
  dtype: str
  param_dtype: str
  coord_displacement: bool  # flow.coord_target = "displacement": the coordinate head predicts the clean state
  coord_noise_std: float
  video_residual: bool  # flow.video_target = "residual": the video head predicts the clean frame's change

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Settings":
    d = config.dit
    if d.width % d.heads:
      raise ValueError(f"dit.width = {d.width} is not divisible by dit.heads = {d.heads}")
    rope_previous = bool(d.get("subject_rope_previous", False))
    if rope_previous and not (d.subject_tokens and d.previous_frame_input):
      raise ValueError("dit.subject_rope_previous = True needs dit.subject_tokens = True and dit.previous_frame_input "
                       "= True (it rotates each subject token by its previous frame's cell)")
    rope_lib.rope_split(d.width // d.heads, 5 if rope_previous else 3)  # validates the head width
    if not d.context_tokens and not d.previous_frame_input:
      raise ValueError("dit.context_tokens = False needs dit.previous_frame_input = True: without context tokens the "
                       "previous frame reaches the model only as input channels")
    layers.remat_policy(d.remat_policy)  # validates the name
    video_target = config.flow.get("video_target", "velocity")
    if video_target not in VIDEO_TARGETS:
      raise ValueError(f"flow.video_target = {video_target!r}, expected one of {VIDEO_TARGETS}")
    if video_target == "residual" and not d.previous_frame_input:
      raise ValueError("flow.video_target = 'residual' needs dit.previous_frame_input = True (the head predicts the "
                       "change from the previous frame's latents)")
    layers.compute_dtype(d.dtype)
    return cls(
        width=int(d.width), heads=int(d.heads), depth=int(d.depth), mlp=int(d.mlp), patch_size=int(d.patch_size),
        latent_channels=int(config.vae.latent_channels), freq_dim=int(d.freq_dim), rope_theta=float(d.rope_theta),
        coord_freqs=int(d.coord_freqs), eps=float(d.eps), num_actions=int(config.num_actions),
        max_players=int(config.max_players), state_dims=subjects.state_dims(config),
        subject_tokens=bool(d.subject_tokens), subject_isolation=bool(d.subject_isolation),
        masked_cross_attention=bool(d.masked_cross_attention), frame_wise=bool(d.frame_wise),
        subject_rope=bool(d.subject_rope), subject_rope_previous=rope_previous, slot_embedding=bool(d.slot_embedding),
        previous_frame_input=bool(d.previous_frame_input), context_tokens=bool(d.context_tokens),
        attention_impl=str(d.attention_impl), scan_layers=bool(d.scan_layers), remat_policy=str(d.remat_policy),
        ln_grad_barrier=bool(d.get("ln_grad_barrier", False)), dtype=str(d.dtype), param_dtype=str(d.param_dtype),
        coord_displacement=config.flow.get("coord_target", "velocity") == "displacement",
        coord_noise_std=float(config.flow.coord_noise_std), video_residual=video_target == "residual")

  @property
  def start_action_id(self) -> int:
    return self.num_actions

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.latent_channels


class DiT(nnx.Module):
  """The Wan2.1-style causal DiT with ActionParty's subject tokens (dit.py's docstring: sequence, masks, choices)."""

  def __init__(self, s: Settings, *, rngs: nnx.Rngs):
    self.settings = s
    dtype, pdtype, f32 = layers.compute_dtype(s.dtype), jnp.dtype(s.param_dtype), jnp.float32
    width = s.width
    linear = lambda d_in, d_out, names, compute: dense(d_in, d_out, names, compute, pdtype, rngs)
    mlp2 = lambda d_in, compute: dit_blocks.MLP(linear(d_in, width, (None, "embed"), compute),
                                                linear(width, width, ("embed", None), compute), "silu")
    self.patch_embed = linear(s.patch_dim, width, ("patch", "embed"), dtype)
    if s.previous_frame_input:
      self.previous_embed = linear(s.patch_dim, width, ("patch", "embed"), dtype)
    self.time_embed = mlp2(s.freq_dim, f32)
    self.time_proj = linear(width, 6 * width, ("embed", "mlp"), f32)
    # Rows: the actions, then START (frame 0 has no action before it), then NULL (action dropped, for
    # classifier-free guidance on actions).
    self.action_embed = dit_blocks.param(nnx.initializers.normal(1.0), (s.num_actions + 2, width), ("vocab", "embed"),
                                         pdtype, rngs)
    self.blocks = dit_blocks.make_blocks(s.depth, lambda r: dit_blocks.Block(
        width, s.heads, s.mlp, dtype=dtype, param_dtype=pdtype, eps=s.eps, impl=s.attention_impl,
        ln_grad_barrier=s.ln_grad_barrier, cross_on_subjects=s.subject_tokens, rngs=r), rngs)
    self.head = dit_blocks.Head(width, s.patch_dim, eps=s.eps, ln_grad_barrier=s.ln_grad_barrier, param_dtype=pdtype,
                                rngs=rngs)
    coord_in = s.state_dims + 2 * s.state_dims * s.coord_freqs
    if s.subject_tokens:
      self.coord_embed = mlp2(coord_in, dtype)
      if s.previous_frame_input:
        self.previous_coord_embed = mlp2(coord_in, dtype)
      self.coord_head = linear(width, s.state_dims, ("embed", None), f32)
      if s.slot_embedding:
        self.slot_embed = dit_blocks.param(nnx.initializers.normal(1.0), (s.max_players, width),
                                           ("subjects", "embed"), pdtype, rngs)
    else:
      self.player_coord_embed = mlp2(coord_in, dtype)

  def __call__(self, inputs: dict[str, jax.Array], cache: dict[str, jax.Array] | None = None,
               return_cache: bool = False) -> dict[str, jax.Array]:
    """dit.apply on checked inputs (its docstring says what they are and what comes back)."""
    s = self.settings
    dtype = layers.compute_dtype(s.dtype)
    latents = inputs["latents"]
    b, f, h, w, c = latents.shape
    ps, width = s.patch_size, s.width
    head_dim = width // s.heads
    gy, gx = h // ps, w // ps
    n = gy * gx
    num_slots = s.max_players if s.subject_tokens else 0
    q_per_frame = n + num_slots
    player_mask = inputs["player_mask"].astype(bool)
    cached_frames = 0 if cache is None else cache["k"].shape[2] // q_per_frame
    # Absolute index of this call's first frame: RoPE positions (only differences matter to attention).
    first = jnp.zeros((), jnp.float32) if cache is None else cache["next_frame"].astype(jnp.float32)
    frame_pos = first + jnp.arange(f, dtype=jnp.float32)  # [F]

    # Video tokens: patchify [B, F, h, w, c] -> [B, F, N, ps ps c] -> [B, F, N, C].
    with jax.named_scope("embed"):
      video = self.patch_embed(dit_blocks.patchify(latents, ps))
      if s.previous_frame_input:
        video = video + self.previous_embed(dit_blocks.patchify(inputs["previous_latents"], ps))
    yx = jnp.asarray(dit_blocks.token_grid(gy, gx), jnp.float32)
    # subject_rope_previous: positions (t, y, x, y', x'); a video token's (y', x') is its own cell.
    spatial = (yx, yx) if s.subject_rope_previous else (yx,)
    num_pos = 1 + 2 * len(spatial)
    video_pos = jnp.concatenate([jnp.broadcast_to(frame_pos[:, None, None], (f, n, 1))]
                                + [jnp.broadcast_to(g, (f, n, 2)) for g in spatial], -1)
    video_pos = jnp.broadcast_to(video_pos, (b, f, n, num_pos))

    # Time: sinusoid -> MLP -> e [B, F, C]; block modulation e0 [B, F, 6, C] (Wan2.1).
    e = self.time_embed(layers.sinusoidal_embedding(inputs["times"].astype(jnp.float32) * 1000.0, s.freq_dim))
    e0 = self.time_proj(jax.nn.silu(e)).reshape(b, f, 6, width)

    # Action entries [B, F, P]: entry f is the action that produced frame f (START for the clip's first frame),
    # after the cached frames' entries; embedded and flattened slot-major to [B, P (F0 + F), C].
    if cache is None and s.context_tokens:
      start = jnp.full((b, 1, s.max_players), s.start_action_id, jnp.int32)
      entries_BFP = jnp.concatenate([start, inputs["actions"].astype(jnp.int32)], axis=1)
    else:
      entries_BFP = inputs["actions"].astype(jnp.int32)
    all_entries = entries_BFP if cache is None else jnp.concatenate([cache["entries"], entries_BFP], axis=1)
    action_tok = jnp.take(self.action_embed[...], all_entries.transpose(0, 2, 1), axis=0).astype(dtype)  # [B,P,F,C]

    features = lambda state: subjects.coord_features(state.astype(jnp.float32), s.coord_freqs)
    if s.subject_tokens:
      coords = inputs["coords"].astype(jnp.float32)
      subj = self.coord_embed(features(coords))  # [B, F, P, C]
      if s.previous_frame_input:
        subj = subj + self.previous_coord_embed(features(inputs["previous_coords"]))
      if s.slot_embedding:
        subj = subj + self.slot_embed[...].astype(dtype)
      x = jnp.concatenate([video, subj], axis=2)
      subj_yx = subjects.coords_to_token_grid(coords[..., :2], (gy, gx))  # the position part of the state
      if s.subject_rope_previous:  # ... and where the subject was: the cell it leaves, if it moves
        previous_yx = subjects.coords_to_token_grid(inputs["previous_coords"][..., :2], (gy, gx))
        subj_yx = jnp.concatenate([subj_yx, previous_yx], -1)
      if not s.subject_rope:
        subj_yx = jnp.zeros_like(subj_yx)  # no spatial rotation: angles 0 for y and x
      subj_t = jnp.broadcast_to(frame_pos[None, :, None, None], (b, f, num_slots, 1))
      pos = jnp.concatenate([video_pos, jnp.concatenate([subj_t, subj_yx], -1)], axis=2)
    else:
      player = self.player_coord_embed(features(inputs["initial_coords"]))
      action_tok = action_tok + player[:, :, None, :]
      x = video
      pos = video_pos
    # The residual stream stays float32 (as under torch autocast in Wan2.1); only matmul inputs are cast to dtype.
    x = constrain(x.astype(jnp.float32), ("batch", "frames", "length", "embed"))

    # Masks: static layout part + padding segment ids (attention.py). Frames are numbered from the first cached
    # frame, so this call's queries sit at frames cached_frames.. and keys span cached + these frames.
    total = cached_frames + f
    query_self = attn_lib.self_attention_layout(f, n, num_slots, first_frame=cached_frames)
    key_self = attn_lib.self_attention_layout(total, n, num_slots)
    self_mask = attn_lib.Mask(attn_lib.static_mask(query_self, key_self, subject_isolation=s.subject_isolation),
                              attn_lib.segment_ids(query_self, player_mask),
                              attn_lib.segment_ids(key_self, player_mask))
    key_layout = attn_lib.action_layout(total, s.max_players)
    if s.subject_tokens:
      query_layout = attn_lib.subject_query_layout(f, num_slots, first_frame=cached_frames)
    else:
      query_layout = attn_lib.video_query_layout(f, n, first_frame=cached_frames)
    same_subject = s.subject_tokens and s.masked_cross_attention
    cross_mask = attn_lib.Mask(
        attn_lib.static_mask(query_layout, key_layout, frame_wise=s.frame_wise, same_subject=same_subject),
        attn_lib.segment_ids(query_layout, player_mask), attn_lib.segment_ids(key_layout, player_mask))
    # Temporal-only RoPE in cross-attention: (frame, 0, 0) rotates only the t pairs.
    time_pos = lambda frames: jnp.broadcast_to(
        jnp.stack([first - cached_frames + jnp.asarray(frames, jnp.float32)] + [jnp.zeros(len(frames))] * (num_pos - 1),
                  -1), (b, len(frames), num_pos))
    angles = lambda positions: rope_lib.rope_angles(positions, head_dim, s.rope_theta)
    block_inputs = dit_blocks.BlockInputs(
        video_tokens=n, modulation_BF6C=e0, self_angles=angles(pos.reshape(b, f * q_per_frame, num_pos)),
        self_mask=self_mask, actions_BSC=action_tok.reshape(b, -1, width),
        cross_angles_q=angles(time_pos(query_layout.frame)), cross_angles_k=angles(time_pos(key_layout.frame)),
        cross_mask=cross_mask)

    cached = None if cache is None else (cache["k"], cache["v"])
    x, new_kv = dit_blocks.run_blocks(self.blocks, x, block_inputs, cached, scan_layers=s.scan_layers,
                                      remat_policy=s.remat_policy, return_kv=return_cache)

    with jax.named_scope("head"):
      y = self.head.modulate(x, e)
      video_out = dit_blocks.unpatchify(self.head.out(y[:, :, :n]), ps, (h, w))
      if s.video_residual:
        video_out = residual_velocity(video_out, inputs["previous_latents"], latents, inputs["times"])
      out = {"video": video_out}
      if s.subject_tokens:
        coord_v = self.coord_head(y[:, :, n:])
        if s.coord_displacement:
          # The clean state, as a displacement from the previous frame's state in units of the prior's spread.
          coord_v = inputs["previous_coords"].astype(jnp.float32) + s.coord_noise_std * coord_v
        out["coords"] = coord_v * player_mask[:, None, :, None]
    if return_cache:
      k_new, v_new = new_kv
      if cache is not None:
        k_new = jnp.concatenate([cache["k"].astype(k_new.dtype), k_new], axis=2)
        v_new = jnp.concatenate([cache["v"].astype(v_new.dtype), v_new], axis=2)
      out["cache"] = {"k": k_new, "v": v_new, "entries": all_entries,
                      "next_frame": (first + f).astype(jnp.int32)}
    return out
