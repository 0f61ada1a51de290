"""The per-frame VAE: shapes, per-frame independence, loss terms, errors, and that it learns game frames."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ap_jax.model import config as config_lib
from ap_jax.model import vae


@pytest.fixture(scope="module")
def tiny():
  cfg = config_lib.get_model_config("tiny")
  return cfg, vae.vae_init(jax.random.key(0), cfg)


def test_shapes_axes_and_per_frame_independence(tiny):
  cfg, params = tiny
  frames = jax.random.uniform(jax.random.key(1), (2, 3, 32, 48, 3), minval=-1, maxval=1)
  latents = vae.vae_encode(params, cfg, frames)
  assert latents.shape == (2, 3, 8, 12, cfg.vae.latent_channels) and latents.dtype == jnp.float32
  assert vae.vae_decode(params, cfg, latents).shape == frames.shape
  # One latent frame per game frame, with no mixing across time: changing frame 2 leaves frames 0-1 alone.
  changed = vae.vae_encode(params, cfg, frames.at[:, 2].set(0.0))
  np.testing.assert_allclose(changed[:, :2], latents[:, :2], atol=1e-6)
  axes = vae.vae_logical_axes(cfg)
  assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  # The latent normalisation in the config is applied on encode and undone on decode.
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.vae.latent_scale, cfg2.vae.latent_shift = 2.0, 0.5
  np.testing.assert_allclose(vae.vae_encode(params, cfg2, frames), (latents - 0.5) * 2.0, atol=1e-5)
  np.testing.assert_allclose(vae.vae_decode(params, cfg2, (latents - 0.5) * 2.0), vae.vae_decode(params, cfg, latents),
                             atol=1e-4)


def test_loss_terms_and_errors(tiny):
  cfg, params = tiny
  frames = jax.random.uniform(jax.random.key(2), (1, 2, 16, 16, 3), minval=-1, maxval=1)
  loss, metrics = vae.vae_loss(params, cfg, frames, jax.random.key(3))
  v = cfg.vae
  expected = v.l1_weight * metrics["l1"] + v.mse_weight * metrics["mse"] + v.kl_weight * metrics["kl"]
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)
  assert float(metrics["kl"]) >= 0 and np.isfinite(float(metrics["psnr"]))
  with pytest.raises(ValueError, match="frames are 18x16 pixels, expected multiples of the VAE compression 4"):
    vae.vae_encode(params, cfg, jnp.zeros((1, 1, 18, 16, 3)))
  with pytest.raises(ValueError, match=r"expected \[B, T, h, w, 8\]"):
    vae.vae_decode(params, cfg, jnp.zeros((1, 1, 4, 4, 3)))


def _game_frames(n_episodes=4, steps=3):
  gridgame = pytest.importorskip("ap_jax.games.gridgame")
  game = gridgame.GameConfig()
  keys = jax.random.split(jax.random.key(0), n_episodes)
  batch = gridgame.rollout_batch(keys, jnp.full((n_episodes,), 4, jnp.int32), jnp.arange(n_episodes) % 4,
                                 config=game, steps=steps)
  frames = np.asarray(batch["frames"]).reshape(-1, 1, game.grid_height * game.cell_size,
                                               game.grid_width * game.cell_size, 3)
  return jnp.asarray(frames, jnp.float32) / 127.5 - 1.0


def test_learns_to_reconstruct_game_frames(tiny):
  """50 Adam steps on 4 built-in-game frames (32x32 crops, 4x4 cells, for speed) take PSNR from ~8 dB to well
  above 13 dB (a broken encoder, decoder or loss would not)."""
  cfg, params = tiny
  frames = _game_frames()[::3][:4, :, :32, :32]
  opt = optax.adam(2e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, key):
    (_, metrics), grads = jax.value_and_grad(lambda p: vae.vae_loss(p, cfg, frames, key), has_aux=True)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, metrics

  first = None
  for i in range(50):
    params, state, metrics = step(params, state, jax.random.key(i))
    first = first if first is not None else float(metrics["psnr"])
  recon = vae.vae_decode(params, cfg, vae.vae_encode(params, cfg, frames))
  final = float(vae.psnr(recon, frames))
  assert first < 11 and final > 13, (first, final)


def test_subject_weights_mark_a_square_around_each_real_player():
  positions = jnp.array([[[[10.5, 20.5], [3.0, 3.0]]]])  # [B=1, T=1, P=2, (y, x)]
  mask = jnp.array([[True, False]])  # the second slot is padding
  w = np.asarray(vae.subject_weights(positions, mask, (16, 32), 2.0, 8.0))[0, 0, :, :, 0]
  assert w.shape == (16, 32)
  heavy = np.argwhere(w == 9.0)
  assert heavy[:, 0].min() == 8 and heavy[:, 0].max() == 12 and heavy[:, 1].min() == 18 and heavy[:, 1].max() == 22
  assert len(heavy) == 25 and np.all(w[w != 9.0] == 1.0)  # the padded slot adds nothing
