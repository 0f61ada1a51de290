"""`ap-jax data` (generate a dataset) and `ap-jax show` (render a recorded episode)."""

from __future__ import annotations

import logging
import os
import time

from ap_jax.cli import args as args_lib

log = logging.getLogger("ap_jax")


# ------------------------------------------------------------------------------------------------ data


def add_data(sub):
  p = sub.add_parser("data", help="generate multi-player rollouts into a TFDS ArrayRecord dataset",
                     description="Generate rollouts of the built-in game or Melting Pot substrates (random or "
                     "sticky-random play) and write them as a TFDS dataset in ArrayRecord format with "
                     "train/validation/test splits by episode seed. The dataset appears at --out only when complete.")
  p.add_argument("--source", choices=("builtin", "meltingpot"), default="builtin")
  p.add_argument("--substrates", default="",
                 help="comma-separated Melting Pot substrates (meltingpot) or layouts (builtin: "
                 "open,rooms,corridors,random); empty = all")
  p.add_argument("--episodes", type=int, default=1000, help="episodes over all splits (80/10/10)")
  p.add_argument("--steps", type=int, default=16, help="actions per episode (frames = steps + 1)")
  p.add_argument("--players", type=args_lib.players, default=(2, 4), help="player count range MIN-MAX per episode")
  p.add_argument("--grid", type=args_lib.hw, default=(8, 8), help="built-in map size in cells, HxW")
  p.add_argument("--cell-size", type=int, default=8, help="built-in pixels per cell (Melting Pot uses 8)")
  p.add_argument("--canvas", type=args_lib.hw, default=(256, 256), help="Melting Pot frame canvas in pixels, HxW")
  p.add_argument("--policy", choices=("uniform", "sticky"), default="sticky")
  p.add_argument("--sticky-p", type=float, default=0.7, help="probability of repeating the last action")
  p.add_argument("--seed", type=int, default=0, help="base seed: episode seeds are derived from it per split")
  p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                 help="processes generating Melting Pot episodes")
  p.add_argument("--out", required=True, help="dataset directory to create (a local path or gs://BUCKET/...)")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  p.add_argument("--beam-runner", default=None,
                 help="generate through Apache Beam (TFDS's Beam support; the `beam` extra): DirectRunner here, "
                 "DataflowRunner, FlinkRunner or SparkRunner on a cluster")
  p.add_argument("--beam-options", default="",
                 help="the runner's pipeline flags as one string after `=`, e.g. --beam-options=\"--direct_num_workers=4 "
                 "--direct_running_mode=multi_processing\"")
  p.set_defaults(func=cmd_data)


def cmd_data(args) -> int:
  from ap_jax.data import dataset, tfds_builder

  spec = tfds_builder.GenerationSpec(
      source=args.source, substrates=tuple(s for s in args.substrates.split(",") if s), episodes=args.episodes,
      steps=args.steps, players=args.players, grid_hw=args.grid, cell_size=args.cell_size,
      canvas_hw=args.canvas, policy=args.policy, sticky_p=args.sticky_p, seed=args.seed, workers=args.workers)
  start = time.time()
  log.info("generating %d %s episodes of %d steps into %s", spec.episodes, spec.source, spec.steps, args.out)
  path = dataset.build(spec, args.out, overwrite=args.overwrite, beam_runner=args.beam_runner,
                       beam_options=args.beam_options)
  info = dataset.read_info(path)
  sizes = {s: info.num_episodes(s) for s in sorted(info.split_files)}
  elapsed = time.time() - start
  print(f"wrote {path}: {sizes} episodes in {elapsed:.1f}s "
        f"({spec.episodes * spec.steps / elapsed:.0f} env steps/s including encoding)")
  return 0


# ------------------------------------------------------------------------------------------------ show


def add_show(sub):
  p = sub.add_parser("show", help="render a recorded episode with its labels drawn over, as MP4 or GIF",
                     description="Render episode K of a dataset split with each player's recorded position "
                     "(ring in its colour), facing (line) and next action drawn over the frames.")
  p.add_argument("dataset", help="dataset directory written by `ap-jax data`")
  p.add_argument("--split", default="train")
  p.add_argument("--episode", type=int, default=0, help="episode index K within the split")
  p.add_argument("--scale", type=int, default=4, help="pixel upscaling for viewing")
  p.add_argument("--fps", type=float, default=4.0)
  p.add_argument("--out", required=True, help="output .mp4 or .gif")
  p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
  from ap_jax import viz
  from ap_jax.data import dataset

  source = dataset.open_split(args.dataset, args.split)
  if not 0 <= args.episode < len(source):
    raise ValueError(f"--episode {args.episode}: split {args.split!r} of {args.dataset} has episodes "
                     f"0 to {len(source) - 1}")
  episode = source[args.episode]
  frames = viz.annotate_episode(episode, scale=args.scale)
  viz.write_video(frames, args.out, fps=args.fps)
  print(f"wrote {args.out}: episode {args.episode} (seed {episode['seed']}, {episode['substrate']}, "
        f"{episode['actions'].shape[1]} players, {len(frames)} frames)")
  return 0
