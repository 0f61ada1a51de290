"""`ap-jax bench sampling`: autoregressive rollouts of a model with random weights (the cost does not depend on the
weights): generated frames/s and latency per generated step against players, denoising steps, batch, the KV
cache and the mesh, with the compile time of the first rollout."""

from __future__ import annotations

import time
from typing import Sequence

import jax
import numpy as np

from ap_jax import actions as A
from ap_jax.bench import common
from ap_jax.data import locate
from ap_jax.train import stages as stages_lib
from ap_jax.train import state as state_lib


def sampling_benchmark(config_name: str = "tiny", overrides: Sequence[str] = (), *, grid: Sequence[dict] | None = None,
                       steps: int = 8, repeats: int = 3, meshes: Sequence[str | None] = (None,)) -> list[dict]:
  """Rows of generated frames/s and latency per generated step. `grid`: the settings to run (players,
  denoise_steps, batch, use_cache); default a one-at-a-time sweep around (4 players, 10 steps, batch 1, cache).
  `meshes`: each grid setting runs on each mesh (`data=8`, `data=4,tensor=2`; None: one device): parameters laid
  out by their logical axes as in training, rollouts split over the batch axes (the sampler pads a batch to a
  multiple of its shards)."""
  from ap_jax import sample as sample_lib
  from ap_jax.model import vae as vae_lib
  from ap_jax.train import mesh as mesh_lib

  config = common.load_config(config_name, overrides)
  config.stage = "denoiser"
  vae_params = jax.jit(lambda key: vae_lib.vae_init(key, config.model))(jax.random.PRNGKey(1))  # one compile
  stage = stages_lib.build_stage(config, frozen=vae_params, meta=dict(latent_shift=0.0, latent_scale=1.0))
  params = jax.jit(stage.init)(jax.random.PRNGKey(0))
  base = dict(players=4, denoise_steps=10, batch=1, use_cache=True)
  if grid is None:
    grid = ([dict(base, players=p) for p in (1, 2, 4, 7)] + [dict(base, denoise_steps=k) for k in (1, 2, 4)]
            + [dict(base, batch=8), dict(base, use_cache=False)])
  h, w = locate.frame_hw(config)
  rng = np.random.default_rng(0)
  rows = []
  for mesh_text in meshes:
    mesh = rules = None
    mesh_params, mesh_vae = params, vae_params
    if mesh_text:
      mesh = mesh_lib.mesh_from_spec(mesh_text)
      rules = mesh_lib.rules_from_config(config)
      mesh_params = jax.device_put(params, state_lib.param_shardings(stage.logical_axes, stage.init, mesh, rules))
      mesh_vae = jax.device_put(vae_params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    for setting in grid:
      b, p = int(setting["batch"]), int(setting["players"])
      sampler = sample_lib.Sampler(mesh_params, stage.model_config, mesh_vae,
                                   denoise_steps=int(setting["denoise_steps"]), chunk=1,
                                   window=int(config.data.clip_steps) + 1, use_cache=bool(setting["use_cache"]),
                                   mesh=mesh, rules=rules)
      frames = rng.integers(0, 255, (b, h, w, 3)).astype(np.uint8)
      positions = rng.uniform(0, 1, (b, p, 2)) * np.array([h, w])
      actions = rng.integers(0, A.NUM_ACTIONS, (b, steps, p))
      orientations = np.zeros((b, p), np.int32)

      def run():
        out = sampler.rollout(frames, positions, actions, initial_orientations=orientations)
        np.asarray(out.frames)

      start = time.perf_counter()
      run()  # compiles every jitted piece a rollout of this length uses
      first_s = time.perf_counter() - start
      seconds = common.median_seconds(run, repeats=repeats)
      rows.append(dict(config=config_name, **setting, mesh=mesh_text or "1 device",
                       devices=mesh.devices.size if mesh is not None else 1, steps=steps, first_rollout_s=first_s,
                       rollout_s=seconds, latency_per_step_s=seconds / steps, frames_per_s=b * steps / seconds,
                       compiled_functions=len(sampler._jitted)))  # pylint: disable=protected-access
  return rows


def sampling_table(rows: list[dict]) -> str:
  lines = ["| config | mesh | players | denoise steps | batch | KV cache | first rollout s | ms / generated step | "
           "frames/s | compiled fns |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['config']} | {r.get('mesh', '1 device')} | {r['players']} | {r['denoise_steps']} | "
                 f"{r['batch']} | "
                 f"{'on' if r['use_cache'] else 'off'} | {r['first_rollout_s']:.1f} | "
                 f"{1e3 * r['latency_per_step_s']:.1f} | {r['frames_per_s']:.1f} | {r['compiled_functions']} |")
  return "\n".join(lines)
