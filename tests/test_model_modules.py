"""The Flax plumbing every model part uses: the kernel initializer's fan-in, and that a parameter created without
logical axis names is refused at the boundary instead of silently replicated."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from ap_jax.model import modules


@pytest.mark.parametrize("shape, out_axis, fan_in", [((3, 3, 16, 32), -1, 144), ((64, 8), -1, 64),
                                                     ((64, 4, 16), (1, 2), 64), ((4, 16, 64), -1, 64)])
def test_clipped_normal_scales_by_fan_in_and_clips_at_two_sigma(shape, out_axis, fan_in):
  w = modules.clipped_normal(2.0, out_axis=out_axis)(jax.random.key(0), shape)
  assert w.shape == shape and w.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(w))) == pytest.approx(2 * 2.0 / np.sqrt(fan_in), rel=1e-6)  # some draws clip


class _Dense(nnx.Module):
  def __init__(self, named: bool, *, rngs: nnx.Rngs):
    init = modules.clipped_normal()
    self.kernel = nnx.Param((nnx.with_partitioning(init, ("embed", "mlp")) if named else init)(rngs.params(), (3, 4)))

  def __call__(self, x):
    return x @ self.kernel[...]


def test_params_are_plain_arrays_and_unnamed_ones_are_refused():
  make = lambda named: lambda rngs: _Dense(named, rngs=rngs)
  params = jax.jit(lambda k: modules.init_params(make(True), k))(jax.random.key(0))
  assert type(params) is dict and isinstance(params["kernel"], jax.Array) and params["kernel"].shape == (3, 4)
  assert modules.param_logical_axes(make(True)) == {"kernel": PartitionSpec("embed", "mlp")}
  # The pure boundary: a cached graphdef, the plain params merged into it, inside and outside jit.
  graph = modules.graphdef(make(True))
  x = jnp.ones((2, 3))
  np.testing.assert_allclose(jax.jit(lambda p: modules.bind(graph, p)(x))(params), x @ params["kernel"], rtol=1e-6)
  with pytest.raises(ValueError, match=r"_Dense parameters without one logical axis name per dimension: \['kernel'\]"):
    modules.param_logical_axes(make(False))
