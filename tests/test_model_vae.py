"""The per-frame VAE: shapes, per-frame independence, loss terms, errors, and that it learns game frames."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

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


# ------------------------------------------------------- the hand-written VAE that the Flax modules replaced
# A frozen copy of ap_jax/model/vae.py before Flax (commit 0a624c6): its parameter layout, logical axes, init and
# forward pass. The Flax modules must keep the first two exactly (old checkpoints restore as they are) and compute
# the same encoder and decoder to float32 rounding.


def _reference_specs(config):
  """{"encoder": ..., "decoder": ...} with (shape, logical axes, init) leaves; init "ones", "zeros" or a fan-in."""
  v = config.vae
  chans = [v.channels * m for m in v.channel_mult]
  conv = lambda cin, cout, k=3: {"kernel": ((k, k, cin, cout), (None, None, "conv_in", "conv_out"), k * k * cin),
                                 "bias": ((cout,), ("conv_out",), "zeros")}
  norm = lambda c: {"scale": ((c,), ("channels",), "ones"), "bias": ((c,), ("channels",), "zeros")}

  def res(cin, cout):
    spec = {"norm1": norm(cin), "conv1": conv(cin, cout), "norm2": norm(cout), "conv2": conv(cout, cout)}
    return dict(spec, skip=conv(cin, cout, 1)) if cin != cout else spec

  enc = {"conv_in": conv(3, chans[0])}
  for i, ch in enumerate(chans):
    enc[f"level{i}"] = {f"res{j}": res(ch, ch) for j in range(v.num_res_blocks)}
    if i + 1 < len(chans):
      enc[f"level{i}"]["down"] = conv(ch, chans[i + 1])
  enc.update(mid=res(chans[-1], chans[-1]), norm_out=norm(chans[-1]), conv_out=conv(chans[-1], 2 * v.latent_channels))
  dec = {"conv_in": conv(v.latent_channels, chans[-1]), "mid": res(chans[-1], chans[-1])}
  for i in reversed(range(len(chans))):
    dec[f"level{i}"] = {f"res{j}": res(chans[i], chans[i]) for j in range(v.num_res_blocks)}
    if i > 0:
      dec[f"level{i}"]["up"] = conv(chans[i], chans[i - 1])
  dec.update(norm_out=norm(chans[0]), conv_out=conv(chans[0], 3))
  return {"encoder": enc, "decoder": dec}


_is_ref_leaf = lambda x: isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], tuple)


def _reference_init(rng, config):
  """The old `layers.init_from_specs`: one key per leaf in flattening order, clipped normal / sqrt(fan_in)."""
  leaves, treedef = jax.tree.flatten(_reference_specs(config), is_leaf=_is_ref_leaf)
  out = []
  for key, (shape, _, init) in zip(jax.random.split(rng, len(leaves)), leaves):
    if init in ("zeros", "ones"):
      out.append(jnp.full(shape, 1.0 if init == "ones" else 0.0, jnp.float32))
    else:
      out.append(jnp.clip(jax.random.normal(key, shape), -2.0, 2.0) / np.sqrt(init))
  return jax.tree.unflatten(treedef, out)


def _ref_conv(p, x, dtype, stride=1):
  y = jax.lax.conv_general_dilated(x.astype(dtype), p["kernel"].astype(dtype), (stride, stride), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y + p["bias"].astype(dtype)


def _ref_norm(p, x, groups):
  n, h, w, c = x.shape
  g = np.gcd(groups, c)
  x32 = x.astype(jnp.float32).reshape(n, h, w, g, c // g)
  mean, var = jnp.mean(x32, axis=(1, 2, 4), keepdims=True), jnp.var(x32, axis=(1, 2, 4), keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + 1e-6)).reshape(n, h, w, c) * p["scale"] + p["bias"]


def _ref_resblock(p, x, groups, dtype):
  h = _ref_conv(p["conv1"], jax.nn.silu(_ref_norm(p["norm1"], x, groups)), dtype)
  h = _ref_conv(p["conv2"], jax.nn.silu(_ref_norm(p["norm2"], h, groups)), dtype)
  return (_ref_conv(p["skip"], x, dtype) if "skip" in p else x.astype(dtype)) + h


def _ref_encoder(p, v, x):
  dtype = jnp.dtype(v.dtype)
  x = _ref_conv(p["conv_in"], x, dtype)
  for i in range(len(v.channel_mult)):
    for j in range(v.num_res_blocks):
      x = _ref_resblock(p[f"level{i}"][f"res{j}"], x, v.norm_groups, dtype)
    if "down" in p[f"level{i}"]:
      x = _ref_conv(p[f"level{i}"]["down"], x, dtype, stride=2)
  x = _ref_resblock(p["mid"], x, v.norm_groups, dtype)
  return _ref_conv(p["conv_out"], jax.nn.silu(_ref_norm(p["norm_out"], x, v.norm_groups)), dtype).astype(jnp.float32)


def _ref_decoder(p, v, z):
  dtype = jnp.dtype(v.dtype)
  x = _ref_resblock(p["mid"], _ref_conv(p["conv_in"], z, dtype), v.norm_groups, dtype)
  for i in reversed(range(len(v.channel_mult))):
    for j in range(v.num_res_blocks):
      x = _ref_resblock(p[f"level{i}"][f"res{j}"], x, v.norm_groups, dtype)
    if "up" in p[f"level{i}"]:
      x = _ref_conv(p[f"level{i}"]["up"], jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), dtype)
  return _ref_conv(p["conv_out"], jax.nn.silu(_ref_norm(p["norm_out"], x, v.norm_groups)), dtype).astype(jnp.float32)


def _by_path(tree, is_leaf=None):
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


def test_parameter_layout_and_axes_are_the_handwritten_ones():
  """Same tree, shapes and logical axes as before Flax, for every model size: old checkpoints restore unchanged."""
  for name in config_lib.MODEL_NAMES:
    cfg = config_lib.get_model_config(name)
    expected = _by_path(_reference_specs(cfg), _is_ref_leaf)
    shapes = _by_path(jax.eval_shape(lambda: vae.vae_init(jax.random.key(0), cfg)))
    assert {k: (s.shape, s.dtype) for k, s in shapes.items()} == {k: (e[0], jnp.float32) for k, e in expected.items()}
    axes = _by_path(vae.vae_logical_axes(cfg), lambda x: isinstance(x, PartitionSpec))
    assert axes == {k: PartitionSpec(*e[1]) for k, e in expected.items()}, name


def _relative_error(tree, reference):
  """The largest ||a - b|| / ||b|| over the leaves."""
  return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)), tree,
                                          reference)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flax_modules_compute_the_handwritten_vae(dtype):
  """Encoder, decoder and their parameter gradients on the same parameters as the hand-written code: equal to
  float32 rounding (Flax's GroupNorm multiplies by rsqrt(var) * scale where the old code multiplied by rsqrt(var),
  then scale). In bfloat16, where rounding alone moves gradients by 4-9% from float32's, as close to the float32
  result as the old code's bfloat16 result is (measured: 0.068 vs 0.085 for the encoder, 0.047 vs 0.044 for the
  decoder)."""
  cfg = config_lib.get_model_config("tiny")
  cfg.vae.dtype = dtype
  v32 = config_lib.get_model_config("tiny").vae
  params = _reference_init(jax.random.key(4), cfg)
  x = jax.random.uniform(jax.random.key(5), (2, 16, 24, 3), minval=-1, maxval=1)
  z = jax.random.normal(jax.random.key(6), (2, 4, 6, cfg.vae.latent_channels))
  for half, inputs, reference in (("encoder", x, _ref_encoder), ("decoder", z, _ref_decoder)):
    forward = lambda p: vae._encoder(p, cfg, inputs) if half == "encoder" else vae._decoder(p, cfg, inputs)
    cotangent = jax.random.normal(jax.random.key(7), forward(params).shape)
    value_and_grad = lambda f, p: jax.value_and_grad(lambda q: jnp.sum(f(q) * cotangent))(p)
    flax_result = (forward(params), value_and_grad(forward, params)[1][half])
    old_result = (reference(params[half], cfg.vae, inputs),
                  value_and_grad(lambda q: reference(q, cfg.vae, inputs), params[half])[1])
    if dtype == "float32":
      assert _relative_error(flax_result, old_result) < 1e-5, half
    else:
      float32 = (reference(params[half], v32, inputs),
                 value_and_grad(lambda q: reference(q, v32, inputs), params[half])[1])
      assert _relative_error(flax_result, float32) < 1.5 * _relative_error(old_result, float32), half


def test_init_draws_from_the_handwritten_distributions():
  """Flax draws other values than the old per-leaf key split, from the same distributions: kernels a normal clipped
  to +-2, times 1/sqrt(fan_in); conv biases and norm biases zero; norm scales one."""
  cfg = config_lib.get_model_config("tiny")
  new, old = (_by_path(init(jax.random.key(0), cfg)) for init in (vae.vae_init, _reference_init))
  specs = _by_path(_reference_specs(cfg), _is_ref_leaf)
  for path, (shape, _, init) in specs.items():
    if init in ("zeros", "ones"):
      np.testing.assert_array_equal(new[path], np.full(shape, 1.0 if init == "ones" else 0.0), err_msg=path)
      continue
    assert float(jnp.max(jnp.abs(new[path]))) <= 2.0 / np.sqrt(init) * (1 + 1e-6), path
    if new[path].size >= 2000:  # enough draws for the standard deviation to be within 5%
      assert float(jnp.std(new[path])) == pytest.approx(float(jnp.std(old[path])), rel=0.05), path
  assert not np.allclose(new["['encoder']['conv_in']['kernel']"], old["['encoder']['conv_in']['kernel']"])


def test_sharded_loss_and_gradients_match_one_device():
  """Parameters laid out by their logical axes (conv_out over tensor) and frames over data x fsdp, on the 8-device
  CPU mesh, give the single-device loss and gradients."""
  from ap_jax.model import sharding

  cfg = config_lib.get_model_config("tiny")
  params = vae.vae_init(jax.random.key(0), cfg)
  frames = jax.random.uniform(jax.random.key(1), (4, 2, 16, 16, 3), minval=-1, maxval=1)
  loss_and_grads = jax.jit(jax.value_and_grad(lambda p, x: vae.vae_loss(p, cfg, x, jax.random.key(2))[0]))
  loss, grads = loss_and_grads(params, frames)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = sharding.tree_shardings(vae.vae_logical_axes(cfg), mesh, sharding.DEFAULT_RULES, shapes=params)
  sharded = jax.device_put(params, shardings)
  assert sharded["encoder"]["conv_in"]["kernel"].sharding.spec == PartitionSpec(None, None, None, "tensor")
  batch = jax.NamedSharding(mesh, sharding.logical_to_spec(("batch",), sharding.DEFAULT_RULES, mesh.axis_names))
  sharded_loss, sharded_grads = loss_and_grads(sharded, jax.device_put(frames, batch))
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded_grads, grads)


def test_autoencoder_checkpoint_of_the_handwritten_vae_restores(tmp_path, monkeypatch):
  """A workdir trained with the pre-Flax parameter layout (the old init stands in for the old code: the layout is
  all a checkpoint stores of the model) is read by `load_autoencoder` as it is: no conversion, no refusal."""
  from ap_jax.train import config_utils, mesh as mesh_lib, restore, trainer
  from benchmarks import crash_soak

  monkeypatch.setenv("AP_JAX_CACHE", str(tmp_path / "cache"))
  tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
  workdir = str(tmp_path / "ae")
  config = config_utils.apply_overrides(config_utils.load_config(f"{tiny}:autoencoder,runlocal"), list(
      crash_soak.SMALL_AE) + ["--config.total_steps=1", "--config.checkpoint_every=1"])
  with monkeypatch.context() as patch:
    patch.setattr(vae, "vae_init", _reference_init)
    trainer.train(config, workdir, progress=False)
  denoiser = config_utils.apply_overrides(config_utils.load_config(f"{tiny}:runlocal"), list(crash_soak.SMALL_AE) + [
      f"--config.autoencoder_workdir={workdir}"])
  mesh = mesh_lib.build_mesh(denoiser.mesh, devices=jax.devices()[:1])
  params, meta = restore.load_autoencoder(denoiser, mesh, mesh_lib.rules_from_config(denoiser))
  assert meta["step"] == 1
  # The weights read are the ones written: the old init moved by one Adam step (at most about one learning rate).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1.5 * config.optim.learning_rate), params,
               _reference_init(jax.random.PRNGKey(int(config.seed)), config.model))
  frames = jax.random.uniform(jax.random.key(1), (1, 1, 16, 16, 3), minval=-1, maxval=1)
  assert vae.vae_decode(params, denoiser.model, vae.vae_encode(params, denoiser.model, frames)).shape == frames.shape
