"""Parameter specs and the small layers the DiT is built from (plain JAX, no hidden state); `compute_dtype`,
`count_params` and the remat policies serve the whole model.

The DiT describes its weights once as a tree of `ParamSpec` (shape, logical axes, initializer). `init` draws the
parameters from that tree and `logical_axes` reads the axis names from the same tree, so the params pytree and its
logical-axes pytree can never disagree in structure. Layers are plain functions of (params, inputs); the jitted
step sees only a dict of arrays. (The VAE is Flax NNX modules instead: ap_jax/model/vae.py.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


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


def shapes_from_specs(specs, dtype=jnp.float32):
  """ShapeDtypeStructs of the params, without allocating them."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=_is_spec)


def count_params(tree) -> int:
  """Number of scalars in a params (or specs) pytree."""
  leaves = jax.tree.leaves(tree, is_leaf=_is_spec)
  return int(sum(math.prod(l.shape) for l in leaves))


# ----------------------------------------------------------------------------------------------------- layers

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
