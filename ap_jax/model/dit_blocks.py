"""The denoiser's Flax NNX layers: dense layers and MLPs with logical axis names, masked attention with q/k RMSNorm
and 3D RoPE, the DiT block, the stack of blocks, and the output head.

Dimension letters as in dit.py: B batch, F frames, Q tokens per frame, L query tokens, S key tokens, C width,
K heads, D head width, M MLP width.

Every parameter is an `nnx.Param` with one logical axis name per dimension (`nnx.with_partitioning`). Attribute
names are the parameter tree's names ("query", "norm_q", "modulation", "fc1", ...), kept from the hand-written
model so checkpoints written before the move to Flax restore unchanged.

The stack: `make_blocks` creates `depth` blocks at once with `nnx.vmap` over split rngs, so each parameter gains a
leading `layers` axis, in its shape and in its logical names (`transform_metadata`); `run_blocks` runs them with
`nnx.scan` over that axis, the body wrapped in `nnx.remat` with the config's policy. With `scan_layers=False` the
scan is fully unrolled (no while loop: XLA's cost analysis then counts every layer, and XLA may schedule across
layers). What stays ours: the masks (attention.py), the RoPE angles (rope.py) and the norms' float32 arithmetic
(layers.py); the KV cache is an explicit pytree in and out, not NNX state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ap_jax.model import attention as attn_lib
from ap_jax.model import layers
from ap_jax.model import modules
from ap_jax.model import rope as rope_lib
from ap_jax.model.sharding import constrain

Names = tuple[str | None, ...]


def param(init: Callable, shape: tuple[int, ...], names: Names, dtype: Any, rngs: nnx.Rngs) -> nnx.Param:
  """A raw parameter (a modulation table, an embedding table, a norm scale) with its logical axis names."""
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def dense(d_in: int, d_out: int, names: Names, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  """x @ kernel + bias computed in `dtype` (inputs, kernel and bias cast to it; bfloat16 matmuls on float32 master
  weights). kernel [d_in, d_out] named `names`, a normal clipped to +-2 over sqrt(d_in); bias zero, named
  `names[1]`."""
  return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                    kernel_init=nnx.with_partitioning(modules.clipped_normal(), names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros, names[1:]))


class MLP(nnx.Module):
  """fc2(activation(fc1(x))), activation "silu" or "gelu" (tanh approximation, as Wan); `hidden_names`: the
  logical names the hidden activation is constrained to (none when None)."""

  def __init__(self, fc1: nnx.Linear, fc2: nnx.Linear, activation: str, hidden_names: Names | None = None):
    if activation not in ("silu", "gelu"):
      raise ValueError(f"MLP activation = {activation!r}, expected 'silu' or 'gelu'")
    self.fc1, self.fc2 = fc1, fc2
    self.activation, self.hidden_names = activation, hidden_names

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    h = jax.nn.silu(h) if self.activation == "silu" else jax.nn.gelu(h, approximate=True)
    if self.hidden_names is not None:
      h = constrain(h, self.hidden_names)
    return self.fc2(h)


class Attention(nnx.Module):
  """Projections to K heads of width D, q/k RMSNorm over all heads jointly (Wan2.1), RoPE, masked attention
  (attention.py: xla, cudnn or splash) and the output projection. Parameters: query, key, value ({kernel
  [C, K, D], bias [K, D]}), out ({kernel [K, D, C], bias [C]}), norm_q, norm_k [K, D]."""

  def __init__(self, width: int, heads: int, *, dtype: Any, param_dtype: Any, eps: float, impl: str,
               rngs: nnx.Rngs):
    head_dim = width // heads
    self.dtype, self.eps, self.impl = dtype, eps, impl
    proj = lambda: nnx.Einsum(
        "...c,ckd->...kd", (width, heads, head_dim), (heads, head_dim), dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(modules.clipped_normal(out_axis=(1, 2)), ("embed", "heads", "kv")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("heads", "kv")), rngs=rngs)
    self.query, self.key, self.value = proj(), proj(), proj()
    self.out = nnx.Einsum(
        "blkd,kdc->blc", (heads, head_dim, width), (width,), dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(modules.clipped_normal(), ("heads", "kv", "embed")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)), rngs=rngs)
    self.norm_q = param(nnx.initializers.ones, (heads, head_dim), ("heads", "kv"), param_dtype, rngs)
    self.norm_k = param(nnx.initializers.ones, (heads, head_dim), ("heads", "kv"), param_dtype, rngs)

  def __call__(self, x_q: jax.Array, x_kv: jax.Array, angles_q: jax.Array, angles_k: jax.Array,
               mask: attn_lib.Mask, cached_kv=None):
    """x_q [B, L, C], x_kv [B, S, C]; angles [B, L or S, D/2]. cached_kv: (k, v) [B, S0, K, D] of earlier tokens
    (already normed and rotated), put before this call's keys. Returns (y [B, L, C], (k, v) of this call's
    tokens)."""
    dtype = self.dtype
    q = layers.rms_norm(self.query(x_q), self.norm_q[...], axes=(-2, -1), eps=self.eps)
    k = layers.rms_norm(self.key(x_kv), self.norm_k[...], axes=(-2, -1), eps=self.eps)
    v = self.value(x_kv)
    q = rope_lib.apply_rope(q, angles_q[:, :, None, :]).astype(dtype)
    k = rope_lib.apply_rope(k, angles_k[:, :, None, :]).astype(dtype)
    names = ("batch", "length", "heads", "kv")
    q, k, v = constrain(q, names), constrain(k, names), constrain(v, names)
    k_all, v_all = k, v
    if cached_kv is not None:
      k_all = jnp.concatenate([cached_kv[0].astype(dtype), k], axis=1)
      v_all = jnp.concatenate([cached_kv[1].astype(dtype), v], axis=1)
    out = attn_lib.attention(q, k_all, v_all, mask, self.impl)
    out = constrain(out.astype(dtype), names)
    return self.out(out), (k, v)


@dataclasses.dataclass(frozen=True)
class BlockInputs:
  """What every block reads besides the residual stream: per-frame modulation [B, F, 6, C], the self-attention's
  RoPE angles [B, F Q, D/2] and mask, the action entries [B, S, C] with their angles and the cross-attention mask
  and query angles. `video_tokens` N: the first N tokens of each frame are video tokens."""
  video_tokens: int
  modulation_BF6C: jax.Array
  self_angles: jax.Array
  self_mask: attn_lib.Mask
  actions_BSC: jax.Array
  cross_angles_q: jax.Array
  cross_angles_k: jax.Array
  cross_mask: attn_lib.Mask


class Block(nnx.Module):
  """One Wan2.1 block: adaLN-modulated self-attention, cross-attention to the action entries (LayerNorm with
  affine, no modulation) from the subject tokens (or from the video tokens without them), adaLN-modulated GELU
  MLP. Modulation is float32, as Wan's."""

  def __init__(self, width: int, heads: int, mlp: int, *, dtype: Any, param_dtype: Any, eps: float, impl: str,
               ln_grad_barrier: bool, cross_on_subjects: bool, rngs: nnx.Rngs):
    self.eps, self.ln_grad_barrier, self.cross_on_subjects = eps, ln_grad_barrier, cross_on_subjects
    attention = lambda: Attention(width, heads, dtype=dtype, param_dtype=param_dtype, eps=eps, impl=impl, rngs=rngs)
    self.modulation = param(nnx.initializers.normal(1.0 / math.sqrt(width)), (6, width), (None, "embed"),
                            param_dtype, rngs)
    self.self_attn = attention()
    # Flax's LayerNorm with the two-pass variance mean((x - mean)^2), as ours (its default E[x^2] - E[x]^2 loses
    # digits); float32 whatever the compute dtype.
    self.norm_cross = nnx.LayerNorm(
        width, epsilon=eps, use_fast_variance=False, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))
    self.cross_attn = attention()
    self.mlp = MLP(dense(width, mlp, ("embed", "mlp"), dtype, param_dtype, rngs),
                   dense(mlp, width, ("mlp", "embed"), dtype, param_dtype, rngs), "gelu",
                   hidden_names=("batch", "frames", "length", "mlp"))

  def _norm(self, x: jax.Array) -> jax.Array:
    return layers.layer_norm(x, eps=self.eps, grad_barrier=self.ln_grad_barrier)

  def __call__(self, x_BFQC: jax.Array, inputs: BlockInputs, cached_kv=None):
    """The joint sequence, kept as [B, F, Q, C] so per-frame modulation broadcasts. Returns (x, (k, v) of the
    self-attention for this call's tokens)."""
    b, f, q_per_frame, c = x_BFQC.shape
    n = inputs.video_tokens
    # Named scopes label the ops in profiles (`ap-jax bench profile`); they change nothing else.
    with jax.named_scope("modulation"):
      mod = inputs.modulation_BF6C + self.modulation[...].astype(jnp.float32)
      shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [mod[:, :, i, None, :] for i in range(6)]

    with jax.named_scope("self_attn"):
      h = (self._norm(x_BFQC) * (1.0 + scale_msa) + shift_msa).reshape(b, f * q_per_frame, c)
      y, kv = self.self_attn(h, h, inputs.self_angles, inputs.self_angles, inputs.self_mask, cached_kv)
      x_BFQC = x_BFQC + (y.reshape(b, f, q_per_frame, c).astype(jnp.float32) * gate_msa).astype(x_BFQC.dtype)

    # Cross-attention: only the query tokens that read actions (subject tokens, or video tokens in the baseline).
    with jax.named_scope("cross_attn"):
      h = x_BFQC
      if self.ln_grad_barrier:
        h = layers.materialized_grad(h)
      h = self.norm_cross(h)
      queries = (n, q_per_frame) if self.cross_on_subjects else (0, n)
      h_q = h[:, :, queries[0]:queries[1]].reshape(b, -1, c)
      y, _ = self.cross_attn(h_q, inputs.actions_BSC, inputs.cross_angles_q, inputs.cross_angles_k,
                             inputs.cross_mask)
      y = y.astype(x_BFQC.dtype).reshape(b, f, queries[1] - queries[0], c)
      if self.cross_on_subjects:
        x_BFQC = jnp.concatenate([x_BFQC[:, :, :n], x_BFQC[:, :, n:] + y], axis=2)
      else:
        x_BFQC = jnp.concatenate([x_BFQC[:, :, :n] + y, x_BFQC[:, :, n:]], axis=2)

    with jax.named_scope("mlp"):
      h = self.mlp(self._norm(x_BFQC) * (1.0 + scale_mlp) + shift_mlp)
      x_BFQC = x_BFQC + (h.astype(jnp.float32) * gate_mlp).astype(x_BFQC.dtype)
    return constrain(x_BFQC, ("batch", "frames", "length", "embed")), kv


