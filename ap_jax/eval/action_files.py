"""Action files: per-player action sequences that a person writes by hand, to drive the model (and the true game).

Format: a JSON object (the `#` notes below explain the fields; they are not part of the JSON).

  {
    "players": 3,                                  # optional; if given, must match the actions
    "actions": [                                   # time-major: one entry per step, one name per player
      ["FORWARD", "NOOP", "TURN_LEFT"],
      ["FORWARD", "STRAFE_LEFT", "INTERACT"]
    ],
    "seed": 12, "layout": "rooms",                 # optional: the true-game episode to start from and replay in
    "source": "builtin", "substrate": "...",       # optional (Melting Pot: substrate instead of layout)
    "description": "two steps of three players"    # optional, free text
  }

Instead of "actions", "actions_by_player" lists each player's sequence (player-major); all must have one length:

  {"actions_by_player": [["FORWARD", "FORWARD"], ["NOOP", "TURN_LEFT"], ["TURN_LEFT", "INTERACT"]]}

Names are those of `ap_jax.actions.ACTION_NAMES`, case-insensitive (NOOP, FORWARD, BACKWARD, STRAFE_LEFT,
STRAFE_RIGHT, TURN_LEFT, TURN_RIGHT, INTERACT); an integer id in [0, 8) is accepted too. Unknown top-level keys
are errors (a misspelt "seed" would otherwise be silently ignored).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ap_jax import actions as A
from ap_jax import fs
from ap_jax.games import gridgame

ALLOWED_KEYS = ("players", "actions", "actions_by_player", "seed", "layout", "source", "substrate", "description")


class ActionFileError(ValueError):
  """An action file that cannot be read as per-player action sequences; the message names the bad entry."""


def _action(value: Any, where: str) -> int:
  if isinstance(value, bool):  # bool is an int in Python; true/false is never a meant action
    raise ActionFileError(f"{where} = {value!r}, expected an action name ({', '.join(A.ACTION_NAMES)})")
  if isinstance(value, (int, np.integer)):
    if not 0 <= value < A.NUM_ACTIONS:
      raise ActionFileError(f"{where} = {value}, but the action space has {A.NUM_ACTIONS} actions "
                            f"(ids 0-{A.NUM_ACTIONS - 1}: {', '.join(A.ACTION_NAMES)})")
    return int(value)
  if isinstance(value, str):
    key = value.strip().upper()
    if key not in A.ACTION_IDS:
      raise ActionFileError(f"{where} = {value!r} is not an action: expected one of {', '.join(A.ACTION_NAMES)}")
    return A.ACTION_IDS[key]
  raise ActionFileError(f"{where} = {value!r} ({type(value).__name__}), expected an action name "
                        f"({', '.join(A.ACTION_NAMES)})")


def _rows(value: Any, where: str, what: str) -> list[list[Any]]:
  if not isinstance(value, list) or not value:
    raise ActionFileError(f"{where} is {type(value).__name__} {str(value)[:80]}, expected a non-empty list of {what}")
  for i, row in enumerate(value):
    if not isinstance(row, list) or not row:
      raise ActionFileError(f"{where}[{i}] is {str(row)[:80]}, expected a non-empty list of action names")
  return value


def parse_actions(data: Mapping[str, Any], source: str = "action file") -> tuple[np.ndarray, dict[str, Any]]:
  """Parses an action-file object (already loaded from JSON). Returns (actions int32 [T, P], meta), where meta
  holds every other key of the file and always 'players' and 'steps'. `source` names the file in errors."""
  if not isinstance(data, Mapping):
    raise ActionFileError(f"{source}: the top level is {type(data).__name__}, expected a JSON object with "
                          "'actions' (time-major) or 'actions_by_player' (player-major)")
  unknown = sorted(set(data) - set(ALLOWED_KEYS))
  if unknown:
    raise ActionFileError(f"{source}: unknown keys {unknown}, expected only {list(ALLOWED_KEYS)}")
  has_time, has_player = "actions" in data, "actions_by_player" in data
  if has_time == has_player:
    raise ActionFileError(f"{source}: expected exactly one of 'actions' (one list per step) and "
                          f"'actions_by_player' (one list per player), found {'both' if has_time else 'neither'}")
  if has_time:
    rows = _rows(data["actions"], f"{source}: actions", "steps, one list of per-player names per step")
    width = len(rows[0])
    for t, row in enumerate(rows):
      if len(row) != width:
        raise ActionFileError(f"{source}: actions[{t}] has {len(row)} entries but actions[0] has {width}: every "
                              "step needs one action per player")
    actions = np.array([[_action(v, f"{source}: actions[{t}][{p}]") for p, v in enumerate(row)]
                        for t, row in enumerate(rows)], np.int32)
  else:
    rows = _rows(data["actions_by_player"], f"{source}: actions_by_player", "players, one list of names each")
    length = len(rows[0])
    for p, row in enumerate(rows):
      if len(row) != length:
        raise ActionFileError(f"{source}: actions_by_player[{p}] has {len(row)} steps but actions_by_player[0] has "
                              f"{length}: every player needs the same number of steps")
    actions = np.array([[_action(v, f"{source}: actions_by_player[{p}][{t}]") for t, v in enumerate(row)]
                        for p, row in enumerate(rows)], np.int32).T.copy()
  num_steps, num_players = actions.shape
  if not 1 <= num_players <= A.MAX_PLAYERS:
    raise ActionFileError(f"{source}: {num_players} players, expected 1 to {A.MAX_PLAYERS}")
  if "players" in data:
    declared = data["players"]
    if isinstance(declared, bool) or not isinstance(declared, int) or declared != num_players:
      raise ActionFileError(f"{source}: players = {declared!r}, but the actions give {num_players} players per step")
  if "seed" in data and (isinstance(data["seed"], bool) or not isinstance(data["seed"], int) or data["seed"] < 0):
    raise ActionFileError(f"{source}: seed = {data['seed']!r}, expected a non-negative integer")
  if "layout" in data and data["layout"] not in gridgame.LAYOUTS:
    raise ActionFileError(f"{source}: layout = {data['layout']!r}, expected one of {', '.join(gridgame.LAYOUTS)}")
  if "source" in data and data["source"] not in ("builtin", "meltingpot"):
    raise ActionFileError(f"{source}: source = {data['source']!r}, expected 'builtin' or 'meltingpot'")
  meta = {k: v for k, v in data.items() if k not in ("actions", "actions_by_player")}
  meta.update(players=num_players, steps=num_steps)
  return actions, meta


def load_action_file(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
  """Reads an action file (format in the module docstring). Returns (actions int32 [T, P], meta)."""
  path = os.fspath(path)
  try:
    data = json.loads(fs.read_text(path))
  except FileNotFoundError as e:
    raise ActionFileError(f"action file {path} does not exist") from e
  except json.JSONDecodeError as e:
    raise ActionFileError(f"action file {path} is not valid JSON: {e}") from e
  return parse_actions(data, source=path)
