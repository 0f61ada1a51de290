"""The Flax NNX denoiser against the hand-written one it replaced (a frozen copy: tests/dit_reference.py): the
same parameter tree, shapes and logical axes for every model size and switch (checkpoints written before the move
restore unchanged, tested with a run resumed across the change), the same outputs, KV caches and gradients from the
same parameters, and initial values from the same distributions."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import dit_reference as reference
from ap_jax.model import config as config_lib
from ap_jax.model import dit
from test_model_dit import make_inputs, small_config

DISPLACEMENT = {"previous_frame_input": True, "context_tokens": False, "state_facing": True, "coord_target": True}
VARIANTS = [{}, {"subject_tokens": False}, DISPLACEMENT,
            {"slot_embedding": True, "frame_wise": True, "subject_rope": False, "masked_cross_attention": False,
             "subject_isolation": False},
            {"scan_layers": False, "remat_policy": "full", "ln_grad_barrier": True, "previous_frame_input": True}]


def _config(cfg, overrides):
  overrides = dict(overrides)
  if overrides.pop("coord_target", False):
    cfg.flow.update(dict(coord_target="displacement", coord_prior="previous", coord_noise_std=0.25))
  cfg.dit.update(overrides)
  return cfg


def _by_path(tree, is_leaf=None):
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


_is_spec = lambda x: isinstance(x, PartitionSpec)


@pytest.mark.parametrize("name", config_lib.MODEL_NAMES)
def test_parameter_layout_and_axes_are_the_handwritten_ones(name):
  """Same names, shapes, dtypes and logical axes as before Flax, for every model size and every switch that adds
  or removes parameters: checkpoints written before restore unchanged."""
  for overrides in VARIANTS:
    cfg = _config(config_lib.get_model_config(name), overrides)
    shapes = lambda init: {k: (v.shape, v.dtype) for k, v in _by_path(
        jax.eval_shape(lambda: init(jax.random.key(0), cfg))).items()}
    assert shapes(dit.init) == shapes(reference.init), (name, overrides)
    assert _by_path(dit.param_logical_axes(cfg), _is_spec) == _by_path(reference.param_logical_axes(cfg),
                                                                       _is_spec), (name, overrides)


def _chunks(inputs):
  """(frames 0-1 with their action, frame 2 with its action): the inputs of a pass that fills a KV cache and of
  the pass that reads it."""
  per_frame = ("latents", "times", "coords", "previous_latents", "previous_coords")
  fixed = {k: inputs[k] for k in ("player_mask", "initial_coords") if k in inputs}
  part = lambda lo, hi: dict(fixed, **{k: v[:, lo:hi] for k, v in inputs.items() if k in per_frame})
  return part(0, 2), part(2, 3)


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(o) or "default")
def test_flax_modules_compute_the_handwritten_dit(overrides):
  """From the same parameters: the outputs of one pass, of a pass that returns its KV cache and of a pass that
  reads it equal the hand-written code's to 1e-5 in float32 (measured: equal to the last bit on CPU)."""
  cfg = _config(small_config(), overrides)
  params = reference.init(jax.random.key(1), cfg)
  inputs = make_inputs(cfg)
  head, tail = _chunks(inputs)
  actions = inputs["actions"]
  if cfg.dit.context_tokens:  # START is added for the first chunk; a cached chunk gets the actions producing it
    head["actions"], tail["actions"] = actions[:, :1], actions[:, 1:2]
  else:
    head["actions"], tail["actions"] = actions[:, :2], actions[:, 2:3]

  def passes(module):
    full = module.apply(params, cfg, inputs)
    first = module.apply(params, cfg, head, return_cache=True)
    return full, first, module.apply(params, cfg, tail, cache=first["cache"])

  new, old = (jax.jit(lambda m=m: passes(m))() for m in (dit, reference))
  for path, value in _by_path(old).items():
    np.testing.assert_allclose(_by_path(new)[path], value, atol=1e-5, rtol=0, err_msg=path)


def _relative_error(tree, ref):
  return max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)),
                                          tree, ref)))


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": False, "remat_policy": "full", "ln_grad_barrier": True}],
                         ids=["scan", "unrolled_remat_barrier"])
