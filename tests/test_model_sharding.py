"""Logical axis rules -> PartitionSpecs, and `constrain` being a no-op outside a sharding context."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ap_jax.model import sharding


def test_logical_to_spec_uses_first_free_rule_and_drops_missing_mesh_axes():
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("embed", "tensor"), ("mlp", "tensor"), ("kv", None))
  # embed cannot reuse fsdp (taken by batch), so it falls back to its second rule.
  assert sharding.logical_to_spec(("batch", "embed"), rules) == PartitionSpec(("data", "fsdp"), "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == PartitionSpec("fsdp", "tensor")
  assert sharding.logical_to_spec(("kv", "unknown", None), rules) == PartitionSpec(None, None, None)
  assert sharding.logical_to_spec(("batch", "embed"), rules, mesh_axes=("data", "tensor")) == PartitionSpec(
      "data", "tensor")
  # Rules apply in table order (Flax's nn.logical_to_mesh_axes, as maxtext): an earlier rule takes its mesh axis
  # first, whatever the dimension order of the array.
  table_order = (("embed", "fsdp"), ("batch", ("data", "fsdp")))
  assert sharding.logical_to_spec(("batch", "embed"), table_order) == PartitionSpec(None, "fsdp")
  # A config's rules hold lists; one mesh axis comes out as its name.
  config_rules = [["batch", ["data"]], ["mlp", ["fsdp", "tensor"]]]
  assert sharding.logical_to_spec(("batch", "mlp"), config_rules) == PartitionSpec("data", ("fsdp", "tensor"))


def test_constrain_is_a_no_op_without_context_and_checks_rank_with_one():
  x = jnp.ones((4, 6))
  assert sharding.constrain(x, ("batch", "embed")) is x
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with sharding.logical_sharding(mesh, (("batch", "data"),)):
    try:
      sharding.constrain(x, ("batch",))
    except ValueError as e:
      assert "1 logical names ('batch',) for an array of rank 2" in str(e)
    else:
      raise AssertionError("rank mismatch not reported")
  assert sharding.active() is None
