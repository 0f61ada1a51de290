"""Attention with ActionParty's masks, expressed as a static block mask plus segment ids.

Dimension letters: B batch, F frames, N video tokens per frame, P subject slots, L query tokens, S key tokens,
K heads, D head width.

Every mask in the model factorises as
    allowed[b, q, k] = static[q, k]  and  segment_q[b, q] == segment_k[b, k]
where `static` depends only on the token layout and the config (frame causality, subject isolation, which
player's actions a subject reads) and the segment ids carry the per-example padding (0 = real token, 1 = token
of a padded subject slot). This is exactly what a TPU splash-attention kernel takes (a NumpyMask per head and
`SegmentIds`), so no dense [B, L, S] bias is needed on TPU; the XLA path materialises the same boolean mask.
A padded query still sees its own padded tokens (same segment), so no row is ever empty and no NaN appears;
its output is never used.

Token layouts (the static part) are numpy arrays of per-token frame index and subject slot (-1 = not a
subject token):
  self-attention sequence: frame-major, each frame = its N video tokens then its P subject tokens
  action (cross-attention key) sequence: slot-major, player p's entries 0..F-1, where entry f is the action that
    produced frame f (entry 0 is a learned START token, since frame 0 has no action before it)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from ap_jax.model import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static per-token metadata of a sequence: frame index and subject slot (-1 for non-subject tokens)."""
  frame: np.ndarray
  slot: np.ndarray

  def __len__(self) -> int:
    return int(self.frame.shape[0])


def self_attention_layout(num_frames: int, video_tokens_per_frame: int, num_slots: int,
                          first_frame: int = 0) -> Layout:
  """Frame-major [video tokens; subject tokens] per frame (num_slots = 0 when there are no subject tokens).
  first_frame numbers the frames from there (a chunk that follows cached frames)."""
  per_frame = video_tokens_per_frame + num_slots
  frame = np.repeat(np.arange(first_frame, first_frame + num_frames), per_frame)
  slot_one = np.concatenate([np.full(video_tokens_per_frame, -1), np.arange(num_slots)])
  return Layout(frame=frame, slot=np.tile(slot_one, num_frames))


def subject_query_layout(num_frames: int, num_slots: int, first_frame: int = 0) -> Layout:
  """Subject tokens alone, frame-major [F, P] (the cross-attention queries of the full model)."""
  return self_attention_layout(num_frames, 0, num_slots, first_frame)


def video_query_layout(num_frames: int, video_tokens_per_frame: int, first_frame: int = 0) -> Layout:
  """Video tokens alone, frame-major [F, N] (the cross-attention queries of the global baseline)."""
  return self_attention_layout(num_frames, video_tokens_per_frame, 0, first_frame)


def action_layout(num_frames: int, num_slots: int) -> Layout:
  """Action entries, slot-major [P, F]."""
  return Layout(frame=np.tile(np.arange(num_frames), num_slots), slot=np.repeat(np.arange(num_slots), num_frames))


def static_mask(query: Layout, key: Layout, *, frame_wise: bool = False, subject_isolation: bool = False,
                same_subject: bool = False) -> np.ndarray:
  """[L, S] bool: the layout-only part of the mask.

  Time: a query at frame f sees keys at frames <= f (causal), or == f with frame_wise.
  subject_isolation (self-attention): a subject token sees no other subject's tokens; video tokens see all.
  same_subject (masked cross-attention): a subject query sees only keys of its own slot.
  """
  qf, kf = query.frame[:, None], key.frame[None, :]
  allowed = (kf == qf) if frame_wise else (kf <= qf)
  qs, ks = query.slot[:, None], key.slot[None, :]
  if subject_isolation:
    allowed &= (qs < 0) | (ks < 0) | (qs == ks)
  if same_subject:
    if (query.slot < 0).any() or (key.slot < 0).any():
      raise ValueError("same_subject masking needs subject slots on every query and key token")
    allowed &= qs == ks
  return allowed


