"""A frozen copy of the hand-written denoiser that the Flax NNX modules replaced (ap_jax/model/dit.py and the
ParamSpec machinery of ap_jax/model/layers.py at commit ef744b4): its parameter tree, logical axes, init and
forward pass. Tests compare the Flax modules against it: same parameter names, shapes and logical axes (checkpoints
written before restore unchanged) and the same outputs to float32 rounding from the same parameters.

Only the model code is frozen; what the port left alone (masks, RoPE, norms, coordinates) is imported."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec

from ap_jax.model import attention as attn_lib
from ap_jax.model import dit
from ap_jax.model import layers
from ap_jax.model import rope as rope_lib
from ap_jax.model.dit import coords_to_token_grid, start_action_id, state_dims
from ap_jax.model.sharding import constrain

Params = dict
_coord_features = dit.coord_features

@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """One weight: its shape, one logical axis name per dimension, and how to initialise it.

  init: "normal" (std = scale / sqrt(fan_in)), "zeros", "ones" or "embedding" (std = scale).
  """
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init: str = "normal"
  fan_in: int = 1
  scale: float = 1.0

  def __post_init__(self):
    if len(self.shape) != len(self.axes):
      raise ValueError(f"ParamSpec shape {self.shape} has {len(self.shape)} dims but axes {self.axes} name "
                       f"{len(self.axes)}")
    if self.init not in ("normal", "zeros", "ones", "embedding"):
      raise ValueError(f"ParamSpec init {self.init!r}, expected normal, zeros, ones or embedding")


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def stack_specs(specs, depth: int, axis_name: str = "layers"):
  """Prepends a `layers` dimension of size `depth` to every spec (for `jax.lax.scan` over blocks)."""
  return jax.tree.map(
      lambda s: dataclasses.replace(s, shape=(depth,) + s.shape, axes=(axis_name,) + s.axes), specs,
      is_leaf=_is_spec)


def init_from_specs(rng: jax.Array, specs, dtype=jnp.float32):
  """Draws a params pytree (same structure as `specs`) with one independent key per leaf."""
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(rng, max(len(leaves), 1))
  out = []
  for key, s in zip(keys, leaves):
    if s.init == "zeros":
      out.append(jnp.zeros(s.shape, dtype))
    elif s.init == "ones":
      out.append(jnp.ones(s.shape, dtype))
    elif s.init == "embedding":
      out.append(s.scale * jax.random.normal(key, s.shape, dtype))
    else:
      std = s.scale / math.sqrt(max(s.fan_in, 1))
      # Clipped rather than truncated normal: truncated_normal's inverse-erf sampler makes init compile ~10x
      # slower, and the two differ only in the 5% of draws beyond 2 sigma.
      out.append(std * jnp.clip(jax.random.normal(key, s.shape, dtype), -2.0, 2.0))
  return jax.tree.unflatten(treedef, out)


def axes_from_specs(specs):
  """The logical-axes pytree: same structure as the params, leaves are PartitionSpecs of logical names."""
  return jax.tree.map(lambda s: PartitionSpec(*s.axes), specs, is_leaf=_is_spec)


def dense_spec(d_in: int, d_out: int, axes_in: str | None, axes_out: str | None, bias: bool = True,
               scale: float = 1.0) -> dict[str, ParamSpec]:
  spec = {"kernel": ParamSpec((d_in, d_out), (axes_in, axes_out), "normal", fan_in=d_in, scale=scale)}
  if bias:
    spec["bias"] = ParamSpec((d_out,), (axes_out,), "zeros")
  return spec


def dense(p: dict[str, jax.Array], x: jax.Array, dtype) -> jax.Array:
  """x @ kernel + bias, computed in `dtype` (bfloat16 matmuls, float32 master weights)."""
  y = jnp.einsum("...i,io->...o", x.astype(dtype), p["kernel"].astype(dtype))
  if "bias" in p:
    y = y + p["bias"].astype(dtype)
  return y


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
  return {"fc1": dense_spec(d_in, width, None, "embed"), "fc2": dense_spec(width, width, "embed", None)}


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
      "mlp": {"fc1": dense_spec(width, d.mlp, "embed", "mlp"),
              "fc2": dense_spec(d.mlp, width, "mlp", "embed")},
  }
  specs = {
      "patch_embed": dense_spec(patch_dim, width, "patch", "embed"),
      **({"previous_embed": dense_spec(patch_dim, width, "patch", "embed")} if d.previous_frame_input else {}),
      "time_embed": {"fc1": dense_spec(d.freq_dim, width, None, "embed"),
                     "fc2": dense_spec(width, width, "embed", None)},
      "time_proj": dense_spec(width, 6 * width, "embed", "mlp"),
      # Rows: the actions, then START (frame 0 has no action before it), then NULL (action dropped, for
      # classifier-free guidance on actions).
      "action_embed": ParamSpec((config.num_actions + 2, width), ("vocab", "embed"), "embedding", scale=1.0),
      "blocks": stack_specs(block, d.depth),
      "head": {
          "modulation": ParamSpec((2, width), (None, "embed"), "embedding", scale=1.0 / math.sqrt(width)),
          "out": dense_spec(width, patch_dim, "embed", "patch"),
      },
  }
  dims = state_dims(config)
  coord_in = dims + 2 * dims * d.coord_freqs
  if d.subject_tokens:
    specs["coord_embed"] = _mlp2_specs(coord_in, width)
    if d.previous_frame_input:
      specs["previous_coord_embed"] = _mlp2_specs(coord_in, width)
    specs["coord_head"] = dense_spec(width, dims, "embed", None)
    if d.slot_embedding:
      specs["slot_embed"] = ParamSpec((config.max_players, width), ("subjects", "embed"), "embedding", scale=1.0)
  else:
    specs["player_coord_embed"] = _mlp2_specs(coord_in, width)
  return specs



def init(rng, config):
  return init_from_specs(rng, param_specs(config), jnp.dtype(config.dit.param_dtype))


def param_logical_axes(config):
  return axes_from_specs(param_specs(config))


def _mlp2(p: Params, x: jax.Array, dtype) -> jax.Array:
  return dense(p["fc2"], jax.nn.silu(dense(p["fc1"], x, dtype)), dtype)


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
    h = dense(p["mlp"]["fc1"], h, dtype)
    h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "frames", "length", "mlp"))
    h = dense(p["mlp"]["fc2"], h, dtype)
    x_BFQC = x_BFQC + (h.astype(jnp.float32) * gate_mlp).astype(x_BFQC.dtype)
  return constrain(x_BFQC, ("batch", "frames", "length", "embed")), kv


def apply(params: Params, config: ml_collections.ConfigDict, inputs: dict[str, jax.Array],
          cache: dict[str, jax.Array] | None = None, return_cache: bool = False) -> dict[str, jax.Array]:
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
    video = dense(params["patch_embed"], patchify(latents), dtype)
    if d.previous_frame_input:
      video = video + dense(params["previous_embed"], patchify(inputs["previous_latents"]), dtype)
  grid_y, grid_x = np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij")
  yx = jnp.asarray(np.stack([grid_y, grid_x], -1).reshape(n, 2), jnp.float32)
  video_pos = jnp.concatenate([jnp.broadcast_to(frame_pos[:, None, None], (f, n, 1)),
                               jnp.broadcast_to(yx, (f, n, 2))], -1)
  video_pos = jnp.broadcast_to(video_pos, (b, f, n, 3))

  # Time: sinusoid -> MLP -> e [B, F, C]; block modulation e0 [B, F, 6, C] (Wan2.1).
  t_emb = layers.sinusoidal_embedding(inputs["times"].astype(jnp.float32) * 1000.0, d.freq_dim)
  e = _mlp2(params["time_embed"], t_emb, jnp.float32)
  e0 = dense(params["time_proj"], jax.nn.silu(e), jnp.float32).reshape(b, f, 6, width)

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

  if d.remat_policy != "none":
    body = jax.checkpoint(body, policy=layers.REMAT_POLICIES[d.remat_policy], prevent_cse=not d.scan_layers)
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
    video_out = dense(params["head"]["out"], y[:, :, :n], jnp.float32)
    video_out = video_out.reshape(b, f, gy, gx, ps, ps, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f, h, w, c)
    out = {"video": video_out}
    if d.subject_tokens:
      coord_v = dense(params["coord_head"], y[:, :, n:], jnp.float32)
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

