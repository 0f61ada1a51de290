"""Tiny ActionParty on the built-in game: trains on 2 CPU cores in minutes.

Autoencoder, then denoiser (the denoiser reads the autoencoder's workdir):

  ap-jax train --config configs/tiny.py:autoencoder --workdir runs/tiny/ae
  ap-jax train --config configs/tiny.py --workdir runs/tiny/dit --config.autoencoder_workdir=runs/tiny/ae

Hardware: 2 CPU cores (float32). First use generates the built-in dataset (2,000 episodes of 16 steps, 2-4
players, 64x64 frames) into ~/.cache/ap_jax (about 10 s). Measured on 2 CPU cores (`ap-jax demo`, 18.1 min end to
end): the autoencoder, 1,500 steps in 5.5 min (0.2 s/step; 29.4 dB PSNR on held-out frames, every player
still detected in its reconstructions); the denoiser, 1,200 steps in 12.0 min (0.55 s/step, batch 8 of 5-frame
clips). The denoiser then follows actions only rarely: movement accuracy 0.059, subject preservation 0.438 on
held-out episodes (README "The main job and the comparison").

Arguments (comma-separated after the colon): `autoencoder` selects that stage; `runlocal` shrinks the run to a
smoke test (a few steps, small batch).
"""

from ap_jax.train.defaults import base_config


def get_config(arg=None):
  args = set((arg or "").split(",")) - {""}
  c = base_config("tiny")
  c.stage = "autoencoder" if "autoencoder" in args else "denoiser"
  c.log_every = 10
  c.checkpoint_every = 100
  c.optim.warmup_steps = 50
  if c.stage == "autoencoder":
    # 32 random 32x32 crops per step (16 clips of 2 frames): the conv autoencoder learns the sprites at a
    # quarter of the cost of whole frames.
    c.total_steps = 1500
    c.autoencoder_crop = 32
    c.data.clip_steps = 1
    c.data.global_batch_size = 16
    c.optim.learning_rate = 2e-3
    c.optim.ema_decay = 0.99  # the denoiser uses the autoencoder's EMA weights: keep them close to the last
  else:
    c.total_steps = 1200
    c.data.global_batch_size = 8
    # Measured at 800 steps (README "Training the denoiser"): lr 5e-4 -> 1e-3 -> 2e-3 raised subject preservation
    # 0.22 -> 0.31 -> 0.43; coordinates leading the video by half the schedule beat plain joint denoising.
    c.optim.learning_rate = 2e-3
    c.model.flow.coord_time_lead = 0.5
  if "runlocal" in args:
    c.total_steps = 6
    c.log_every = 1
    c.checkpoint_every = 3
    c.data.episodes = 30
    c.data.global_batch_size = 8
    c.autoencoder_crop = 0
  return c
