"""Defaults shared by the experiment configs under configs/ (each config starts from `base_config`)."""

import ml_collections

from ap_jax.model import sharding as sharding_lib
from ap_jax.model.config import get_model_config

# Logical axis name -> mesh axes, as a config entry so that a run can change it (--config.logical_axis_rules=...)
# and checkpoints record it. The default is the model's table (ap_jax/model/sharding.py): batch over data and
# fsdp, parameters' embed dimension over fsdp (ZeRO-3), heads and MLP over tensor, the sequence over context.
DEFAULT_RULES = [(name, list(axes) if isinstance(axes, tuple) else axes)
                 for name, axes in sharding_lib.DEFAULT_RULES]


def base_config(model_name: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "denoiser"  # autoencoder | denoiser
  c.model_name = model_name
  c.model = get_model_config(model_name)
  c.autoencoder_workdir = ""  # denoiser stage: workdir of the trained autoencoder
  c.autoencoder_crop = 0  # autoencoder stage: train on random square crops of this size (0: whole frames)
  c.autoencoder_crop_on_subjects = 0.0  # ... of which this fraction is placed around a random real player
  c.seed = 0
  c.total_steps = 1000
  c.log_every = 10
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.keep_period = 0  # also keep every N-th step's checkpoint (0: off)
  c.async_checkpointing = True

  c.data = ml_collections.ConfigDict(dict(
      # builtin | meltingpot (either generated into the cache on first use) | dir (data.dir) | live
      source="builtin",
      dir="",
      substrates=(),  # meltingpot: the training substrates (builtin: layouts; empty = all)
      heldout_substrates=(),  # meltingpot: substrates kept out of training (`ap-jax eval --heldout`)
      heldout_players=(),  # their player-count range (empty: data.players)
      heldout_episodes=0,  # their dataset's episodes over all splits (0: data.episodes)
      episodes=2000,
      steps=16,
      players=(2, 4),
      grid=(8, 8),
      cell_size=8,
      frame_hw=(),  # () = grid * cell_size (built-in); the Melting Pot canvas; set for stored datasets of other sizes
      policy="sticky",
      sticky_p=0.7,
      generation_seed=0,
      clip_steps=4,
      global_batch_size=16,
      permute_players=True,
      read_threads=2,
      worker_count=0,
      prefetch_buffer_size=4,
      # Denoiser stage: encode every training episode once with the frozen autoencoder before the first step and
      # train on those latents (held in host memory), instead of encoding each batch's frames every step.
      cache_latents=False,
  ))
  # Sampling defaults that belong to the model's training (the sampler's `from_trained` reads them):
  # snap_px snaps fed-back subject coordinates to cell centres of that many pixels (0 = off); context_noise is the
  # flow time at which generated frames become context (0 = clean; training draws it from
  # [0, flow.context_noise_max], so a level inside that range is in distribution and washes out small errors).
  c.sampling = ml_collections.ConfigDict(dict(snap_px=0.0, context_noise=0.0))
  # Mesh axis sizes within a slice (one may be -1: the rest), and across slices over the data-center network
  # (dcn_*: multi-slice TPU training; all 1 on one slice or one host).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1,
                                          dcn_data=1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1))
  c.logical_axis_rules = DEFAULT_RULES
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-4,
      schedule="cosine",  # cosine | wsd | constant
      warmup_steps=100,
      final_lr_fraction=0.1,
      decay_fraction=0.2,  # wsd: fraction of steps spent decaying
      b1=0.9,
      b2=0.99,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip_norm=1.0,
      ema_decay=0.999,
  ))
  return c
