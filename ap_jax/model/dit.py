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
- The "actions as text" baseline (subject_tokens=False): video tokens cross-attend to every player's action
  entries, each entry = action embedding + an embedding of that player's context-frame position (the task
  gives every subject's initial state; without it the baseline could not know which sprite an action is for).
- Action entries get temporal RoPE in cross-attention (query at frame f, entry at frame f'), so "the latest
  action" is a relative notion and sliding windows need no absolute frame index.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ap_jax import actions as actions_lib
from ap_jax.model import attention as attn_lib
from ap_jax.model import config as config_lib
from ap_jax.model import flow as flow_lib
from ap_jax.model import layers
from ap_jax.model import rope as rope_lib
from ap_jax.model.layers import ParamSpec
from ap_jax.model.sharding import constrain

Params = dict[str, Any]


def start_action_id(config: ml_collections.ConfigDict) -> int:
  """Action id of the START entry that precedes frame 0."""
  return int(config.num_actions)


def null_action_id(config: ml_collections.ConfigDict) -> int:
  """Action id meaning "no action given": pass it in `actions` for the unconditional branch of guidance. The model
  learns it when trained with flow.action_dropout > 0."""
  return int(config.num_actions) + 1


# ---------------------------------------------------------------------------------------------------- params

def _attention_specs(width: int, heads: int) -> dict:
  head_dim = width // heads
  proj = lambda: {
      "kernel": ParamSpec((width, heads, head_dim), ("embed", "heads", "kv"), "normal", fan_in=width),
      "bias": ParamSpec((heads, head_dim), ("heads", "kv"), "zeros"),
  }
  return {
      "query": proj(), "key": proj(), "value": proj(),
      "out": {
          "kernel": ParamSpec((heads, head_dim, width), ("heads", "kv", "embed"), "normal", fan_in=width),
          "bias": ParamSpec((width,), ("embed",), "zeros"),
      },
      # Wan2.1 normalises q and k with one RMSNorm over all heads jointly.
      "norm_q": ParamSpec((heads, head_dim), ("heads", "kv"), "ones"),
      "norm_k": ParamSpec((heads, head_dim), ("heads", "kv"), "ones"),
  }


def _mlp2_specs(d_in: int, width: int) -> dict:
  return {"fc1": layers.dense_spec(d_in, width, None, "embed"), "fc2": layers.dense_spec(width, width, "embed", None)}


def param_specs(config: ml_collections.ConfigDict) -> dict:
  """The DiT's ParamSpec tree (shapes, logical axes, initialisers)."""
  d = config.dit
  width, heads = d.width, d.heads
  if width % heads:
    raise ValueError(f"dit.width = {width} is not divisible by dit.heads = {heads}")
  rope_lib.rope_split(width // heads)  # validates the head width
  if not d.context_tokens and not d.previous_frame_input:
    raise ValueError("dit.context_tokens = False needs dit.previous_frame_input = True: without context tokens the "
                     "previous frame reaches the model only as input channels")
  patch_dim = d.patch_size ** 2 * config.vae.latent_channels
  block = {
      "modulation": ParamSpec((6, width), (None, "embed"), "embedding", scale=1.0 / math.sqrt(width)),
      "self_attn": _attention_specs(width, heads),
      "norm_cross": {"scale": ParamSpec((width,), ("embed",), "ones"),
                     "bias": ParamSpec((width,), ("embed",), "zeros")},
      "cross_attn": _attention_specs(width, heads),
      "mlp": {"fc1": layers.dense_spec(width, d.mlp, "embed", "mlp"),
              "fc2": layers.dense_spec(d.mlp, width, "mlp", "embed")},
  }
  specs = {
      "patch_embed": layers.dense_spec(patch_dim, width, "patch", "embed"),
      **({"previous_embed": layers.dense_spec(patch_dim, width, "patch", "embed")} if d.previous_frame_input else {}),
      "time_embed": {"fc1": layers.dense_spec(d.freq_dim, width, None, "embed"),
                     "fc2": layers.dense_spec(width, width, "embed", None)},
      "time_proj": layers.dense_spec(width, 6 * width, "embed", "mlp"),
      # Rows: the actions, then START (frame 0 has no action before it), then NULL (action dropped, for
      # classifier-free guidance on actions).
      "action_embed": ParamSpec((config.num_actions + 2, width), ("vocab", "embed"), "embedding", scale=1.0),
      "blocks": layers.stack_specs(block, d.depth),
      "head": {
          "modulation": ParamSpec((2, width), (None, "embed"), "embedding", scale=1.0 / math.sqrt(width)),
          "out": layers.dense_spec(width, patch_dim, "embed", "patch"),
      },
  }
  dims = state_dims(config)
  coord_in = dims + 2 * dims * d.coord_freqs
  if d.subject_tokens:
    specs["coord_embed"] = _mlp2_specs(coord_in, width)
    if d.previous_frame_input:
      specs["previous_coord_embed"] = _mlp2_specs(coord_in, width)
    specs["coord_head"] = layers.dense_spec(width, dims, "embed", None)
    if d.slot_embedding:
      specs["slot_embed"] = ParamSpec((config.max_players, width), ("subjects", "embed"), "embedding", scale=1.0)
  else:
    specs["player_coord_embed"] = _mlp2_specs(coord_in, width)
  return specs


def state_dims(config: ml_collections.ConfigDict) -> int:
  """Entries of a subject's state: its normalised (y, x), plus its facing (dy, dx) with dit.state_facing."""
  return 4 if config.dit.get("state_facing", False) else 2


def facing_vectors(orientations: jax.Array) -> jax.Array:
  """int orientations (0 N, 1 E, 2 S, 3 W) [...] -> unit facing vectors (dy, dx) [..., 2] float32."""
  table = jnp.asarray(actions_lib.ORIENTATION_DELTAS, jnp.float32)
  return jnp.take(table, jnp.clip(orientations.astype(jnp.int32), 0, 3), axis=0)


def subject_state(positions_px: jax.Array, orientations, canvas_hw, config: ml_collections.ConfigDict) -> jax.Array:
  """Pixel centres [..., 2] (and orientations [...]) -> the subject state [..., state_dims]: normalised
  coordinates, then the facing vector with dit.state_facing."""
  coords = positions_to_coords(positions_px, canvas_hw)
  if not config.dit.get("state_facing", False):
    return coords
  if orientations is None:
    raise ValueError("dit.state_facing needs each player's orientation (batch['orientations'] [B, F, P])")
  return jnp.concatenate([coords, facing_vectors(orientations)], axis=-1)


def init(rng: jax.Array, config: ml_collections.ConfigDict) -> Params:
  """Draws the denoiser's parameters: a plain dict pytree of float arrays (dit.param_dtype)."""
  return layers.init_from_specs(rng, param_specs(config), jnp.dtype(config.dit.param_dtype))


def param_logical_axes(config: ml_collections.ConfigDict):
  """Same structure as `init`'s params; leaves are PartitionSpecs of logical axis names (see sharding.py)."""
  return layers.axes_from_specs(param_specs(config))


# ----------------------------------------------------------------------------------------------- coordinates

def positions_to_coords(positions_px: jax.Array, canvas_hw: tuple[int, int]) -> jax.Array:
  """Pixel centres (y, x) -> coordinates normalised to [-1, 1] over the canvas: 2 p / size - 1."""
  size = jnp.asarray(canvas_hw, jnp.float32)
  return 2.0 * positions_px.astype(jnp.float32) / size - 1.0


def coords_to_positions(coords: jax.Array, canvas_hw: tuple[int, int]) -> jax.Array:
  """Inverse of positions_to_coords."""
  size = jnp.asarray(canvas_hw, jnp.float32)
  return (coords.astype(jnp.float32) + 1.0) * 0.5 * size


def coords_to_token_grid(coords: jax.Array, grid_yx: tuple[int, int]) -> jax.Array:
  """Normalised coordinates -> token-grid units, where the centre of video token (i, j) is exactly (i, j)."""
  grid = jnp.asarray(grid_yx, jnp.float32)
  return (coords.astype(jnp.float32) + 1.0) * 0.5 * grid - 0.5


def _coord_features(coords: jax.Array, num_freqs: int) -> jax.Array:
  """[..., 2] -> [..., 2 + 4 num_freqs]: the raw coordinates and sin/cos at octave frequencies (pi to 64 pi),
  fine enough to tell apart cells of a 64-wide grid."""
  freqs = jnp.pi * 2.0 ** jnp.linspace(0.0, 6.0, num_freqs)
  args = coords[..., None] * freqs  # [..., 2, n]
  feats = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1).reshape(coords.shape[:-1] + (-1,))
  return jnp.concatenate([coords, feats], axis=-1)


def _mlp2(p: Params, x: jax.Array, dtype) -> jax.Array:
  return layers.dense(p["fc2"], jax.nn.silu(layers.dense(p["fc1"], x, dtype)), dtype)


# ---------------------------------------------------------------------------------------------------- layers

def _project(p: Params, x: jax.Array, dtype) -> jax.Array:
  """[..., C] -> [..., K, D]."""
  y = jnp.einsum("...c,ckd->...kd", x.astype(dtype), p["kernel"].astype(dtype))
  return y + p["bias"].astype(dtype)


def _attend(p: Params, x_q: jax.Array, x_kv: jax.Array, angles_q: jax.Array, angles_k: jax.Array,
            mask: attn_lib.Mask, impl: str, dtype, eps: float, cached_kv=None):
  """Projection, q/k RMSNorm, RoPE, masked attention and output projection. x_q [B, L, C], x_kv [B, S, C];
  angles [B, L or S, D/2]. cached_kv: (k, v) [B, S0, K, D] of earlier tokens (already normed and rotated),
  put before this call's keys. Returns (y [B, L, C], (k, v) of this call's tokens)."""
  q = layers.rms_norm(_project(p["query"], x_q, dtype), p["norm_q"], axes=(-2, -1), eps=eps)
  k = layers.rms_norm(_project(p["key"], x_kv, dtype), p["norm_k"], axes=(-2, -1), eps=eps)
  v = _project(p["value"], x_kv, dtype)
  q = rope_lib.apply_rope(q, angles_q[:, :, None, :]).astype(dtype)
  k = rope_lib.apply_rope(k, angles_k[:, :, None, :]).astype(dtype)
  names = ("batch", "length", "heads", "kv")
  q, k, v = constrain(q, names), constrain(k, names), constrain(v, names)
  k_all, v_all = k, v
  if cached_kv is not None:
    k_all = jnp.concatenate([cached_kv[0].astype(dtype), k], axis=1)
    v_all = jnp.concatenate([cached_kv[1].astype(dtype), v], axis=1)
  out = attn_lib.attention(q, k_all, v_all, mask, impl)
  out = constrain(out.astype(dtype), names)
  y = jnp.einsum("blkd,kdc->blc", out, p["out"]["kernel"].astype(dtype))
  return y + p["out"]["bias"].astype(dtype), (k, v)


def _block(x_BFQC: jax.Array, p: Params, ctx: dict, cached_kv=None):
  """One DiT block on the joint sequence, kept as [B, F, Q, C] so per-frame modulation broadcasts.
  Returns (x, (k, v) of the self-attention for this call's tokens)."""
  dtype, eps, impl = ctx["dtype"], ctx["eps"], ctx["impl"]
  b, f, q_per_frame, c = x_BFQC.shape
  n = ctx["video_tokens"]
  # Named scopes label the ops in profiles (`ap-jax bench profile`); they change nothing else.
  with jax.named_scope("modulation"):
    mod = ctx["mod_BF6C"] + p["modulation"].astype(jnp.float32)  # float32 modulation, as Wan
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [mod[:, :, i, None, :] for i in range(6)]

  with jax.named_scope("self_attn"):
    h = layers.layer_norm(x_BFQC, eps=eps, grad_barrier=ctx["ln_grad_barrier"]) * (1.0 + scale_msa) + shift_msa
    h = h.reshape(b, f * q_per_frame, c)
    y, kv = _attend(p["self_attn"], h, h, ctx["self_angles"], ctx["self_angles"], ctx["self_mask"], impl, dtype,
                    eps, cached_kv)
    x_BFQC = x_BFQC + (y.reshape(b, f, q_per_frame, c).astype(jnp.float32) * gate_msa).astype(x_BFQC.dtype)

  # Cross-attention: only the query tokens that read actions (subject tokens, or video tokens in the baseline).
  with jax.named_scope("cross_attn"):
    h = layers.layer_norm(x_BFQC, p["norm_cross"]["scale"], p["norm_cross"]["bias"], eps=eps,
                          grad_barrier=ctx["ln_grad_barrier"])
    if ctx["cross_on_subjects"]:
      h_q = h[:, :, n:].reshape(b, f * (q_per_frame - n), c)
    else:
      h_q = h[:, :, :n].reshape(b, f * n, c)
    y, _ = _attend(p["cross_attn"], h_q, ctx["actions_BSC"], ctx["cross_angles_q"], ctx["cross_angles_k"],
                   ctx["cross_mask"], impl, dtype, eps)
    y = y.astype(x_BFQC.dtype)
    if ctx["cross_on_subjects"]:
      x_BFQC = jnp.concatenate([x_BFQC[:, :, :n], x_BFQC[:, :, n:] + y.reshape(b, f, q_per_frame - n, c)], axis=2)
    else:
      x_BFQC = jnp.concatenate([x_BFQC[:, :, :n] + y.reshape(b, f, n, c), x_BFQC[:, :, n:]], axis=2)

  with jax.named_scope("mlp"):
    h = layers.layer_norm(x_BFQC, eps=eps, grad_barrier=ctx["ln_grad_barrier"]) * (1.0 + scale_mlp) + shift_mlp
    h = layers.dense(p["mlp"]["fc1"], h, dtype)
    h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "frames", "length", "mlp"))
    h = layers.dense(p["mlp"]["fc2"], h, dtype)
    x_BFQC = x_BFQC + (h.astype(jnp.float32) * gate_mlp).astype(x_BFQC.dtype)
  return constrain(x_BFQC, ("batch", "frames", "length", "embed")), kv


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
  d = config.dit
  dtype = layers.compute_dtype(d.dtype)
  latents = inputs["latents"]
  b, f, h, w, c = latents.shape
  ps, width, heads = d.patch_size, d.width, d.heads
  head_dim = width // heads
  gy, gx = h // ps, w // ps
  n = gy * gx
  num_slots = config.max_players if d.subject_tokens else 0
  q_per_frame = n + num_slots
  player_mask = inputs["player_mask"].astype(bool)
  cached_frames = 0 if cache is None else cache["k"].shape[2] // q_per_frame
  # Absolute index of this call's first frame: RoPE positions (only differences matter to attention).
  first = jnp.zeros((), jnp.float32) if cache is None else cache["next_frame"].astype(jnp.float32)
  frame_pos = first + jnp.arange(f, dtype=jnp.float32)  # [F]

  # Video tokens: patchify [B, F, h, w, c] -> [B, F, N, ps ps c] -> [B, F, N, C].
  patchify = lambda x: x.reshape(b, f, gy, ps, gx, ps, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f, n, -1)
  with jax.named_scope("embed"):
    video = layers.dense(params["patch_embed"], patchify(latents), dtype)
    if d.previous_frame_input:
      video = video + layers.dense(params["previous_embed"], patchify(inputs["previous_latents"]), dtype)
  grid_y, grid_x = np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij")
  yx = jnp.asarray(np.stack([grid_y, grid_x], -1).reshape(n, 2), jnp.float32)
  video_pos = jnp.concatenate([jnp.broadcast_to(frame_pos[:, None, None], (f, n, 1)),
                               jnp.broadcast_to(yx, (f, n, 2))], -1)
  video_pos = jnp.broadcast_to(video_pos, (b, f, n, 3))

  # Time: sinusoid -> MLP -> e [B, F, C]; block modulation e0 [B, F, 6, C] (Wan2.1).
  t_emb = layers.sinusoidal_embedding(inputs["times"].astype(jnp.float32) * 1000.0, d.freq_dim)
  e = _mlp2(params["time_embed"], t_emb, jnp.float32)
  e0 = layers.dense(params["time_proj"], jax.nn.silu(e), jnp.float32).reshape(b, f, 6, width)

  # Action entries [B, F, P]: entry f is the action that produced frame f (START for the clip's first frame),
  # after the cached frames' entries; embedded and flattened slot-major to [B, P (F0 + F), C].
  if cache is None and d.context_tokens:
    start = jnp.full((b, 1, config.max_players), start_action_id(config), jnp.int32)
    entries_BFP = jnp.concatenate([start, inputs["actions"].astype(jnp.int32)], axis=1)
  else:
    entries_BFP = inputs["actions"].astype(jnp.int32)
  all_entries = entries_BFP if cache is None else jnp.concatenate([cache["entries"], entries_BFP], axis=1)
  action_tok = jnp.take(params["action_embed"], all_entries.transpose(0, 2, 1), axis=0).astype(dtype)  # [B,P,F,C]

  if d.subject_tokens:
    coords = inputs["coords"].astype(jnp.float32)
    subj = _mlp2(params["coord_embed"], _coord_features(coords, d.coord_freqs), dtype)  # [B, F, P, C]
    if d.previous_frame_input:
      previous = _coord_features(inputs["previous_coords"].astype(jnp.float32), d.coord_freqs)
      subj = subj + _mlp2(params["previous_coord_embed"], previous, dtype)
    if d.slot_embedding:
      subj = subj + params["slot_embed"].astype(dtype)
    x = jnp.concatenate([video, subj], axis=2)
    subj_yx = coords_to_token_grid(coords[..., :2], (gy, gx))  # the position part of the state
    if not d.subject_rope:
      subj_yx = jnp.zeros_like(subj_yx)  # no spatial rotation: angles 0 for y and x
    subj_t = jnp.broadcast_to(frame_pos[None, :, None, None], (b, f, num_slots, 1))
    pos = jnp.concatenate([video_pos, jnp.concatenate([subj_t, subj_yx], -1)], axis=2)
  else:
    player = _mlp2(params["player_coord_embed"], _coord_features(inputs["initial_coords"], d.coord_freqs), dtype)
    action_tok = action_tok + player[:, :, None, :]
    x = video
    pos = video_pos
  # The residual stream stays float32 (as under torch autocast in Wan2.1); only matmul inputs are cast to dtype.
  x = constrain(x.astype(jnp.float32), ("batch", "frames", "length", "embed"))
  self_angles = rope_lib.rope_angles(pos.reshape(b, f * q_per_frame, 3), head_dim, d.rope_theta)

  # Masks: static layout part + padding segment ids (attention.py). Frames are numbered from the first cached
  # frame, so this call's queries sit at frames cached_frames.. and keys span cached + these frames.
  total = cached_frames + f
  query_self = attn_lib.self_attention_layout(f, n, num_slots, first_frame=cached_frames)
  key_self = attn_lib.self_attention_layout(total, n, num_slots)
  self_mask = attn_lib.Mask(attn_lib.static_mask(query_self, key_self, subject_isolation=d.subject_isolation),
                            attn_lib.segment_ids(query_self, player_mask), attn_lib.segment_ids(key_self, player_mask))
  key_layout = attn_lib.action_layout(total, config.max_players)
  if d.subject_tokens:
    query_layout = attn_lib.subject_query_layout(f, num_slots, first_frame=cached_frames)
    same_subject = d.masked_cross_attention
  else:
    query_layout = attn_lib.video_query_layout(f, n, first_frame=cached_frames)
    same_subject = False
  cross_mask = attn_lib.Mask(
      attn_lib.static_mask(query_layout, key_layout, frame_wise=d.frame_wise, same_subject=same_subject),
      attn_lib.segment_ids(query_layout, player_mask), attn_lib.segment_ids(key_layout, player_mask))
  # Temporal-only RoPE in cross-attention: (frame, 0, 0) rotates only the t pairs.
  time_pos = lambda frames: jnp.broadcast_to(
      jnp.stack([first - cached_frames + jnp.asarray(frames, jnp.float32)] + [jnp.zeros(len(frames))] * 2, -1),
      (b, len(frames), 3))
  ctx = dict(
      dtype=dtype, eps=d.eps, impl=d.attention_impl, video_tokens=n, mod_BF6C=e0,
      ln_grad_barrier=bool(d.get("ln_grad_barrier", False)),
      self_angles=self_angles, self_mask=self_mask,
      cross_on_subjects=d.subject_tokens, actions_BSC=action_tok.reshape(b, -1, width),
      cross_angles_q=rope_lib.rope_angles(time_pos(query_layout.frame), head_dim, d.rope_theta),
      cross_angles_k=rope_lib.rope_angles(time_pos(key_layout.frame), head_dim, d.rope_theta),
      cross_mask=cross_mask)

  def body(carry, xs):
    block_params, cached_kv = xs
    carry, kv = _block(carry, block_params, ctx, cached_kv)
    return carry, (kv if return_cache else None)

  body = layers.remat(body, d.remat_policy, prevent_cse=not d.scan_layers)
  cached = None if cache is None else (cache["k"], cache["v"])
  if d.scan_layers:
    x, new_kv = jax.lax.scan(body, x, (params["blocks"], cached))
  else:
    per_layer = []
    for i in range(d.depth):
      x, kv = body(x, jax.tree.map(lambda a: a[i], (params["blocks"], cached)))
      per_layer.append(kv)
    new_kv = jax.tree.map(lambda *a: jnp.stack(a), *per_layer) if return_cache else None

  # Head (Wan2.1): LayerNorm, modulation by e, linear; then unpatchify.
  with jax.named_scope("head"):
    head_mod = e[:, :, None, :] + params["head"]["modulation"].astype(jnp.float32)  # [B, F, 2, C]
    shift, scale = head_mod[:, :, None, 0], head_mod[:, :, None, 1]
    y = layers.layer_norm(x, eps=d.eps, grad_barrier=bool(d.get("ln_grad_barrier", False))) * (1.0 + scale) + shift
    video_out = layers.dense(params["head"]["out"], y[:, :, :n], jnp.float32)
    video_out = video_out.reshape(b, f, gy, gx, ps, ps, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f, h, w, c)
    out = {"video": video_out}
    if d.subject_tokens:
      coord_v = layers.dense(params["coord_head"], y[:, :, n:], jnp.float32)
      if config.flow.get("coord_target", "velocity") == "displacement":
        # The clean state, as a displacement from the previous frame's state in units of the prior's spread.
        coord_v = inputs["previous_coords"].astype(jnp.float32) + float(config.flow.coord_noise_std) * coord_v
      out["coords"] = coord_v * player_mask[:, None, :, None]
  if return_cache:
    k_new, v_new = new_kv
    if cache is not None:
      k_new = jnp.concatenate([cache["k"].astype(k_new.dtype), k_new], axis=2)
      v_new = jnp.concatenate([cache["v"].astype(v_new.dtype), v_new], axis=2)
    out["cache"] = {"k": k_new, "v": v_new, "entries": all_entries,
                    "next_frame": (first + f).astype(jnp.int32)}
  return out


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
  coordinate velocity MSE over real players of the target frames. With flow.own_context_prob, the batch's 2-step
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
    if config.flow.get("coord_target", "velocity") == "displacement":  # MSE in units of the prior's spread
      scale = 1.0 / float(config.flow.coord_noise_std)
      coord_loss = flow_lib.flow_loss(out["coords"] * scale, targets["coords"] * scale, w)
    else:
      coord_loss = flow_lib.flow_loss(out["coords"], targets["coords"], w)
    metrics["coord_loss"] = coord_loss
    loss = loss + config.flow.coord_loss_weight * coord_loss
  metrics["loss"] = loss
  return loss, metrics
