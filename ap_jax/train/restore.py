"""Trained weights for inference: a denoiser workdir's EMA parameters and the autoencoder it was trained on.

  load_trained(workdir, mesh=None, rules=None) -> TrainedModel   (sampling and evaluation)
  load_autoencoder(config, mesh, rules) -> (EMA parameters, meta)  (the denoiser's frozen first stage)

Only the weights are read (a partial restore of the checkpoint's `state`): no optimizer is built and Adam's moments
stay on disk, so loading a model costs its parameters' memory, not three times that. The arrays read are checked
against the checksums written with them, and a checkpoint that does not restore is skipped for the previous one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ap_jax import fs
from ap_jax.train import checkpoint as checkpoint_lib
from ap_jax.train import config_utils
from ap_jax.train import mesh as mesh_lib
from ap_jax.train import stages as stages_lib
from ap_jax.train import state as state_lib
from ap_jax.train.errors import TrainError

log = logging.getLogger("ap_jax.train")


def _read_weights(ckpt: checkpoint_lib.Checkpointer, stage: stages_lib.Stage, mesh, rules, which: str):
  """(step, parameters, meta) of the newest checkpoint that restores: `which` is 'ema' or 'params'."""
  shardings = state_lib.param_shardings(stage.logical_axes, stage.init, mesh, rules)
  shapes = jax.eval_shape(stage.init, jax.random.PRNGKey(0))
  if which == "ema":  # the EMA is kept in float32 whatever the parameters' dtype
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
  abstract = {which: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                  shardings)}
  found = ckpt.restore_latest_part(abstract)
  if found is None:
    return None
  step, part, meta = found
  return step, part[which], meta


def load_autoencoder(config, mesh, rules) -> tuple[Any, dict]:
  """The trained autoencoder's EMA parameters and its checkpoint's meta, from `config.autoencoder_workdir`."""
  ae_dir = config.autoencoder_workdir
  if not ae_dir:
    raise TrainError("stage 'denoiser' needs --config.autoencoder_workdir=DIR, the workdir of a trained "
                     "autoencoder run (`ap-jax train --config ... --config.stage=autoencoder`)")
  if not fs.isdir(ae_dir):
    raise TrainError(f"autoencoder_workdir {ae_dir} does not exist")
  ae_config = ml_collections.ConfigDict(config.to_dict())
  ae_config.stage = "autoencoder"
  stage = stages_lib.build_stage(ae_config)
  with checkpoint_lib.Checkpointer(ae_dir, read_only=True) as ckpt:
    found = ckpt.latest_meta()
    if found is None:
      raise TrainError(f"autoencoder_workdir {ae_dir} holds no checkpoint yet: train the autoencoder there first")
    _, meta = found
    if meta.get("fingerprint") != config_utils.model_fingerprint(ae_config):
      raise TrainError(f"autoencoder_workdir {ae_dir} holds an autoencoder of another shape (fingerprint "
                       f"{meta.get('fingerprint')}, this config's autoencoder is "
                       f"{config_utils.model_fingerprint(ae_config)})")
    restored = _read_weights(ckpt, stage, mesh, rules, "ema")
  if restored is None:
    raise TrainError(f"autoencoder_workdir {ae_dir}: no checkpoint restores cleanly (see the warnings above)")
  step, params, meta = restored
  log.info("loaded autoencoder EMA parameters from %s (step %d)", ae_dir, step)
  return params, meta


@dataclasses.dataclass
class TrainedModel:
  """What sampling and evaluation need from a trained denoiser workdir (and the autoencoder it points at)."""

  config: ml_collections.ConfigDict  # the training config (data, model, ...)
  model_config: ml_collections.ConfigDict  # with the latent statistics filled in
  params: Any  # denoiser EMA parameters
  vae_params: Any  # autoencoder EMA parameters
  step: int


def load_trained(workdir: str, mesh=None, rules=None, *, use_ema: bool = True) -> TrainedModel:
  """Loads a trained denoiser (EMA weights by default) and its autoencoder, laid out on `mesh` (default: one
  device, replicated), for sampling and evaluation."""
  if not fs.isdir(workdir):
    raise TrainError(f"workdir {workdir} does not exist")
  with checkpoint_lib.Checkpointer(workdir, read_only=True) as ckpt:
    found = ckpt.latest_meta()
    if found is None:
      raise TrainError(f"{workdir} holds no checkpoint yet: train a denoiser there first (`ap-jax train`)")
    _, meta = found
    if meta.get("stage") != "denoiser":
      raise TrainError(f"{workdir} holds a {meta.get('stage')!r} checkpoint; sampling needs a denoiser workdir")
    config = ml_collections.ConfigDict(meta["config"])
    if mesh is None:  # one device (and one slice)
      for axis in mesh_lib.MESH_AXES:
        config.mesh[axis] = 1
        if f"dcn_{axis}" in config.mesh:
          config.mesh[f"dcn_{axis}"] = 1
      mesh = mesh_lib.single_device_mesh()
    rules = rules or mesh_lib.rules_from_config(config)
    vae_params, _ = load_autoencoder(config, mesh, rules)
    stage = stages_lib.build_stage(config, frozen=vae_params, meta=meta)
    found = _read_weights(ckpt, stage, mesh, rules, "ema" if use_ema else "params")
  if found is None:
    raise TrainError(f"{workdir}: no checkpoint restores cleanly (see the warnings above)")
  step, params, _ = found
  return TrainedModel(config=config, model_config=stage.model_config, params=params, vae_params=vae_params,
                      step=step)
