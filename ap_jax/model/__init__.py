"""The ActionParty model: per-frame VAE, causal DiT denoiser with subject tokens, flow matching.

Public API (pure functions over plain parameter pytrees; see ap_jax/model/README.md):
  get_model_config(name)                                  "tiny" | "small" | "base" ConfigDict
  vae.vae_init(rng, config) -> params                     stage 1: per-frame conv VAE
  vae.vae_encode(params, config, frames_BTHWC, rng=None) -> latents_BThwc
  vae.vae_decode(params, config, latents_BThwc) -> frames_BTHWC
  vae.vae_loss(params, config, frames_BTHWC, rng) -> (loss, metrics)
  vae.vae_logical_axes(config)
  dit.init(rng, config) -> params                         stage 2: latent denoiser
  dit.param_logical_axes(config) -> PartitionSpec tree of logical names, same structure as params
  dit.apply(params, config, inputs, cache=None, return_cache=False) -> {"video", "coords"[, "cache"]}
  dit.trim_cache(cache, keep_frames)                      sliding window over the KV cache
  dit.predict(params, config, batch, times, rng)          apply on a batch noised to the given times
  dit.null_action_id(config)                              the "no action" id (guidance)
  dit.loss_fn(params, config, batch, rng) -> (loss, metrics)
  dit.training_inputs(config, batch, rng, times=None) -> (inputs, targets, times)
  dit.positions_to_coords / coords_to_positions / coords_to_token_grid
  flow.*                                                  schedule, time sampling, noising, loss, Euler step
  flops.denoiser_train_step_flops / vae_train_step_flops  analytic FLOPs
  sharding.logical_sharding(mesh, rules), sharding.constrain(x, names), sharding.tree_shardings(axes, mesh, rules)
  modules.init_params / param_logical_axes / graphdef / bind / clipped_normal  the Flax NNX boundary
  (the modules: vae.VAE; dit_model.DiT built of dit_blocks.Block, Attention, Head; subjects: the subject state)
"""

from ap_jax.model import attention, config, dit, flops, flow, layers, modules, rope, sharding, vae
from ap_jax.model.config import get_model_config