def make_blocks(depth: int, make_block: Callable[[nnx.Rngs], Block], rngs: nnx.Rngs) -> Block:
  """`depth` blocks as one Block whose parameters have a leading `layers` axis (shape and logical names): created
  at once by `nnx.vmap` over `depth` split rngs, so each layer draws its own values."""

  @nnx.split_rngs(splits=depth)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs: nnx.Rngs) -> Block:
    return make_block(rngs)

  return create(rngs)


def run_blocks(blocks: Block, x_BFQC: jax.Array, inputs: BlockInputs, cached_kv, *, scan_layers: bool,
               remat_policy: str, return_kv: bool):
  """The residual stream through the stacked blocks: `nnx.scan` over the `layers` axis (fully unrolled unless
  scan_layers), each block under `nnx.remat` with the named policy (layers.REMAT_POLICIES; "none": no remat).
  cached_kv: (k, v) [depth, B, S0, K, D] or None. Returns (x, (k, v) [depth, B, F Q, K, D] or None)."""
  policy = layers.remat_policy(remat_policy)

  def body(x, block, cached):
    x, kv = block(x, inputs, cached)
    return x, (kv if return_kv else None)

  if policy is not None:
    # prevent_cse only matters outside a loop: unrolled, XLA could merge the recomputed forward with the original.
    body = nnx.remat(body, policy=policy, prevent_cse=not scan_layers)
  scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), unroll=1 if scan_layers else True,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
  return scan(x_BFQC, blocks, cached_kv)


