"""Base ActionParty: the denoiser shaped like Wan2.1-T2V-1.3B (30 blocks, width 1536, 12 heads, MLP 8960) for TPU
pods, on Melting Pot-sized frames (256x256, VAE 8x, 16 latent channels).

  ap-jax train --config configs/base.py --workdir /mnt/gcs/runs/base/dit \
      --config.autoencoder_workdir=/mnt/gcs/runs/base/ae --config.data.source=dir --config.data.dir=DATA

Hardware: a TPU v5p-64 slice (or larger): FSDP over all chips by default (mesh fsdp=-1), bfloat16 compute,
float32 master weights, scanned blocks with `dots_with_no_batch_dims_saveable` remat. `ap-jax aot --config base
--topology v5p-64` compiles its step for a slice from any machine (PODS.md: at the paper's 512x512 frames and batch
256 it needs 94.8 GiB per chip on v5p-64 and does not fit v5p-8). Expected: not yet run at scale.

Arguments (comma-separated after the colon, e.g. `base:autoencoder,batch=512`):
- `autoencoder`: that stage (default: the denoiser).
- `runlocal`: a smoke test on CPU (a 2-block, width-128 denoiser, 3 steps, batch 8, 64x64 frames, float32).
- `batch=N`: the global batch size (default 256; 8 with runlocal).
- `steps=N`: the training steps (default 200,000; 3 with runlocal).
`batch` and `steps` win over runlocal; any other key is `--config.KEY=VALUE`.
"""

from ap_jax.train import config_utils
from ap_jax.train.defaults import base_config


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, autoencoder=False, runlocal=False, batch=int, steps=int)
  c = base_config("base")
  c.stage = "autoencoder" if arg.autoencoder else "denoiser"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.data.grid = (32, 32)  # 32 cells of 8 px = 256x256 canvas
  c.data.players = (2, 7)
  c.data.global_batch_size = 256
  c.data.worker_count = 8
  c.total_steps = 200000
  c.checkpoint_every = 2000
  c.keep_period = 20000
  c.log_every = 100
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "wsd"
  c.optim.warmup_steps = 2000
  if arg.runlocal:
    c.model.dit.depth = 2
    c.model.dit.width = 128
    c.model.dit.heads = 2
    c.model.dit.mlp = 256
    c.model.dit.dtype = "float32"
    c.data.grid = (8, 8)
    c.data.episodes = 30
    c.data.global_batch_size = 8
    c.data.worker_count = 0
    c.mesh.fsdp = -1
    c.total_steps = 3
    c.log_every = 1
    c.checkpoint_every = 3
  if arg.batch is not None:
    c.data.global_batch_size = arg.batch
  if arg.steps is not None:
    c.total_steps = arg.steps
  return c
