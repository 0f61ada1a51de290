"""The unified action space and facing conventions shared by every game, model and metric.

Actions are relative to the player's facing, as in the ActionParty paper:

  0 NOOP          stay, keep facing
  1 FORWARD       move one cell in the facing direction
  2 BACKWARD      move one cell opposite to the facing direction (facing unchanged)
  3 STRAFE_LEFT   move one cell to the left of the facing direction (facing unchanged)
  4 STRAFE_RIGHT  move one cell to the right of the facing direction (facing unchanged)
  5 TURN_LEFT     rotate facing 90 degrees anticlockwise, stay
  6 TURN_RIGHT    rotate facing 90 degrees clockwise, stay
  7 INTERACT      act on the cell in front (the built-in game: collect the item there), stay

Orientations follow Melting Pot / DMLab2D: 0 = North (up, -y), 1 = East (+x), 2 = South (+y),
3 = West (-x). Positions are (y, x): row first, as in image arrays.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ACTION_NAMES: tuple[str, ...] = (
    "NOOP",
    "FORWARD",
    "BACKWARD",
    "STRAFE_LEFT",
    "STRAFE_RIGHT",
    "TURN_LEFT",
    "TURN_RIGHT",
    "INTERACT",
)
NUM_ACTIONS = len(ACTION_NAMES)
NOOP, FORWARD, BACKWARD, STRAFE_LEFT, STRAFE_RIGHT, TURN_LEFT, TURN_RIGHT, INTERACT = range(NUM_ACTIONS)
ACTION_IDS: dict[str, int] = {name: i for i, name in enumerate(ACTION_NAMES)}

ORIENTATION_NAMES: tuple[str, ...] = ("N", "E", "S", "W")
NUM_ORIENTATIONS = 4
NORTH, EAST, SOUTH, WEST = range(NUM_ORIENTATIONS)
# (dy, dx) of one step in each orientation.
ORIENTATION_DELTAS = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], dtype=np.int32)

# Movement actions as an offset added to the facing (mod 4); -1 means "does not move".
MOVE_ROTATION = np.array([-1, 0, 2, 3, 1, -1, -1, -1], dtype=np.int32)
# Facing change (mod 4) of each action.
TURN_DELTA = np.array([0, 0, 0, 0, 0, 3, 1, 0], dtype=np.int32)

MAX_PLAYERS = 8


def action_id(name: str) -> int:
  """Returns the id of an action name (case-insensitive), with a clear error otherwise."""
  key = name.strip().upper()
  if key not in ACTION_IDS:
    raise ValueError(f"unknown action {name!r}: expected one of {', '.join(ACTION_NAMES)}")
  return ACTION_IDS[key]


def check_actions(actions: np.ndarray | Sequence, name: str = "actions") -> np.ndarray:
  """Validates an integer action array and returns it as int32.

  Raises ValueError naming the first bad entry, e.g. `actions[2, 5] = 9, but the action space has 8 actions`.
  """
  arr = np.asarray(actions)
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} has dtype {arr.dtype}, expected integers in [0, {NUM_ACTIONS})")
  bad = np.argwhere((arr < 0) | (arr >= NUM_ACTIONS))
  if bad.size:
    idx = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"{name}[{', '.join(map(str, idx))}] = {int(arr[idx])}, but the action space has {NUM_ACTIONS} actions"
    )
  return arr.astype(np.int32)
