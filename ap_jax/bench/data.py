"""`ap-jax bench data`: the input pipeline per source (stored episodes with frames; cached latents held in memory;
live built-in episodes) and Grain worker count, in clips/s, beside what the training step consumes (the headroom:
pipeline clips/s over the step's; below 1 the step waits for data); and the built-in game's steps/s."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ap_jax.bench import common
from ap_jax.train import inputs as inputs_lib


def pipeline_clips_per_second(source, *, batch: int, clip_steps: int, workers: int, batches: int) -> float:
  from ap_jax.data import pipeline

  config = pipeline.PipelineConfig(clip_steps=clip_steps, global_batch_size=batch, worker_count=workers,
                                   read_threads=2)
  it = iter(pipeline.make_dataset(source, config, process_index=0, process_count=1))
  try:
    for _ in range(3):  # warm-up: worker start, first reads
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch / (time.perf_counter() - start)
  finally:
    inputs_lib.close_iterator(it)


def game_steps_per_second(episodes: int, steps: int, grid: int, players: int, repeats: int = 3) -> dict:
  """Built-in game: environment steps/s of vmapped rollouts (every player acts, the frame is rendered)."""
  from ap_jax.games import gridgame as G

  config = G.GameConfig(grid_height=grid, grid_width=grid)
  keys = jax.random.split(jax.random.key(0), episodes)
  n = jnp.full((episodes,), players, jnp.int32)
  layouts = jnp.arange(episodes, dtype=jnp.int32) % len(G.LAYOUTS)

  def run():
    jax.block_until_ready(G.rollout_batch(keys, n, layouts, config=config, steps=steps)["frames"])

  run()
  seconds = common.median_seconds(run, repeats=repeats)
  return dict(episodes=episodes, steps=steps, grid=grid, players=players, frame_hw=list(config.frame_shape[:2]),
              seconds=seconds, env_steps_per_s=episodes * steps / seconds)


def data_benchmark(*, batch: int = 16, clip_steps: int = 1, workers: Sequence[int] = (0, 1, 2, 4),
                   batches: int = 40, episodes: int = 300, game_episodes: int = 256,
                   step_s: float | None = None) -> dict:
  """Pipeline clips/s per source and worker count; with `step_s` (the training step's time at this batch), the
  headroom over what the step consumes."""
  from ap_jax.data import dataset, pipeline, tfds_builder

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    spec = tfds_builder.GenerationSpec(episodes=episodes, steps=16, players=(2, 7))
    stored = dataset.open_split(dataset.build(spec, os.path.join(tmp, "data")), "train")
    latents = np.random.default_rng(0).normal(size=(len(stored), 17, 16, 16, 8)).astype(np.float32)
    sources = dict(arrayrecord_frames=stored, latents_in_memory=pipeline.LatentEpisodes(stored, latents),
                   live=pipeline.LiveEpisodeSource(spec, chunk=64))
    for name, source in sources.items():
      for n in workers:
        clips = pipeline_clips_per_second(source, batch=batch, clip_steps=clip_steps, workers=n, batches=batches)
        rows.append(dict(source=name, workers=n, batch=batch, clips_per_s=clips, ms_per_batch=1e3 * batch / clips,
                         headroom=(clips * step_s / batch) if step_s else None))
  game = [game_steps_per_second(game_episodes, 32, 8, 4), game_steps_per_second(game_episodes, 32, 16, 4)]
  return dict(pipeline=rows, step_s=step_s, game=game)


def data_table(result: dict) -> str:
  lines = ["| source | workers | batch | clips/s | ms/batch | headroom over the step |", "|---|---|---|---|---|---|"]
  for r in result["pipeline"]:
    lines.append(f"| {r['source']} | {r['workers']} | {r['batch']} | {r['clips_per_s']:,.0f} | "
                 f"{r['ms_per_batch']:.1f} | {common.fmt(r['headroom'], '.1f')} |")
  lines += ["", "| built-in game: episodes | grid | frame | steps | env steps/s |", "|---|---|---|---|---|"]
  for g in result["game"]:
    lines.append(f"| {g['episodes']} | {g['grid']} | {'x'.join(map(str, g['frame_hw']))} | {g['steps']} | "
                 f"{g['env_steps_per_s']:,.0f} |")
  return "\n".join(lines)