def test_loss_and_gradients_equal_the_handwritten_ones(overrides):
  """The training loss and every parameter's gradient, float32: the loss to 1e-6, gradients to 1e-5 relative."""
  from test_model_dit import _batch

  cfg = _config(small_config(), overrides)
  params = reference.init(jax.random.key(2), cfg)
  batch = _batch(cfg)

  def loss_and_grads(apply):
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(dit, "apply", apply)  # loss_fn calls the module's apply
      return jax.jit(jax.value_and_grad(lambda p: dit.loss_fn(p, cfg, batch, jax.random.key(3))[0]))(params)

  (loss, grads), (ref_loss, ref_grads) = loss_and_grads(dit.apply), loss_and_grads(reference.apply)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  assert _relative_error(grads, ref_grads) < 1e-5


def test_init_draws_from_the_handwritten_distributions():
  """Flax draws other values than the old per-leaf key split (each block's from its own split key, under
  nnx.vmap), from the same distributions: kernels a normal clipped to +-2 over sqrt(fan_in), modulation tables
  normal / sqrt(width), embedding tables standard normal, biases zero, norm scales one; and layers differ."""
  cfg = config_lib.get_model_config("tiny")
  new, old = (_by_path(init(jax.random.key(0), cfg)) for init in (dit.init, reference.init))
  specs = _by_path(reference.param_specs(cfg), lambda x: isinstance(x, reference.ParamSpec))
  for path, spec in specs.items():
    if spec.init in ("zeros", "ones"):
      np.testing.assert_array_equal(new[path], np.full(spec.shape, 1.0 if spec.init == "ones" else 0.0),
                                    err_msg=path)
      continue
    if spec.init == "normal":
      assert float(jnp.max(jnp.abs(new[path]))) <= 2.0 * spec.scale / np.sqrt(spec.fan_in) * (1 + 1e-6), path
    if new[path].size >= 2000:  # enough draws for the standard deviation to be within 5%
      assert float(jnp.std(new[path])) == pytest.approx(float(jnp.std(old[path])), rel=0.05), path
  kernel = new["['blocks']['mlp']['fc1']['kernel']"]
  assert not np.allclose(kernel[0], kernel[1])  # each layer its own draw
  assert not np.allclose(kernel, old["['blocks']['mlp']['fc1']['kernel']"])


def test_denoiser_run_of_the_handwritten_code_resumes_under_flax(tmp_path, monkeypatch):
  """A denoiser workdir written by the pre-Flax code (its init and forward pass: tests/dit_reference.py) resumes
  under the Flax modules with no conversion: the step after the checkpoint logs the loss the old code logged."""
  from ap_jax.train import config_utils, trainer
  from benchmarks import crash_soak

  monkeypatch.setenv("AP_JAX_CACHE", str(tmp_path / "cache"))
  tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
  small_dit = ["--config.model.dit.width=64", "--config.model.dit.depth=2", "--config.model.dit.heads=4",
               "--config.model.dit.mlp=128", "--config.data.clip_steps=2", "--config.data.cache_latents=false"]
  config = lambda arg, extra: config_utils.apply_overrides(config_utils.load_config(f"{tiny}:{arg}"), list(
      crash_soak.SMALL_AE) + extra)
  ae_dir = str(tmp_path / "ae")
  trainer.train(config("autoencoder,runlocal", ["--config.total_steps=1"]), ae_dir, progress=False)
  denoiser = config("runlocal", small_dit + ["--config.total_steps=2", "--config.checkpoint_every=1",
                                             "--config.async_checkpointing=false",
                                             f"--config.autoencoder_workdir={ae_dir}"])
  old_dir, new_dir = str(tmp_path / "old"), str(tmp_path / "new")
  with monkeypatch.context() as patch:
    patch.setattr(dit, "init", reference.init)
    patch.setattr(dit, "apply", reference.apply)
    trainer.train(denoiser, old_dir, progress=False)
  shutil.copytree(old_dir, new_dir)
  shutil.rmtree(os.path.join(new_dir, "checkpoints", "2"))
  resumed = trainer.train(denoiser, new_dir, progress=False)
  assert [h["step"] for h in resumed["history"]] == [2]
  old_losses = crash_soak.logged_losses(old_dir)
  assert resumed["history"][0]["loss"] == pytest.approx(old_losses[2][0], rel=1e-5)
