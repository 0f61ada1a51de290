"""Replay an action sequence in the true game, from a held-out episode's seed: the ground truth to compare with.

Why replay rather than read the stored episode: the model may be driven by actions that are not the episode's
(an action file, longer rollouts, other player counts). The seed names the episode's initial state exactly
(`gridgame.initial_state`, `meltingpot.rollout`), so the same seed and actions give the true frames and states.

Returned arrays (T actions, P players, H, W pixels):
  frames        uint8   [T+1, H, W, 3]
  cells         int32   [T+1, P, 2]     (y, x) grid cell (Melting Pot: of the map, before the canvas offset)
  positions     float32 [T+1, P, 2]     pixel centre on the frame, the dataset's `positions`
  orientations  int32   [T+1, P]
  items         bool    [T+1, Y, X]     where the items lie (built-in game only)
  visible       bool    [T+1, P]        the avatar is drawn (Melting Pot only: False while zapped or caught)
  grid          learned_detector.Grid   where the map's cells lie on the frame (Melting Pot only)
  substrate     str                     the layout or substrate
  actions       int32   [T, P]          the actions replayed
  colors        uint8   [P, 3]
  cell_size     int
  source        str                     'builtin' or 'meltingpot'
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np

from ap_jax import actions as A
from ap_jax.games import gridgame


def builtin_config(frame_hw: tuple[int, int], cell_size: int) -> gridgame.GameConfig:
  """The GameConfig the dataset generator used for frames of this size (`tfds_builder._generate_builtin`): the
  grid follows from the frame size; max_players and densities are the defaults, which the reset draw depends on."""
  h, w = frame_hw
  if h % cell_size or w % cell_size:
    raise ValueError(f"frames are {h} x {w} px, expected multiples of cell_size = {cell_size}")
  return gridgame.GameConfig(grid_height=h // cell_size, grid_width=w // cell_size, cell_size=cell_size)


@functools.partial(jax.jit, static_argnames=("config",))
def _play_from_reset(reset_key: jax.Array, num_players: jax.Array, layout: jax.Array, actions_TP: jax.Array,
                     config: gridgame.GameConfig) -> dict:
  # One compiled call per (config, T) instead of hundreds of eager dispatches (seconds per episode on a CPU).
  return gridgame.play(gridgame.reset(reset_key, num_players, layout, config), actions_TP, config)


def replay_builtin(seed: int, layout: str | int, actions_TP: np.ndarray,
                   config: gridgame.GameConfig | None = None) -> dict[str, Any]:
  """Plays `actions_TP` (int32 [T, P]; P = the episode's number of players) in the built-in game from the initial
  state of episode `seed` with this layout. `config` defaults to the dataset's default 8 x 8 grid of 8 px cells."""
  config = config or gridgame.GameConfig()
  actions_TP = A.check_actions(actions_TP)
  if actions_TP.ndim != 2:
    raise ValueError(f"actions has shape {actions_TP.shape}, expected [T, P]")
  num_steps, num_players = actions_TP.shape
  gridgame.check_num_players(num_players, config)
  layout_idx = gridgame.layout_id(layout) if isinstance(layout, str) else int(layout)
  if not 0 <= layout_idx < len(gridgame.LAYOUTS):
    raise ValueError(f"layout = {layout}, expected a name or id of {gridgame.LAYOUTS}")
  padded = np.full((num_steps, config.max_players), A.NOOP, np.int32)
  padded[:, :num_players] = actions_TP
  # The reset key exactly as `gridgame.initial_state` draws it (tests check replay against stored episodes).
  reset_key, _ = jax.random.split(gridgame.episode_key(int(seed)))
  traj = _play_from_reset(reset_key, np.int32(num_players), np.int32(layout_idx), padded, config)
  cells = np.asarray(traj["cells"])[:, :num_players]
  return {
      "frames": np.asarray(traj["frames"]),
      "cells": cells.astype(np.int32),
      "positions": ((cells + 0.5) * config.cell_size).astype(np.float32),
      "orientations": np.asarray(traj["orientations"])[:, :num_players].astype(np.int32),
      "items": np.asarray(traj["items"]).astype(bool),
      "actions": actions_TP,
      "colors": gridgame.PLAYER_COLORS[:num_players].copy(),
      "cell_size": int(config.cell_size),
      "substrate": gridgame.LAYOUTS[layout_idx],
      "source": "builtin",
  }


def replay_meltingpot(substrate: str, seed: int, actions_TP: np.ndarray, canvas_hw: tuple[int, int]
                      ) -> dict[str, Any]:
  """Plays `actions_TP` in the Melting Pot episode `seed` of `substrate` and places the world view on the canvas
  as the dataset does (`meltingpot.generate_episode`). Needs the meltingpot extra. If the substrate ends its
  episode early, fewer than T+1 frames come back (as in the dataset)."""
  from ap_jax.data import meltingpot

  actions_TP = A.check_actions(actions_TP)
  raw = meltingpot.rollout(substrate, actions_TP.shape[1], actions_TP, int(seed))
  from ap_jax.eval import learned_detector

  world = raw["world"]
  grid = learned_detector.meltingpot_grid(world.shape[1:3], tuple(canvas_hw), raw["sprite_size"])
  k = raw["sprite_size"] // grid.cell_size
  to_canvas = meltingpot._to_canvas  # pylint: disable=protected-access  # the dataset's own placement
  frames = np.stack([to_canvas(w, k, (grid.top, grid.left), tuple(canvas_hw)) for w in world])
  cells = raw["cells"].astype(np.int32)
  colors = np.asarray(raw["colors"], np.uint8)
  return {
      "frames": frames,
      "cells": cells,
      "positions": grid.centres(cells),
      "orientations": raw["orientations"].astype(np.int32),
      "visible": learned_detector.player_visible(frames, cells, colors, grid),
      "actions": actions_TP[:len(world) - 1],
      "colors": colors,
      "cell_size": int(grid.cell_size),
      "grid": grid,
      "substrate": substrate,
      "source": "meltingpot",
  }


def replay_episode(episode: Mapping[str, Any], actions_TP: np.ndarray | None = None) -> dict[str, Any]:
  """Replays a stored episode (schema of `ap_jax.data.schema`) with its own actions or with `actions_TP` instead
  (same number of players; any number of steps). Built-in episodes replay on the grid their frames imply."""
  actions_TP = np.asarray(episode["actions"] if actions_TP is None else actions_TP)
  num_players = int(np.asarray(episode["colors"]).shape[0])
  if actions_TP.ndim != 2 or actions_TP.shape[1] != num_players:
    raise ValueError(f"actions has shape {actions_TP.shape}, expected [T, {num_players}] for this episode's "
                     f"{num_players} players")
  frame_hw = tuple(np.asarray(episode["frames"]).shape[1:3])
  source = episode["source"]
  if source == "builtin":
    config = builtin_config(frame_hw, int(episode["cell_size"]))
    return replay_builtin(int(episode["seed"]), str(episode["substrate"]), actions_TP, config)
  if source == "meltingpot":
    return replay_meltingpot(str(episode["substrate"]), int(episode["seed"]), actions_TP, frame_hw)
  raise ValueError(f"episode source {source!r}, expected 'builtin' or 'meltingpot'")
