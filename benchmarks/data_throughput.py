"""Data throughput: built-in game environment steps per second (vmapped, rendering included) and Grain pipeline
batches per second, at the tiny config and a larger one. Prints a table and writes JSON. (`ap-jax bench data`
measures the pipeline per source and worker count against the training step's consumption.)

  python benchmarks/data_throughput.py [--out benchmarks/results/data_throughput.json] [--quick]

An environment step is one episode advancing one step with every player acting and the frame rendered.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax

from ap_jax.bench.data import game_steps_per_second
from ap_jax.data import dataset, pipeline, tfds_builder


def pipeline_batches_per_second(data_dir: str, batch: int, clip: int, batches: int, live_spec=None) -> dict:
  config = pipeline.PipelineConfig(clip_steps=clip, global_batch_size=batch, read_threads=2)
  source = pipeline.LiveEpisodeSource(live_spec, chunk=64) if live_spec else dataset.open_split(data_dir, "train")
  it = iter(pipeline.make_dataset(source, config, process_index=0, process_count=1))
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  seconds = time.perf_counter() - start
  return dict(batch=batch, clip_steps=clip, frame_hw=list(b["frames"].shape[2:4]),
              source="live" if live_spec else "arrayrecord", batches_per_s=batches / seconds,
              clips_per_s=batches * batch / seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="benchmarks/results/data_throughput.json")
  parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
  args = parser.parse_args()
  repeats = 1 if args.quick else 3
  results = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                              backend=jax.default_backend()), game=[], pipeline=[])
  for episodes, grid in [(256, 8), (1024, 8), (256, 16)]:
    results["game"].append(game_steps_per_second(episodes, 32, grid, 4, repeats))
  with tempfile.TemporaryDirectory() as tmp:
    small = dataset.build(tfds_builder.GenerationSpec(episodes=300, steps=16), os.path.join(tmp, "tiny"))
    large = dataset.build(tfds_builder.GenerationSpec(episodes=300, steps=16, grid_hw=(16, 16)),
                          os.path.join(tmp, "large"))
    n = 20 if args.quick else 100
    results["pipeline"].append(dict(config="tiny", **pipeline_batches_per_second(small, 8, 4, n)))
    results["pipeline"].append(dict(config="larger", **pipeline_batches_per_second(large, 64, 4, n // 4)))
    results["pipeline"].append(dict(config="tiny-live", **pipeline_batches_per_second(
        "", 8, 4, n, live_spec=tfds_builder.GenerationSpec(steps=16))))

  print("\nBuilt-in game (vmapped rollouts, rendering included)")
  print(f"{'episodes':>8} {'grid':>5} {'frame':>8} {'steps':>5} {'env steps/s':>12}")
  for r in results["game"]:
    print(f"{r['episodes']:>8} {r['grid']:>5} {'x'.join(map(str, r['frame_hw'])):>8} {r['steps']:>5} "
          f"{r['env_steps_per_s']:>12,.0f}")
  print("\nGrain pipeline")
  print(f"{'config':>10} {'source':>12} {'batch':>5} {'frame':>8} {'batches/s':>10} {'clips/s':>9}")
  for r in results["pipeline"]:
    print(f"{r['config']:>10} {r['source']:>12} {r['batch']:>5} {'x'.join(map(str, r['frame_hw'])):>8} "
          f"{r['batches_per_s']:>10.1f} {r['clips_per_s']:>9.0f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
