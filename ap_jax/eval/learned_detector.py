"""Learned detectors for Melting Pot: `meltingpot_detector(substrate, players, canvas_hw)` fits a
`template_detector.TemplateDetector` (see there for how it reads frames and what it reports as unreadable) on
uniformly random rollouts with seeds of their own (`FIT_SEED_OFFSET`), checks it on other rollouts
(`CHECK_SEED_OFFSET`), and caches it in memory and on disk (`dataset_cache_dir()/detectors`).
`python -m ap_jax.eval.learned_detector --substrates a,b` prints each one's accuracy on true frames.

Why learned, not drawn: Melting Pot has 49 substrates, each with its own avatar sprites, ground, objects, beams and
palettes, and the built-in detector's hand-built templates (`ap_jax.eval.detector`) cover only the built-in game.
But the environment tells us, for every frame it renders, where each avatar is and which way it faces
(`meltingpot.rollout`), so the templates come from the frames themselves.

`Grid`, `player_visible` (`ap_jax.eval.cell_grid`) and `TemplateDetector` are importable from here too, as before
the detector was split out.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ap_jax.data import locate
from ap_jax.eval.cell_grid import Grid, player_visible  # noqa: F401  (player_visible: replay's import path)
from ap_jax.eval.template_detector import DETECTOR_VERSION, TemplateDetector

log = logging.getLogger("ap_jax.eval")

# Seeds of the fitting and checking rollouts: disjoint from the dataset splits (0, 1e8, 2e8 + i), live training
# episodes (3e8) and fresh evaluation episodes (4e8).
FIT_SEED_OFFSET = 700_000_000
CHECK_SEED_OFFSET = 710_000_000


def meltingpot_grid(world_hw: tuple[int, int], canvas_hw: tuple[int, int], sprite_size: int) -> Grid:
  """The grid of a Melting Pot world view of `world_hw` px placed on the canvas as the dataset places it."""
  from ap_jax.data import meltingpot

  k, (top, left) = meltingpot.canvas_layout(tuple(world_hw), tuple(canvas_hw), sprite_size)
  return Grid(cell_size=sprite_size // k, top=int(top), left=int(left), rows=int(world_hw[0]) // sprite_size,
              cols=int(world_hw[1]) // sprite_size)


def _random_rollouts(substrate: str, num_players: int, canvas_hw: tuple[int, int], seeds: Sequence[int],
                     steps: int) -> list[dict[str, Any]]:
  from ap_jax.data import meltingpot
  from ap_jax.eval import replay

  out = []
  for seed in seeds:
    rng = np.random.default_rng(int(seed))
    actions = meltingpot.sample_actions(rng, steps, num_players, "uniform")
    out.append(replay.replay_meltingpot(substrate, int(seed), actions, canvas_hw))
  return out


def _stack(truths: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, ...]:
  return (np.concatenate([t["frames"] for t in truths]), np.concatenate([t["cells"] for t in truths]),
          np.concatenate([t["orientations"] for t in truths]), np.concatenate([t["visible"] for t in truths]))


def detector_cache_dir() -> str:
  return os.path.join(locate.dataset_cache_dir(), "detectors")


@functools.lru_cache(maxsize=32)
def meltingpot_detector(substrate: str, num_players: int, canvas_hw: tuple[int, int], *, fit_episodes: int = 8,
                        check_episodes: int = 4, steps: int = 40, cache: bool = True) -> TemplateDetector:
  """The detector of `substrate` with `num_players` players on a `canvas_hw` canvas: fitted on `fit_episodes`
  uniformly random rollouts of `steps` steps, its accuracy checked on `check_episodes` others (`info['check']`).
  Cached on disk; needs the meltingpot extra on first use."""
  canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
  name = f"{substrate}-{num_players}p-{canvas_hw[0]}x{canvas_hw[1]}"
  path = os.path.join(detector_cache_dir(), f"{name}-fit{fit_episodes}x{steps}-v{DETECTOR_VERSION}.npz")
  if cache and os.path.exists(path):
    try:
      return TemplateDetector.load(path)
    except (ValueError, OSError, KeyError) as e:
      log.warning("could not read the cached detector %s (%s): fitting it again", path, e)
  fit = _random_rollouts(substrate, num_players, canvas_hw,
                         [FIT_SEED_OFFSET + 1000 * num_players + i for i in range(fit_episodes)], steps)
  # Identity is by colour. Some substrates draw the players' colours per episode (coins): fit on the episodes that
  # share the first one's colours, and say so; such a detector reads only episodes of those colours.
  same = [t for t in fit if np.array_equal(t["colors"], fit[0]["colors"])]
  det = TemplateDetector.fit(*_stack(same), fit[0]["colors"], fit[0]["grid"], name=name)
  det.info["colours_vary_by_episode"] = len(same) < len(fit)
  check = _random_rollouts(substrate, num_players, canvas_hw,
                           [CHECK_SEED_OFFSET + 1000 * num_players + i for i in range(check_episodes)], steps)
  check = [t for t in check if np.array_equal(t["colors"], det.colors)] or check[:0]
  det.info["check"] = det.accuracy(*_stack(check)) if check else dict(
      player_accuracy=None, false_detections=0.0, player_instances=0, skipped_instances=0, groups=[],
      facing_unreadable=[], note="no check episode has the fitted colours")
  acc = det.info["check"]["player_accuracy"]
  log.info("fitted the %s detector on %d frames: %d background tiles, accuracy %s on %d held-out player "
           "instances%s", name, det.info["fit_frames"], det.info["background_tiles"],
           "n/a" if acc is None else f"{acc:.4f}",
           det.info["check"]["player_instances"],
           f", look-alike players {det.info['check']['groups']}" if det.info["check"]["groups"] else "")
  if cache:
    det.save(path)
  return det


def _main(argv: Sequence[str] | None = None) -> None:
  import argparse
  import json

  parser = argparse.ArgumentParser(description="Fit Melting Pot detectors and print their accuracy on true frames "
                                   "of held-out random rollouts.")
  parser.add_argument("--substrates", required=True, help="comma-separated substrate names")
  parser.add_argument("--players", type=int, default=None, help="players (default: each substrate's smallest "
                      "count of at least 2)")
  parser.add_argument("--canvas", default="64x64", help="HxW canvas in pixels")
  parser.add_argument("--out", default=None, help="write the table as JSON here")
  args = parser.parse_args(argv)
  from ap_jax.data import meltingpot_substrates

  canvas = tuple(int(v) for v in args.canvas.split("x"))
  rows = {}
  print("| substrate | players | cell px | accuracy | false detections | instances | look-alike | facing unreadable |")
  print("|---|---|---|---|---|---|---|---|")
  for substrate in [s for s in args.substrates.split(",") if s]:
    counts = meltingpot_substrates.player_counts(substrate)
    n = args.players or next((c for c in counts if c >= 2), counts[0])
    det = meltingpot_detector(substrate, n, canvas)
    chk = det.info["check"]
    rows[substrate] = dict(players=n, cell_size=det.grid.cell_size, **chk)
    acc = "-" if chk["player_accuracy"] is None else f"{chk['player_accuracy']:.4f}"
    print(f"| {substrate} | {n} | {det.grid.cell_size} | {acc} | {chk['false_detections']:.4f} | "
          f"{chk['player_instances']} | {chk['groups'] or '-'} | {chk['facing_unreadable'] or '-'} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(canvas=list(canvas), results=rows), f, indent=2)


if __name__ == "__main__":
  _main()
