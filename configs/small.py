"""Small ActionParty (DiT width 384, 8 blocks) on the built-in game at 128x128 (16x16 cells): one GPU or a small
TPU slice.

  ap-jax train --config configs/small.py:autoencoder --workdir runs/small/ae
  ap-jax train --config configs/small.py --workdir runs/small/dit --config.autoencoder_workdir=runs/small/ae

Hardware: one accelerator (bfloat16 compute, float32 master weights), data parallel over what is there.
Expected: not yet measured on an accelerator (see README).

Arguments (comma-separated after the colon, e.g. `small:autoencoder,batch=128`):
- `autoencoder`: that stage (default: the denoiser).
- `runlocal`: a smoke test (4 steps, batch 8, 30 episodes, float32).
- `batch=N`: the global batch size (default 64; 8 with runlocal).
- `steps=N`: the training steps (default 20,000 for the autoencoder, 100,000 for the denoiser; 4 with runlocal).
`batch` and `steps` win over runlocal; any other key is `--config.KEY=VALUE`.
"""

from ap_jax.train import config_utils
from ap_jax.train.defaults import base_config


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, autoencoder=False, runlocal=False, batch=int, steps=int)
  c = base_config("small")
  c.stage = "autoencoder" if arg.autoencoder else "denoiser"
  c.model.dit.dtype = "bfloat16"
  c.data.grid = (16, 16)
  c.data.episodes = 20000
  c.data.players = (2, 7)
  c.data.global_batch_size = 64
  c.total_steps = 20000 if c.stage == "autoencoder" else 100000
  c.checkpoint_every = 1000
  c.log_every = 50
  c.optim.warmup_steps = 1000
  if arg.runlocal:
    c.model.dit.dtype = "float32"
    c.data.episodes = 30
    c.data.global_batch_size = 8
    c.total_steps = 4
    c.log_every = 1
    c.checkpoint_every = 2
  if arg.batch is not None:
    c.data.global_batch_size = arg.batch
  if arg.steps is not None:
    c.total_steps = arg.steps
  return c