class Head(nnx.Module):
  """Wan2.1's head: LayerNorm modulated by the frame's time embedding (shift, scale from `modulation` [2, C] plus
  e), then `out` [C, patch values] on the video tokens (float32)."""

  def __init__(self, width: int, patch_dim: int, *, eps: float, ln_grad_barrier: bool, param_dtype: Any,
               rngs: nnx.Rngs):
    self.eps, self.ln_grad_barrier = eps, ln_grad_barrier
    self.modulation = param(nnx.initializers.normal(1.0 / math.sqrt(width)), (2, width), (None, "embed"),
                            param_dtype, rngs)
    self.out = dense(width, patch_dim, ("embed", "patch"), jnp.float32, param_dtype, rngs)

  def modulate(self, x_BFQC: jax.Array, e_BFC: jax.Array) -> jax.Array:
    """The normalised, modulated stream [B, F, Q, C] (float32) that `out` and the coordinate head read."""
    mod = e_BFC[:, :, None, :] + self.modulation[...].astype(jnp.float32)  # [B, F, 2, C]
    shift, scale = mod[:, :, None, 0], mod[:, :, None, 1]
    return layers.layer_norm(x_BFQC, eps=self.eps, grad_barrier=self.ln_grad_barrier) * (1.0 + scale) + shift


def patchify(x_BFhwc: jax.Array, patch_size: int) -> jax.Array:
  """[B, F, h, w, c] -> [B, F, N, ps ps c], patches in row-major order (video token (i, j) is patch i X + j)."""
  b, f, h, w, c = x_BFhwc.shape
  ps = patch_size
  if h % ps or w % ps:
    raise ValueError(f"latents are {h} x {w}, not a multiple of dit.patch_size = {ps}: expected frames in multiples "
                     f"of {ps} x the autoencoder's compression in pixels")
  patches = x_BFhwc.reshape(b, f, h // ps, ps, w // ps, ps, c).transpose(0, 1, 2, 4, 3, 5, 6)
  return patches.reshape(b, f, -1, ps * ps * c)


def unpatchify(x_BFNp: jax.Array, patch_size: int, hw: tuple[int, int]) -> jax.Array:
  """Inverse of patchify: [B, F, N, ps ps c] -> [B, F, h, w, c]."""
  b, f = x_BFNp.shape[:2]
  (h, w), ps = hw, patch_size
  c = x_BFNp.shape[-1] // (ps * ps)
  return x_BFNp.reshape(b, f, h // ps, w // ps, ps, ps, c).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f, h, w, c)


def token_grid(gy: int, gx: int) -> np.ndarray:
  """[N, 2] (y, x) of each video token, row-major."""
  grid_y, grid_x = np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij")
  return np.stack([grid_y, grid_x], -1).reshape(gy * gx, 2)