def segment_ids(layout: Layout, player_mask_BP: jax.Array) -> jax.Array:
  """[B, L] int32: 1 for tokens of padded subject slots, 0 otherwise."""
  slot = jnp.asarray(layout.slot)
  real = jnp.take(player_mask_BP.astype(bool), jnp.maximum(slot, 0), axis=1)  # [B, L]
  is_pad = (slot[None, :] >= 0) & ~real
  return is_pad.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Mask:
  """A splash-style mask: static [L, S] numpy array and per-example segment ids [B, L], [B, S]."""
  static: np.ndarray
  segment_q: jax.Array
  segment_k: jax.Array

  def dense(self) -> jax.Array:
    """[B, L, S] bool, what the XLA path uses."""
    return jnp.asarray(self.static)[None] & (self.segment_q[:, :, None] == self.segment_k[:, None, :])


# ------------------------------------------------------------------------------------------- implementations

def _xla_attention(q, k, v, mask: Mask):
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("blkd,bskd->bkls", q, k, preferred_element_type=jnp.float32) * scale
  logits = sharding.constrain(logits, ("batch", "heads", "length", None))
  # A large finite negative (not -inf) keeps the softmax NaN-free even if a row were empty.
  logits = jnp.where(mask.dense()[:, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkls,bskd->blkd", probs, v)


def _cudnn_attention(q, k, v, mask: Mask):
  # implementation=None lets JAX pick cuDNN on GPU when the shapes/dtypes allow, else XLA.
  return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], implementation=None)


def _splash_attention(q, k, v, mask: Mask, block: int = 128):
  """TPU splash-attention kernel (Pallas). Runs in interpret mode off TPU, which only tests use."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  b, l, heads, d = q.shape
  s = k.shape[1]
  lp, sp = -(-l // block) * block, -(-s // block) * block
  static = np.ones((lp, sp), bool)  # pad rows/cols: pad queries see pad keys only (segment 2 below)
  static[:l, :s] = mask.static
  static[:l, s:] = False
  static[l:, :s] = False
  seg_q = jnp.pad(mask.segment_q, ((0, 0), (0, lp - l)), constant_values=2)
  seg_k = jnp.pad(mask.segment_k, ((0, 0), (0, sp - s)), constant_values=2)
  ctx = sharding.active()
  # The mesh's devices say where this compiles (ahead-of-time for a TPU topology from a CPU host, too).
  platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.devices()[0].platform
  interpret = platform != "tpu"

  def per_device(q, k, v, seg_q, seg_k):
    local_heads = q.shape[2]
    multi = splash_mask.MultiHeadMask([splash_mask.NumpyMask(static)] * local_heads)
    sizes = splash.BlockSizes.get_default()
    kernel = splash.make_splash_mha(multi, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    qh = jnp.pad(q * (1.0 / math.sqrt(d)), ((0, 0), (0, lp - l), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kh = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vh = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    out = jax.vmap(lambda q1, k1, v1, sq, sk: kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=sq, kv=sk)))(
        qh, kh, vh, seg_q, seg_k)
    return out.transpose(0, 2, 1, 3)[:, :l]

  if ctx is None:
    return per_device(q, k, v, seg_q, seg_k)
  # Under a mesh the kernel runs per shard: batch and heads may be split, the sequence must be whole.
  mesh, rules = ctx
  qkv_spec = sharding.logical_to_spec(("batch", None, "heads", None), rules, mesh.axis_names)
  seg_spec = sharding.logical_to_spec(("batch", None), rules, mesh.axis_names)
  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
                     out_specs=qkv_spec, check_vma=False)
  return fn(q, k, v, seg_q, seg_k)


def attention(q_BLKD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask: Mask, impl: str = "xla") -> jax.Array:
  """Masked multi-head attention; q, k, v already projected (and rotated). Returns [B, L, K, D]."""
  if impl == "xla":
    return _xla_attention(q_BLKD, k_BSKD, v_BSKD, mask)
  if impl == "cudnn":
    return _cudnn_attention(q_BLKD, k_BSKD, v_BSKD, mask)
  if impl == "splash":
    return _splash_attention(q_BLKD, k_BSKD, v_BSKD, mask)
  raise ValueError(f"attention_impl = {impl!r}, expected one of {IMPLEMENTATIONS}")
