"""Logical axis names and the one helper that turns them into sharding constraints.

Every weight (see `param_logical_axes`) and every large activation carries logical axis names. The model never
names a mesh axis: the trainer activates a rules table (logical name -> mesh axis or axes) and a mesh, and only
then does `constrain` emit `jax.lax.with_sharding_constraint`. Outside that context `constrain` returns its input
unchanged, so CPU tests and single-device runs trace exactly the same code.

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


def logical_to_spec(names: Sequence[str | None], rules: LogicalRules,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec of mesh axes.

  For each name the first rule whose mesh axes are not yet used in this spec wins (as in maxtext), so a table
  may list fallbacks. Mesh axes absent from `mesh_axes` (when given) are dropped, and a rule left with none is
  skipped, so one table serves meshes that lack an axis. A rule mapping to None means "replicate".
  """
  used: set[str] = set()
  out = []
  for name in names:
    choice = None
    if name is not None:
      for logical, physical in rules:
        if logical != name:
          continue
        axes = (physical,) if isinstance(physical, str) else tuple(physical or ())
        if mesh_axes is not None and axes:
          axes = tuple(a for a in axes if a in mesh_axes)
          if not axes:
            continue  # every axis of this rule is missing from the mesh: try the next rule
        if any(a in used for a in axes):
          continue
        used.update(axes)
        choice = None if not axes else (axes[0] if len(axes) == 1 else axes)
        break
    out.append(choice)
  return PartitionSpec(*out)


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
