"""The device mesh from config, and shardings from logical axis names.

Mesh axes, outermost first: `data` (pure data parallel: replicas), `fsdp` (data parallel that also shards
parameters and optimizer state), `context` (sequence), `tensor` (heads / MLP). `config.mesh` gives each axis's
size; one may be -1 ("whatever is left"). Axis types are passed explicitly (Auto: shardings come from jit's
in/out shardings and `with_sharding_constraint`), since `jax.make_mesh`'s default changed across releases.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ap_jax.model import sharding as sharding_lib

MESH_AXES = ("data", "fsdp", "context", "tensor")


class MeshError(ValueError):
  pass


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the per-axis sizes (with at most one -1) for `num_devices` devices."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
  desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise MeshError(f"mesh {desc}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh {desc}: sizes must be positive or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise MeshError(f"mesh {desc} does not divide the {num_devices} devices: the fixed axes multiply to {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(f"mesh {desc} needs {math.prod(sizes)} devices, but there are {num_devices}")
  return tuple(sizes)


def dcn_shape(mesh_config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Per-axis sizes across slices (`mesh.dcn_<axis>`, maxtext's dcn_*_parallelism): the mesh axis `a` spans
  `dcn_a` slices over the data-center network times `a` chips within each slice (ICI). All 1: one slice."""
  sizes = tuple(int(mesh_config.get(f"dcn_{axis}", 1)) for axis in MESH_AXES)
  if any(s < 1 for s in sizes):
    raise MeshError(f"mesh dcn sizes {dict(zip(MESH_AXES, sizes))}: expected positive integers")
  return sizes


def build_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh over `devices` (default: all). With `mesh.dcn_*` sizes above 1, a multi-slice mesh: the devices'
  `slice_index` groups them into slices, `mesh.<axis>` sizes apply within a slice and `mesh.dcn_<axis>` across
  slices (each axis's size is their product), so collectives over ICI stay inside a slice."""
  devices = list(devices) if devices is not None else jax.devices()
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  dcn = dcn_shape(mesh_config)
  slices = math.prod(dcn)
  if slices == 1:
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  found = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(found) != slices:
    raise MeshError(f"mesh dcn sizes {dict(zip(MESH_AXES, dcn))} ask for {slices} slices, but the "
                    f"{len(devices)} devices come from {len(found)} slice(s)")
  from jax.experimental import mesh_utils

  ici = mesh_shape(mesh_config, len(devices) // slices)
  array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  return Mesh(array, MESH_AXES, axis_types=axis_types)


def parse_mesh_spec(text: str) -> dict[str, int]:
  """`data=4,tensor=2` (the command lines' mesh flags) -> every mesh axis's size, 1 where not named; -1 fills."""
  sizes = dict.fromkeys(MESH_AXES, 1)
  for item in (i for i in text.split(",") if i):
    axis, _, value = item.partition("=")
    if axis not in sizes or not value.lstrip("-").isdigit() or int(value) == 0 or int(value) < -1:
      raise MeshError(f"mesh {text!r}: expected AXIS=SIZE pairs joined by commas, axes {', '.join(MESH_AXES)}, "
                      "sizes >= 1 or -1 (the rest), e.g. data=4,tensor=2")
    sizes[axis] = int(value)
  return sizes


def mesh_from_spec(text: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh a `data=4,tensor=2` flag names, over the first devices it needs (all of them with a -1 size)."""
  devices = list(devices) if devices is not None else jax.devices()
  sizes = parse_mesh_spec(text)
  count = len(devices) if -1 in sizes.values() else math.prod(sizes.values())
  if count > len(devices):
    raise MeshError(f"mesh {text!r} needs {count} devices, but there are {len(devices)}")
  return build_mesh(ml_collections.ConfigDict(sizes), devices=devices[:count])


def single_device_mesh() -> Mesh:
  """Every axis of size 1 on the first device (inference and tools that need no sharding)."""
  return build_mesh(ml_collections.ConfigDict({axis: 1 for axis in MESH_AXES}), devices=jax.devices()[:1])


def rules_from_config(config: ml_collections.ConfigDict) -> tuple:
  """The logical-axis rules table: `config.logical_axis_rules` as [(logical, mesh axis | [axes] | None)]."""
  rules = config.get("logical_axis_rules", None)
  if rules is None:
    return sharding_lib.DEFAULT_RULES
  out = []
  for item in rules:
    logical, physical = item
    if isinstance(physical, list):
      physical = tuple(physical)
    for axis in (physical if isinstance(physical, tuple) else (physical,)):
      if axis is not None and axis not in MESH_AXES:
        raise MeshError(f"logical_axis_rules maps {logical!r} to {axis!r}, expected one of {MESH_AXES} or None")
    out.append((logical, physical))
  return tuple(out)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a batch-leading array: the batch dimension over the mesh axes `batch` maps to."""
  return NamedSharding(mesh, sharding_lib.logical_to_spec(("batch",), rules, mesh.axis_names))


def batch_shards(mesh: Mesh, rules) -> int:
  spec = sharding_lib.logical_to_spec(("batch",), rules, mesh.axis_names)[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1


def check_batch(global_batch: int, mesh: Mesh, rules) -> None:
  shards = batch_shards(mesh, rules)
  if global_batch % shards:
    raise MeshError(f"global batch {global_batch} does not divide over the {shards} batch shards of mesh "
                    f"{dict(mesh.shape)}; expected a multiple of {shards}")
  if global_batch % jax.process_count():
    raise MeshError(f"global batch {global_batch} does not divide over {jax.process_count()} processes")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
  return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.devices.size} devices)"
