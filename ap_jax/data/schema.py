"""The episode schema: what every source (built-in game, Melting Pot) produces and the dataset stores.

Dimension letters: T = actions per episode (the episode has T+1 frames), P = players in the episode,
H, W = canvas height and width in pixels.

  frames        uint8   [T+1, H, W, 3]  the global (top-down) view, frame t is before action t
  actions       int32   [T, P]          unified action ids (ap_jax.actions), action t moves frame t -> t+1
  positions     float32 [T+1, P, 2]     pixel centre of each player's cell on the canvas, (y, x)
  orientations  int32   [T+1, P]        0=N, 1=E, 2=S, 3=W
  player_mask   bool    [P]             True for a player in the episode (all True as stored; padding
                                        to a fixed maximum happens in the pipeline)
  colors        uint8   [P, 3]          each player's sprite colour (RGB)
  source        str                     "builtin" or "meltingpot"
  substrate     str                     layout name (built-in) or Melting Pot substrate name
  seed          int64                   the episode's seed: the same seed replays the same episode
  cell_size     int32                   pixels per grid cell on the canvas (after any uniform scaling)
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ap_jax import actions as actions_lib

EPISODE_KEYS = (
    "frames", "actions", "positions", "orientations", "player_mask", "colors", "source", "substrate", "seed",
    "cell_size",
)


def validate_episode(ep: Mapping[str, Any], where: str = "episode") -> None:
  """Checks an episode dict against the schema; raises ValueError naming the bad field and expectation."""
  missing = [k for k in EPISODE_KEYS if k not in ep]
  if missing:
    raise ValueError(f"{where} is missing fields {missing}; expected all of {list(EPISODE_KEYS)}")
  frames = np.asarray(ep["frames"])
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"{where}: frames has dtype {frames.dtype} shape {frames.shape}, expected uint8 [T+1, H, W, 3]")
  t1 = frames.shape[0]
  acts = np.asarray(ep["actions"])
  if acts.ndim != 2 or acts.shape[0] != t1 - 1:
    raise ValueError(f"{where}: actions has shape {acts.shape}, expected [T, P] with T = {t1 - 1}")
  actions_lib.check_actions(acts, f"{where}.actions")
  p = acts.shape[1]
  if not 1 <= p <= actions_lib.MAX_PLAYERS:
    raise ValueError(f"{where}: {p} players, expected 1 to {actions_lib.MAX_PLAYERS}")
  expect = {
      "positions": ((t1, p, 2), np.float32),
      "orientations": ((t1, p), np.int32),
      "player_mask": ((p,), np.bool_),
      "colors": ((p, 3), np.uint8),
  }
  for key, (shape, dtype) in expect.items():
    arr = np.asarray(ep[key])
    if arr.shape != shape or arr.dtype != dtype:
      raise ValueError(
          f"{where}: {key} has dtype {arr.dtype} shape {arr.shape}, expected {np.dtype(dtype).name} {list(shape)}")
  ori = np.asarray(ep["orientations"])
  if ori.size and (ori.min() < 0 or ori.max() >= actions_lib.NUM_ORIENTATIONS):
    raise ValueError(f"{where}: orientations outside [0, 4): min {ori.min()}, max {ori.max()}")
