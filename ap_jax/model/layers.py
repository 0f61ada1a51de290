"""The model's own numerics, as plain functions (no parameters): LayerNorm and RMSNorm in float32 (with an optional
materialized gradient), the sinusoidal time embedding, the named remat policies, `compute_dtype` and
`count_params`. The Flax NNX modules (vae.py, dit_blocks.py, dit_model.py) call these where Flax's own layers would
compute something else.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def count_params(tree) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@jax.custom_vjp
def materialized_grad(x: jax.Array) -> jax.Array:
  """The identity; in the backward pass its cotangent goes through `optimization_barrier`, so XLA computes it once
  into a buffer instead of fusing (and recomputing) it into each consumer. Values and gradients are unchanged."""
  return x


def _materialized_grad_fwd(x):
  return x, None


def _materialized_grad_bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


materialized_grad.defvjp(_materialized_grad_fwd, _materialized_grad_bwd)


def layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None,
               eps: float = 1e-6, grad_barrier: bool = False) -> jax.Array:
  """LayerNorm over the last axis, in float32 whatever the input dtype. `grad_barrier`: the gradient that leaves
  through x is materialized (`materialized_grad`). On XLA's CPU backend this cut the tiny model's step with
  subject tokens off to 0.59x: its weight gradients read that gradient transposed, and each transposing copy
  otherwise re-derived the LayerNorm backward of every later block (BENCHMARKS.md)."""
  if grad_barrier:
    x = materialized_grad(x)
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


def rms_norm(x: jax.Array, scale: jax.Array, axes: tuple[int, ...] = (-1,), eps: float = 1e-6) -> jax.Array:
  """RMSNorm over `axes` in float32 (Wan normalises q and k over all heads jointly: axes=(-2, -1))."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
  return y * scale.astype(jnp.float32)


def sinusoidal_embedding(x: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[..., ] -> [..., dim] cos/sin features (Wan's time embedding order: cos first)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str):
  """The `jax.checkpoint` policy named in the config (REMAT_POLICIES), None for "none" (no rematerialisation)."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy = {name!r}, expected one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


def compute_dtype(name: str):
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype = {name!r}, expected float32, bfloat16 or float16")
  return jnp.dtype(name)
