"""The Flax plumbing every model part uses: the kernel initializer's fan-in, and that a parameter created without
logical axis names is refused at the boundary instead of silently replicated."""

import flax.linen as nn
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


class _Dense(nn.Module):
  named: bool

  @nn.compact
  def __call__(self, x):
    init = modules.clipped_normal()
    kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed", "mlp")) if self.named else init,
                        (x.shape[-1], 4))
    return x @ kernel


def test_params_are_plain_arrays_and_unnamed_ones_are_refused():
  x = jnp.ones((2, 3))
  params = modules.init_params(_Dense(True), jax.random.key(0), x)
  assert isinstance(params["kernel"], jax.Array) and params["kernel"].shape == (3, 4)
  assert modules.param_logical_axes(_Dense(True), x) == {"kernel": PartitionSpec("embed", "mlp")}
  with pytest.raises(ValueError, match=r"_Dense parameters without one logical axis name per dimension: \['kernel'\]"):
    modules.param_logical_axes(_Dense(False), x)
