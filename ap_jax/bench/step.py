"""`ap-jax bench step`: the denoiser's training step (forward, backward, AdamW, EMA) per config, compiled on this
process's devices with a random batch. `training_step` builds it (the profile, peer and scaling benchmarks time
the same step)."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from ap_jax import actions as A
from ap_jax.bench import common
from ap_jax.data import locate
from ap_jax.train import stages as stages_lib
from ap_jax.train import state as state_lib


class TrainingStep(NamedTuple):
  """A compiled denoiser training step with its inputs in place."""

  config: Any  # the config, overrides applied, stage "denoiser"
  stage: stages_lib.Stage
  mesh: jax.sharding.Mesh
  abstract: Any  # the abstract train state (shapes, dtypes, shardings)
  step_fn: Any  # the compiled step (state, batch, frozen) -> (state, metrics)
  analysis: dict  # XLA's memory and FLOPs figures (`state.analyse`)
  compile_s: float  # seconds to lower and compile the step
  one_step: Callable[[], None]  # runs one step on the held state and random batch, and waits for it


def random_batch(shapes: dict, config, rng: np.random.Generator) -> dict[str, jax.Array]:
  """A batch of the step's shapes: random latents/frames, actions, positions inside the frame, 2..P players."""
  h, w = locate.frame_hw(config)
  out = {}
  for key, s in shapes.items():
    if key in ("latents", "frames"):
      value = rng.uniform(-1, 1, s.shape)
    elif key == "actions":
      value = rng.integers(0, A.NUM_ACTIONS, s.shape)
    elif key == "positions":
      value = rng.uniform(0, 1, s.shape) * np.array([h, w])
    elif key == "orientations":
      value = rng.integers(0, A.NUM_ORIENTATIONS, s.shape)
    elif key == "player_mask":
      value = np.arange(s.shape[1])[None] < rng.integers(2, s.shape[1] + 1, (s.shape[0], 1))
    else:
      raise KeyError(f"no random batch for key {key!r}")
    out[key] = jax.device_put(np.asarray(value, s.dtype), s.sharding)
  return out


def training_step(config_name: str, overrides: Sequence[str] = ()) -> TrainingStep:
  """The denoiser training step of `config_name` (with `overrides`) on this process's devices, compiled, with a
  random batch and random autoencoder weights (the cost does not depend on the weights)."""
  from ap_jax.model import vae as vae_lib
  from ap_jax.train import mesh as mesh_lib, optim as optim_lib

  config = common.load_config(config_name, overrides)
  config.stage = "denoiser"
  mesh = mesh_lib.build_mesh(config.mesh)
  rules = mesh_lib.rules_from_config(config)
  mesh_lib.check_batch(int(config.data.global_batch_size), mesh, rules)
  vae_params = jax.jit(lambda key: vae_lib.vae_init(key, config.model))(jax.random.PRNGKey(1))  # one compile
  stage = stages_lib.build_stage(config, frozen=vae_params, meta=dict(latent_shift=0.0, latent_scale=1.0))
  tx, schedule = optim_lib.build_optimizer(config.optim, int(config.total_steps))
  init_fn, shardings, abstract = state_lib.build_state(config, stage, tx, mesh, rules)
  start = time.perf_counter()
  step_fn, analysis, frozen_shardings = state_lib.build_step(config, stage, tx, schedule, mesh, rules, shardings,
                                                           abstract)
  compile_s = time.perf_counter() - start
  state = init_fn(jax.random.PRNGKey(0))
  frozen = jax.device_put(vae_params, frozen_shardings)
  batch = random_batch(state_lib.batch_shapes(config, stage.batch_keys, mesh, rules), config,
                       np.random.default_rng(0))
  holder = [state]

  def one_step():
    holder[0], metrics = step_fn(holder[0], batch, frozen)
    jax.block_until_ready(metrics["loss"])

  return TrainingStep(config=config, stage=stage, mesh=mesh, abstract=abstract, step_fn=step_fn, analysis=analysis,
                      compile_s=compile_s, one_step=one_step)


def step_benchmark(config_name: str, overrides: Sequence[str] = (), *, repeats: int = 5, inner: int = 5) -> dict:
  """One row: the denoiser training step of `config_name` (with `overrides`) on this process's devices."""
  from ap_jax.model import layers as layers_lib

  step = training_step(config_name, overrides)
  config, stage, mesh = step.config, step.stage, step.mesh
  step.one_step()  # warm-up
  seconds = common.median_seconds(step.one_step, repeats=repeats, inner=inner)
  b = int(config.data.global_batch_size)
  flops = stages_lib.analytic_step_flops(config, stage)
  device = jax.devices()[0]
  peak = state_lib.peak_flops(device)
  memory = (step.analysis.get("memory_bytes_per_device") or {}).get("total")
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return dict(config=config_name, overrides=list(overrides), batch=b, clip_steps=int(config.data.clip_steps),
              frame_hw=list(locate.frame_hw(config)), subject_tokens=bool(config.model.dit.subject_tokens),
              dtype=str(config.model.dit.get("dtype", "float32")), devices=mesh.devices.size,
              parameters=layers_lib.count_params(step.abstract["params"]),
              step_s=seconds, examples_per_s=b / seconds,
              tokens_per_s=b * stages_lib.tokens_per_example(config, stage) / seconds,
              flops_per_step=flops, achieved_flops_per_s=flops / seconds,
              mfu=(flops / mesh.devices.size / seconds / peak) if peak else None, compile_s=step.compile_s,
              compiled_memory_bytes=memory,
              peak_memory_bytes=(stats or {}).get("peak_bytes_in_use"))


def step_table(rows: list[dict]) -> str:
  fmt = common.fmt
  lines = ["| config | batch | subjects | dtype | params | step ms | examples/s | tokens/s | GFLOP/s | MFU | "
           "compiled MiB | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mem = r["compiled_memory_bytes"]
    lines.append(f"| {r['config']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''} | {r['batch']} | "
                 f"{'on' if r['subject_tokens'] else 'off'} | {r['dtype']} | {r['parameters']:,} | "
                 f"{1e3 * r['step_s']:.1f} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['achieved_flops_per_s'] / 1e9:.1f} | {fmt(r['mfu'], '.1%')} | "
                 f"{fmt(mem and mem / 2**20, '.0f')} | {fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**20, '.0f')} |")
  return "\n".join(lines)
