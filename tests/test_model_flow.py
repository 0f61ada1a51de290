"""Rectified-flow helpers: schedule, time sampling, noising, Euler steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ap_jax.model import config as config_lib
from ap_jax.model import flow


def test_shift_keeps_endpoints_and_moves_mass_to_high_noise():
  t = jnp.linspace(0, 1, 11)
  s = flow.shift_time(t, 3.0)
  np.testing.assert_allclose([s[0], s[-1]], [0.0, 1.0], atol=1e-6)
  assert bool(jnp.all(s[1:-1] > t[1:-1])) and bool(jnp.all(jnp.diff(s) > 0))
  np.testing.assert_allclose(flow.shift_time(t, 1.0), t, atol=1e-6)


def test_frame_times_context_low_targets_shared():
  cfg = config_lib.get_model_config("tiny").flow
  t = flow.sample_frame_times(jax.random.key(0), 64, 5, cfg)
  assert t.shape == (64, 5)
  assert float(t[:, 0].max()) <= cfg.context_noise_max
  np.testing.assert_array_equal(t[:, 1:], jnp.broadcast_to(t[:, 1:2], t[:, 1:].shape))
  assert float(t[:, 1].std()) > 0.1
  cfg.independent_frame_times = True
  t = flow.sample_frame_times(jax.random.key(0), 64, 5, cfg)
  assert float(jnp.abs(t[:, 1] - t[:, 2]).max()) > 0.1
  cfg.num_context_frames = 5
  with pytest.raises(ValueError, match="num_context_frames = 5"):
    flow.sample_frame_times(jax.random.key(0), 2, 5, cfg)


def test_exact_velocity_recovers_data_in_one_euler_step():
  x0 = jax.random.normal(jax.random.key(1), (2, 3, 4))
  noise = jax.random.normal(jax.random.key(2), (2, 3, 4))
  t = jnp.asarray([[0.3, 0.8, 1.0], [0.0, 0.5, 0.9]])
  x_t = flow.add_noise(x0, noise, t)
  np.testing.assert_allclose(x_t[1, 0], x0[1, 0], atol=1e-6)
  np.testing.assert_allclose(x_t[0, 2], noise[0, 2], atol=1e-6)
  v = flow.velocity_target(x0, noise)
  np.testing.assert_allclose(flow.euler_step(x_t, v, t, jnp.zeros_like(t)), x0, atol=1e-5)
  times = flow.sampling_times(8, 3.0)
  assert times.shape == (9,) and float(times[0]) == 1.0 and float(times[-1]) == 0.0


def test_flow_loss_weights_select_entries():
  pred = jnp.zeros((2, 3, 4))
  target = jnp.ones((2, 3, 4)).at[:, 0].set(5.0)
  weight = jnp.asarray([[0.0, 1.0, 1.0]] * 2)
  assert float(flow.flow_loss(pred, target, weight)) == pytest.approx(1.0)


def test_coordinate_time_leads_the_video():
  t = jnp.asarray([0.0, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_array_equal(flow.coord_time(t, 0.0), t)  # no lead: the same time
  np.testing.assert_allclose(flow.coord_time(t, 0.5), [0.0, 0.0, 0.0, 0.5, 1.0])  # clean from t = 0.5 on
  with pytest.raises(ValueError, match="coord_time_lead = 1.0, expected a value in \\[0, 1\\)"):
    flow.coord_time(t, 1.0)
  # An Euler pass over the sampling times in coordinate time g(t) with the exact velocity lands on the data.
  x0, eps = jnp.asarray([0.3, -0.7]), jnp.asarray([1.2, 0.4])
  ts = flow.sampling_times(6, 3.0)
  g = lambda s: flow.coord_time(s, 0.5)
  y = flow.add_noise(x0, eps, g(ts[0]))
  for i in range(6):
    y = y + (g(ts[i + 1]) - g(ts[i])) * flow.velocity_target(x0, eps)
  np.testing.assert_allclose(y, x0, atol=1e-6)
