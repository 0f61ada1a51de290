"""ActionParty (small model) on Melting Pot rollouts, as in the paper: substrates with 2 to 7 players padded to 8
slots, 4-action clips.

  ap-jax data --source meltingpot --substrates coins,commons_harvest__open,clean_up --players 2-7 \
      --episodes 5000 --steps 32 --canvas 256x256 --out data/meltingpot
  ap-jax train --config configs/meltingpot.py:autoencoder --workdir runs/mp/ae
  ap-jax train --config configs/meltingpot.py --workdir runs/mp/dit --config.autoencoder_workdir=runs/mp/ae

Held-out substrates: generate a second dataset of substrates not in training (same canvas), then
  ap-jax eval --workdir runs/mp/dit --data data/meltingpot_heldout --split test --episodes 32 --steps 20 \
      --out heldout.json
and `ap-jax eval --oracle --data DIR --split test ...` gives the metric pipeline's ceiling on the same episodes.
Frames are scored by detectors learned per substrate (ap_jax/eval/learned_detector.py).

Hardware: one accelerator or a TPU slice (data parallel). Expected: not yet measured (see README).
"""

from ap_jax.train import config_utils
from ap_jax.train.defaults import base_config

ARGS = ("autoencoder", "runlocal")


def get_config(arg=None):
  args = config_utils.config_args(arg, ARGS)
  c = base_config("small")
  c.stage = "autoencoder" if "autoencoder" in args else "denoiser"
  c.model.dit.dtype = "bfloat16"
  c.data.source = "dir"
  c.data.dir = "data/meltingpot"
  c.data.frame_hw = (256, 256)
  c.data.players = (2, 7)
  c.data.global_batch_size = 32
  c.total_steps = 20000 if c.stage == "autoencoder" else 100000
  c.checkpoint_every = 1000
  c.log_every = 50
  if "runlocal" in args:
    c.model.dit.dtype = "float32"
    c.total_steps = 3
    c.log_every = 1
  return c
