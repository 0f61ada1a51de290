"""Environment steps per second of `ap_jax.data.meltingpot.generate_episode`, on one core.

Two numbers per substrate, since building a DMLab2D environment (once per episode) costs far more than a step:
  episode steps/s  steps / wall time of a whole `generate_episode` call (build + steps + canvas), the rate a
                   dataset build sees per worker process;
  stepping steps/s steps / time of the act + advance + observe calls alone, the marginal rate of one more step.

  python benchmarks/meltingpot_steps.py [--substrates coins,commons_harvest__open] [--steps 200] [--repeats 3]
                                        [--out benchmarks/results/meltingpot_steps.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from ap_jax.data import meltingpot as M
from ap_jax.data import meltingpot_env
from ap_jax.data import meltingpot_substrates


def _build_and_step_seconds(substrate: str, num_players: int, steps: int, seed: int) -> tuple[float, float]:
  """(seconds to build settings and start a fresh environment, seconds for `steps` act+advance+observe calls),
  timed separately with the same calls generate_episode makes."""
  env_seed, episode_seed, settings_seed, rng = M._seeds(seed)  # pylint: disable=protected-access
  actions = M.sample_actions(rng, steps, num_players)
  start = time.perf_counter()
  episode = meltingpot_env.EpisodeSettings(substrate, num_players, settings_seed)
  env = episode.start(env_seed, episode_seed)
  built = time.perf_counter()
  vectors, players = episode.action_vectors(env), np.arange(num_players)
  for t in range(steps):
    env.act_discrete(vectors[players, actions[t]].sum(axis=0))
    env.advance()
    meltingpot_env.observe(env, num_players)
  return built - start, time.perf_counter() - built


def measure(substrate: str, num_players: int, steps: int, repeats: int, canvas_hw: tuple[int, int]) -> dict:
  M.generate_episode(substrate, num_players, 2, seed=0, canvas_hw=canvas_hw)  # Warm caches (Lua copy, configs).
  episode_s, build_s, step_s = [], [], []
  for r in range(repeats):
    start = time.perf_counter()
    ep = M.generate_episode(substrate, num_players, steps, seed=1000 + r, canvas_hw=canvas_hw)
    episode_s.append(time.perf_counter() - start)
    build, stepping = _build_and_step_seconds(substrate, num_players, int(ep["actions"].shape[0]), seed=1000 + r)
    build_s.append(build)
    step_s.append(stepping)
  played = int(ep["actions"].shape[0])
  episode_time, build_time, step_time = (float(np.median(x)) for x in (episode_s, build_s, step_s))
  return {
      "substrate": substrate,
      "players": num_players,
      "steps": played,
      "canvas_hw": list(canvas_hw),
      "episode_seconds": episode_time,
      "build_seconds": build_time,
      "stepping_seconds": step_time,
      "episode_steps_per_s": played / episode_time,
      "stepping_steps_per_s": played / step_time,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--substrates", default="coins,commons_harvest__open",
                      help="comma-separated substrate names; each runs with its default player count (max 8)")
  parser.add_argument("--steps", type=int, default=200, help="actions per episode")
  parser.add_argument("--repeats", type=int, default=3, help="episodes per substrate (the median is reported)")
  parser.add_argument("--canvas", default="128x128", help="canvas HxW in pixels")
  parser.add_argument("--out", default="benchmarks/results/meltingpot_steps.json", help="JSON results path")
  args = parser.parse_args()
  canvas_hw = tuple(int(v) for v in args.canvas.lower().split("x"))
  rows = []
  for substrate in [s for s in args.substrates.split(",") if s]:
    counts = meltingpot_substrates.player_counts(substrate)
    default = len(meltingpot_substrates.substrate_config(substrate).default_player_roles)
    players = default if default in counts else max(counts)
    rows.append(measure(substrate, players, args.steps, args.repeats, canvas_hw))
  header = f"{'substrate':<28} {'P':>2} {'steps':>5} {'build s':>8} {'episode s':>9} {'episode st/s':>12} " \
           f"{'stepping st/s':>13}"
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['substrate']:<28} {r['players']:>2} {r['steps']:>5} {r['build_seconds']:>8.3f} "
          f"{r['episode_seconds']:>9.3f} {r['episode_steps_per_s']:>12.0f} {r['stepping_steps_per_s']:>13.0f}")
  result = {
      "benchmark": "meltingpot_steps",
      "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
      "args": vars(args),
      "results": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
