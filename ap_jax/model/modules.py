"""Flax NNX plumbing shared by the model's parts: the kernel initializer and the pure-functional boundary.

The model's parts are Flax NNX modules (why NNX: ap_jax/model/README.md), but only plain pytrees leave the model.
Every parameter is an `nnx.Param` created through `nnx.with_partitioning(init, names)`, so it carries one logical
axis name per dimension as sharding metadata; at the boundary that metadata is read once and dropped:

  init_params(make, rng) -> params          nested dicts of arrays: the module's nnx.Param state, made pure
  param_logical_axes(make) -> axes          same structure; leaves are PartitionSpecs of logical names
  graphdef(make) ...  bind(graphdef, params) -> module     the forward pass: merge the pure params into a module

`make(rngs)` builds the module from an `nnx.Rngs`. `param_logical_axes` and `graphdef` only trace it
(`nnx.eval_shape`): no parameter is computed. The trainer maps the logical names to mesh axes with
`sharding.tree_shardings`, and places the arrays itself; so Flax's eager sharding (which would shard each
Param as it is created, and needs a mesh whose axes are the logical names) is switched off while modules are
built and bound here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def clipped_normal(scale: float = 1.0, out_axis: int | Sequence[int] = -1):
  """Initializer: a standard normal draw clipped to +-2, times scale / sqrt(fan_in).

  fan_in is the product of every dimension not in `out_axis`: k * k * c_in for an HWIO conv kernel, d_in for a
  dense (d_in, d_out) one, d_in for a (d_in, heads, head_dim) projection with out_axis=(1, 2); as
  `jax.nn.initializers.variance_scaling(mode="fan_in")` counts it. Clipped rather than truncated normal:
  truncated_normal's inverse-erf sampler makes init compile ~10x slower, and the two differ only in the 5% of
  draws beyond 2 sigma.
  """
  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    outputs = {a % len(shape) for a in ((out_axis,) if isinstance(out_axis, int) else out_axis)}
    fan_in = math.prod(d for a, d in enumerate(shape) if a not in outputs)
    std = scale / math.sqrt(max(fan_in, 1))
    return std * jnp.clip(jax.random.normal(key, shape, dtype), -2.0, 2.0)

  return init


def _no_eager_sharding():
  """Context in which new Params are not sharded as they are created (flax >= 0.12's eager sharding); a no-op on
  Flax versions without it."""
  use = getattr(nnx, "use_eager_sharding", None)
  return use(False) if use is not None else contextlib.nullcontext()


def _pure(state: Any) -> dict:
  """A Flax State as plain nested dicts (no Variable boxes)."""
  return nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()


def init_params(make: Callable[[nnx.Rngs], nnx.Module], rng: jax.Array) -> dict:
  """The module's parameters as plain nested dicts of arrays: its `nnx.Param` state, built with `nnx.Rngs(rng)`.
  Works under `jax.jit` and `jax.eval_shape` (the trainer creates sharded parameters that way)."""
  with _no_eager_sharding():
    return _pure(nnx.state(make(nnx.Rngs(rng)), nnx.Param))


def abstract_module(make: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
  """The module with ShapeDtypeStructs for arrays (`nnx.eval_shape`): structure and metadata, nothing computed."""
  with _no_eager_sharding():
    return nnx.eval_shape(lambda: make(nnx.Rngs(0)))


def param_logical_axes(make: Callable[[nnx.Rngs], nnx.Module]) -> dict:
  """The logical axis names of the module's parameters: the tree of `init_params`, with a PartitionSpec of names
  per leaf, read from each Param's partitioning metadata (`nnx.get_partition_spec`). Raises if a parameter was
  created without names (a missing `nnx.with_partitioning`), since the trainer could not shard it."""
  module = abstract_module(make)
  params = nnx.state(module, nnx.Param)
  specs = _pure(nnx.get_partition_spec(params))
  shapes = _pure(params)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  unnamed = [jax.tree_util.keystr(path) for (path, spec), shape in zip(
      jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec), jax.tree.leaves(shapes))
             if len(spec) != len(shape.shape)]
  if unnamed:
    raise ValueError(f"{type(module).__name__} parameters without one logical axis name per dimension: "
                     f"{', '.join(unnamed)}; create them with nnx.with_partitioning(init, names)")
  return specs


def graphdef(make: Callable[[nnx.Rngs], nnx.Module]) -> nnx.GraphDef:
  """The module's static structure (`nnx.split` of the abstract module): what `bind` merges parameters into.
  Hashable and array-free, so it may be cached and closed over by jitted functions."""
  module = abstract_module(make)
  if jax.tree.leaves(nnx.state(module, nnx.Not(nnx.Param))):
    raise ValueError(f"{type(module).__name__} holds state other than nnx.Param; the pure boundary carries "
                     "parameters only")
  return nnx.split(module)[0]


def bind(graph: nnx.GraphDef, params: dict) -> nnx.Module:
  """A module computing with `params` (plain nested dicts of arrays, e.g. `init_params`'s, possibly traced)."""
  with _no_eager_sharding():
    return nnx.merge(graph, params)
