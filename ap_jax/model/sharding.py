"""Logical axis names, and how a rules table turns them into shardings and sharding constraints.

Every weight and every large activation carries logical axis names. The model never names a mesh axis: the trainer
activates a rules table (logical name -> mesh axis or axes) and a mesh, and only then does `constrain` emit
`jax.lax.with_sharding_constraint`. Outside that context `constrain` returns its input unchanged, so CPU tests and
single-device runs trace exactly the same code.

Flax does the name resolution (Linen's `nn.logical_to_mesh_axes`, used as a utility in `logical_to_spec`: NNX has
no equivalent with table-order semantics), and the NNX modules' parameters carry their names as partitioning
metadata (`nnx.with_partitioning`, read by `modules.param_logical_axes`). What stays here is what Flax does
not do: fitting one table to meshes that lack an axis (`rules_for_mesh`), replicating a dimension its mesh axes do
not divide (`tree_shardings`), and the no-op-unless-activated context.

Logical names used by ap_jax.model:
  batch       examples                       length    tokens in a self-attention sequence (all frames)
  frames      frames of a video clip         kv_length tokens of the conditioning (actions) sequence
  embed       model width                    heads     attention heads
  kv          per-head width                 mlp       MLP hidden width
  layers      stacked DiT blocks (scan axis) vocab     action vocabulary
  subjects    subject slots                  patch     flattened latent patch (patch*patch*latent channels)
  conv_in     conv input channels            conv_out  conv output channels
  height, width, channels  image / latent grids
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

# A sensible default: batch over data+fsdp, weights' embed dim over fsdp (ZeRO-3 style), heads/mlp over tensor,
# sequence over context. The trainer's config may pass its own table instead.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("kv_length", None),
    ("frames", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("layers", None),
    ("vocab", None),
    ("subjects", None),
    ("patch", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("height", None),
    ("width", None),
    ("channels", None),
)

_state = threading.local()


@contextlib.contextmanager
def logical_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
  """Activates `constrain` while tracing: `with logical_sharding(mesh, rules): jax.jit(step).lower(...)`.

  Tracing happens when a jitted function is first called (or lowered), so the context must be active then.
  """
  stack = getattr(_state, "stack", None)
  if stack is None:
    stack = _state.stack = []
  stack.append((mesh, tuple(rules)))
  try:
    yield
  finally:
    stack.pop()


def active() -> tuple[Mesh, tuple] | None:
  """The (mesh, rules) pair set by the innermost `logical_sharding`, or None."""
  stack = getattr(_state, "stack", None)
  return stack[-1] if stack else None


def rules_for_mesh(rules: LogicalRules, mesh_axes: Sequence[str] | None = None) -> tuple:
  """The rules with every mesh axis absent from `mesh_axes` dropped; a rule left with none is removed (its name
  then falls through to its next rule), so one table serves meshes that lack an axis. A rule to None stays. Mesh
  axes come out as a name, or a tuple of two or more (a config's lists included)."""
  out = []
  for logical, physical in rules:
    axes = (physical,) if isinstance(physical, str) else tuple(physical or ())
    kept = tuple(a for a in axes if mesh_axes is None or a in mesh_axes)
    if axes and not kept:
      continue
    out.append((logical, None if not kept else (kept[0] if len(kept) == 1 else kept)))
  return tuple(out)


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec of mesh axes, by Flax's `nn.logical_to_mesh_axes` (maxtext's
  rule): rules are tried in table order, and a rule applies when its name is an unassigned dimension of `names`
  and none of its mesh axes is used yet, so a table may list fallbacks. A rule to None means "replicate"; a name
  no rule assigns is replicated; a name may appear once in `names` (Flax raises otherwise). With `mesh_axes`, the
  rules are first fitted to the mesh (`rules_for_mesh`).
  """
  return nn.logical_to_mesh_axes(tuple(names), rules_for_mesh(rules, mesh_axes))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op unless `logical_sharding` is active."""
  ctx = active()
  if ctx is None:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} logical names {tuple(names)} for an array of rank {x.ndim}")
  mesh, rules = ctx
  spec = logical_to_spec(names, rules, mesh.axis_names)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def tree_shardings(logical_axes_tree, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, shapes=None):
  """NamedShardings for a pytree whose leaves are PartitionSpecs of logical names (e.g. `param_logical_axes`).

  With `shapes` (the same tree of arrays or ShapeDtypeStructs), a dimension that its mesh axes do not divide
  (an RGB conv's 3 output channels over tensor=2, say) is replicated instead, so one rules table serves every
  model size and mesh.
  """
  is_spec = lambda s: isinstance(s, PartitionSpec)
  if shapes is None:
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh.axis_names)),
                        logical_axes_tree, is_leaf=is_spec)

  def divisible(spec, leaf):
    physical = tuple(logical_to_spec(tuple(spec), rules, mesh.axis_names))
    physical += (None,) * (len(leaf.shape) - len(physical))
    fixed = []
    for dim, axes in zip(leaf.shape, physical):
      names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      size = 1
      for name in names:
        size *= mesh.shape[name]
      fixed.append(axes if dim % size == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*fixed))

  return jax.tree.map(divisible, logical_axes_tree, shapes, is_leaf=is_spec)
