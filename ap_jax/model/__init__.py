"""The ActionParty model: per-frame VAE, causal DiT denoiser with subject tokens, flow matching.

Public API (pure functions over plain parameter pytrees):
  config.get_model_config(name)                      "tiny" | "small" | "base"
  dit.init(rng, config) -> params                    denoiser parameters
  dit.param_logical_axes(config) -> PartitionSpec tree of logical names, same structure as params
  dit.apply(params, config, inputs) -> {"video", "coords"} velocities
  dit.training_inputs / dit.loss_fn(params, config, batch, rng) -> (loss, metrics)
  sharding.logical_sharding(mesh, rules), sharding.constrain(x, names), sharding.tree_shardings(...)
  flow.*                                             rectified-flow schedule, time sampling, noising, loss
"""

from ap_jax.model import attention, config, dit, flow, layers, rope, sharding
from ap_jax.model.config import get_model_config
