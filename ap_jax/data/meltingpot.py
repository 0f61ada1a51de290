"""Melting Pot rollouts in the episode schema (`ap_jax.data.schema`): the paper's training data.

Needs the `meltingpot` extra (`bash launch/install_meltingpot.sh`); importing this module does not, so the rest of
ap_jax works without it. Everything that touches Melting Pot imports it on first use.

The Melting Pot code, one job per module:
  meltingpot_substrates  importing Melting Pot; substrate names and configs, allowed player counts, roles
  meltingpot_actions     the unified actions in each substrate's action set (and the Markdown table of them)
  meltingpot_env         one episode's DMLab2D environment: location observers, player colours, deterministic Lua
  meltingpot             (this module) seeds, random policies, rollouts, the canvas, schema episodes, and
                         `python -m ap_jax.data.meltingpot` (print the action table, or re-measure player counts)

How an episode is made
----------------------
A fresh DMLab2D environment is built per episode, as Melting Pot's own reset does (`meltingpot_env`); building
(0.2-1 s) dominates the cost of short episodes. The environment itself reports each player's cell and facing
(a `LocationObserver` on every avatar), so positions and facings are never guessed from pixels; `meltingpot_env`
states their conventions. Random players act in the unified action space (`meltingpot_actions` maps it onto the
substrate's actions).

Determinism: the Lua seed (`env_seed`), the seed passed to `Lab2d.start`, the settings seed and the policy's numpy
stream all derive from `seed` (`_seeds`), and the environment is built reproducibly from them (Melting Pot as
shipped is not; `meltingpot_env` says what that took), so the same arguments give the identical episode.

Frames and positions on the canvas
----------------------------------
The frame is `WORLD.RGB`: the whole map, `spriteSize` (8) pixels per cell. It is placed on a fixed canvas
`canvas_hw = (H, W)`, centred, padded with black; it is never stretched. If the map does not fit, it is first
shrunk by the smallest integer factor k in {1, 2, 4, 8} (a divisor of the sprite size, so every cell stays a whole
square of `8 // k` pixels) that makes it fit, sampling one pixel per k x k block (nearest neighbour). The episode's
`cell_size` is `8 // k`. A player's position is the pixel centre of its cell on the canvas, the same convention as
the built-in game: `offset + (cell + 0.5) * cell_size`, in continuous pixel coordinates where pixel i covers
[i, i + 1). For example `coins` (17 x 17 cells, 136 x 136 px) on a 64 x 64 canvas: k = 4, 2 px cells, a 34 x 34
image at offset (15, 15).

Removed avatars: in some substrates a player can be taken off the board for a while (zapped by fireZap in
commons_harvest, clean_up, territory, paintball; caught prey in predator_prey). Its avatar then sits in a "wait"
state with no layer, so it is not drawn, while `N.POSITION` still reports a cell (by the Lua source, its last
one). The schema has no visibility flag, so such frames carry a position with no sprite under it; a model or metric
that needs visibility should check the colour at the position. Uniform or sticky random play zaps rarely.

Players: roles are spread evenly over the substrate's default roles (`meltingpot_substrates`), in the counts it
allows (`PLAYER_COUNTS` there, re-measured by `probe_player_counts` here); each player's colour is the main colour
of its sprite (`meltingpot_env`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np

from ap_jax import actions as A
from ap_jax.data import meltingpot_actions as mp_actions
from ap_jax.data import meltingpot_env as mp_env
from ap_jax.data import meltingpot_substrates as mp_substrates
from ap_jax.data import schema

POLICIES = ("uniform", "sticky")


# --------------------------------------------------------------------------------------------------------------
# Canvas


def canvas_layout(world_hw: tuple[int, int], canvas_hw: tuple[int, int], sprite_size: int = 8
                  ) -> tuple[int, tuple[int, int]]:
  """(downscale factor k, (top, left) offset) that places a world view of `world_hw` pixels on the canvas.

  k is the smallest divisor of the sprite size that makes the view fit, so each cell stays `sprite_size // k`
  whole pixels; the shrunk view is centred.
  """
  ch, cw = (int(v) for v in canvas_hw)
  h, w = world_hw
  for k in (d for d in range(1, sprite_size + 1) if sprite_size % d == 0):
    sh, sw = -(-h // k), -(-w // k)
    if sh <= ch and sw <= cw:
      return k, ((ch - sh) // 2, (cw - sw) // 2)
  raise ValueError(
      f"canvas_hw = {tuple(canvas_hw)} is too small for a {h} x {w} px world view even at 1 px per cell "
      f"({-(-h // sprite_size)} x {-(-w // sprite_size)}); expected at least that")


def _to_canvas(world: np.ndarray, k: int, offset: tuple[int, int], canvas_hw: tuple[int, int]) -> np.ndarray:
  small = world[k // 2::k, k // 2::k] if k > 1 else world
  canvas = np.zeros((*canvas_hw, 3), np.uint8)
  top, left = offset
  canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
  return canvas


# --------------------------------------------------------------------------------------------------------------
# Episodes


def _check_args(substrate: str, num_players: int, steps: int, seed: int, policy: str, sticky_p: float,
                canvas_hw: Sequence[int]) -> None:
  mp_substrates.check_substrate(substrate)
  mp_substrates.check_num_players(substrate, num_players)
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f"steps = {steps!r}, expected an integer of at least 1")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed = {seed!r}, expected a non-negative integer")
  if policy not in POLICIES:
    raise ValueError(f"policy = {policy!r}, expected one of {', '.join(POLICIES)}")
  if not 0.0 <= sticky_p <= 1.0:
    raise ValueError(f"sticky_p = {sticky_p!r}, expected a probability in [0, 1]")
  if len(canvas_hw) != 2 or any(not isinstance(v, (int, np.integer)) or v < 1 for v in canvas_hw):
    raise ValueError(f"canvas_hw = {canvas_hw!r}, expected (height, width) in pixels, both positive integers")


def _seeds(seed: int) -> tuple[int, int, int, np.random.Generator]:
  """(Lua env_seed in [1, 2**32 - 1], Lab2d episode seed in [0, 2**31), Python `random` seed for the settings,
  policy generator), all drawn from `seed` by independent streams."""
  env_stream, policy_stream = np.random.SeedSequence(int(seed)).spawn(2)
  a, b, c = env_stream.generate_state(3)
  return 1 + int(a) % (2**32 - 1), int(b) % 2**31, int(c), np.random.default_rng(policy_stream)


def sample_actions(rng: np.random.Generator, steps: int, num_players: int, policy: str = "sticky",
                   sticky_p: float = 0.7) -> np.ndarray:
  """[steps, P] int32 unified actions: 'uniform' over the 8, or 'sticky' (repeat the last with prob. sticky_p)."""
  fresh = rng.integers(0, A.NUM_ACTIONS, size=(steps, num_players), dtype=np.int32)
  if policy == "uniform":
    return fresh
  repeat = rng.random((steps, num_players)) < sticky_p
  actions = fresh.copy()
  for t in range(1, steps):
    actions[t] = np.where(repeat[t], actions[t - 1], fresh[t])
  return actions


def rollout(substrate: str, num_players: int, actions: np.ndarray, seed: int) -> dict[str, Any]:
  """Plays given unified actions [T, P] in a seeded episode; returns the raw world views and cell states.

  Returns {'world': uint8 [T'+1, h, w, 3], 'cells': int32 [T'+1, P, 2] (y, x), 'orientations': int32 [T'+1, P],
  'sprite_size': int, 'colors': uint8 [P, 3]}, where T' < T only if the substrate ends its episode early.
  """
  dmlab2d, _, _, _ = mp_substrates.import_meltingpot()
  actions = A.check_actions(actions)
  if actions.ndim != 2 or actions.shape[1] != num_players:
    raise ValueError(f"actions has shape {actions.shape}, expected [T, {num_players}]")
  env_seed, episode_seed, settings_seed, _ = _seeds(seed)
  episode = mp_env.EpisodeSettings(substrate, num_players, settings_seed)
  env = episode.start(env_seed, episode_seed)
  vectors = episode.action_vectors(env)
  players = np.arange(num_players)
  worlds, cells, oris = [], [], []
  world, cell, ori = mp_env.observe(env, num_players)
  worlds.append(world), cells.append(cell), oris.append(ori)
  for t in range(actions.shape[0]):
    env.act_discrete(vectors[players, actions[t]].sum(axis=0))
    status, _ = env.advance()
    world, cell, ori = mp_env.observe(env, num_players)
    worlds.append(world), cells.append(cell), oris.append(ori)
    if status != dmlab2d.RUNNING:
      break
  return {
      "world": np.stack(worlds),
      "cells": np.stack(cells),
      "orientations": np.stack(oris),
      "sprite_size": episode.sprite_size,
      "colors": episode.colors,
  }


def generate_episode(substrate: str, num_players: int, steps: int, seed: int, *, policy: str = "sticky",
                     sticky_p: float = 0.7, canvas_hw: Sequence[int] = (64, 64)) -> dict[str, Any]:
  """One Melting Pot episode in the schema of `ap_jax.data.schema`, deterministic given `seed`.

  Random players (`policy` 'uniform' or 'sticky') act in the unified action space; frames are `WORLD.RGB` on a
  `canvas_hw` canvas (see the module docstring); positions and orientations are the environment's own. If the
  substrate ends its episode before `steps` actions (rare in random play: e.g. the `*_in_the_matrix__one_shot`
  game), the episode is shorter: T is the number of actions actually played.
  """
  _check_args(substrate, num_players, steps, seed, policy, sticky_p, canvas_hw)
  canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
  *_, rng = _seeds(seed)
  actions = sample_actions(rng, int(steps), int(num_players), policy, sticky_p)
  raw = rollout(substrate, int(num_players), actions, seed)
  world = raw["world"]
  k, (top, left) = canvas_layout(world.shape[1:3], canvas_hw, raw["sprite_size"])
  cell_size = raw["sprite_size"] // k
  frames = np.stack([_to_canvas(w, k, (top, left), canvas_hw) for w in world])
  positions = (np.array([top, left], np.float32) + (raw["cells"].astype(np.float32) + 0.5) * cell_size)
  episode = {
      "frames": frames,
      "actions": actions[:world.shape[0] - 1],
      "positions": positions.astype(np.float32),
      "orientations": raw["orientations"].astype(np.int32),
      "player_mask": np.ones(num_players, np.bool_),
      "colors": raw["colors"],
      "source": "meltingpot",
      "substrate": substrate,
      "seed": np.int64(seed),
      "cell_size": np.int32(cell_size),
  }
  schema.validate_episode(episode, where=f"meltingpot {substrate} seed {seed}")
  return episode


# --------------------------------------------------------------------------------------------------------------
# Measuring the player counts


def probe_player_counts(substrate: str, candidates: Sequence[int] = tuple(range(1, A.MAX_PLAYERS + 1)),
                        steps: int = 8, seed: int = 0) -> tuple[int, ...]:
  """The counts of `candidates` for which the substrate builds, starts and steps with all avatars on distinct cells.

  Melting Pot raises (an assertion in the config, a Lua error) for some unsupported counts; with too few spawn
  points others start with avatars outside the map or on one cell, which the distinct-cells check catches.
  """
  ok = []
  for n in candidates:
    try:
      raw = rollout(substrate, n, np.zeros((steps, n), np.int32) + A.TURN_RIGHT, seed)
    except Exception as e:  # pylint: disable=broad-except  # Any failure means "not supported"; say which.
      print(f"probe {substrate} with {n} players: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
      continue
    h, w = (s // raw["sprite_size"] for s in raw["world"].shape[1:3])
    cells = raw["cells"][0]
    inside = ((cells >= 0) & (cells < np.array([h, w]))).all()
    if inside and len({tuple(c) for c in cells}) == n:
      ok.append(n)
  return tuple(ok)


def _main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m ap_jax.data.meltingpot",
      description="Melting Pot helpers: print the unified action table as Markdown, or re-measure player counts.")
  parser.add_argument("--probe", action="store_true", help="measure PLAYER_COUNTS for every substrate (minutes)")
  parser.add_argument("--substrates", default="", help="comma-separated substrates (default: all)")
  args = parser.parse_args(argv)
  names = [s for s in args.substrates.split(",") if s] or mp_substrates.list_substrates()
  for name in names:
    mp_substrates.check_substrate(name)
  if args.probe:
    counts = {}
    for name in names:
      counts[name] = probe_player_counts(name)
      print(f"    {name!r}: {counts[name]},", flush=True)
    drift = {n: (mp_substrates.PLAYER_COUNTS.get(n), c) for n, c in counts.items()
             if mp_substrates.PLAYER_COUNTS.get(n) != c}
    print(json.dumps({"differs_from_PLAYER_COUNTS": drift}))
    sys.exit(1 if drift else 0)
  print(mp_actions.action_table_markdown(names))


if __name__ == "__main__":
  _main()
