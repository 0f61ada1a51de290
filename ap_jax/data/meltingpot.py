"""Melting Pot rollouts in the episode schema (`ap_jax.data.schema`): the paper's training data.

Needs the `meltingpot` extra (`bash launch/install_meltingpot.sh`); importing this module does not, so the rest of
ap_jax works without it. Everything that touches Melting Pot imports it on first use.

How an episode is made
----------------------
The substrate's DMLab2D settings are built as Melting Pot builds them (`meltingpot.utils.substrates.builder`), with
one addition: every avatar object gets DMLab2D's `LocationObserver` component (`objectIsAvatar=True,
alsoReportOrientation=True`), so the environment itself reports `N.POSITION` and `N.ORIENTATION` for player N.
Positions and facings are never guessed from pixels. We drive the raw `dmlab2d.Lab2d` and ask it for only
`WORLD.RGB` and those two observations: Melting Pot's wrappers would also render every player's egocentric view,
which the world model does not use.

Conventions, checked against the environment (tests/test_meltingpot.py):
- `N.POSITION` is the avatar's cell as (x, y) = (column, row); we store (y, x). FORWARD while facing North lowers
  y by one.
- `N.ORIENTATION` is 0=N, 1=E, 2=S, 3=W (component_library.lua `_ORIENTATION_TO_INT`), the same as
  `ap_jax.actions`. TURN_RIGHT adds one (mod 4).

Determinism: Melting Pot as shipped is NOT reproducible from its seeds. Two things had to be fixed here:
- Some substrates draw their settings from Python's global `random` (coins: map size, player and coin colours). We
  seed it from the episode seed while the settings are built, and restore the caller's state afterwards.
- dmlab2d's LuaJIT seeds its string hash from /dev/urandom, so `pairs` over string-keyed tables visits keys in a
  different order in every Lua state. Melting Pot assigns avatars to spawn points in that order (and other
  per-object loops consume the Lua RNG in that order), so two environments with identical seeds diverge from the
  first frame. We run Melting Pot's Lua files from a cached copy in which `pairs` visits string and number keys in
  sorted order (`_deterministic_lua_root`); stepping becomes 2-3x slower, still well under a millisecond.
With that, the Lua seed (`env_seed`), the seed passed to `Lab2d.start`, the settings seed and the policy's numpy
stream all derive from `seed`, and the same arguments give the identical episode. A fresh `Lab2d` is built per
episode, as Melting Pot's own reset does; building (0.2-1 s) dominates the cost of short episodes.

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

Players and colours
-------------------
`num_players` players take roles spread evenly over the substrate's default role list (so `predator_prey__*` with
2 players has one predator and one prey). Player i's colour is the main colour of its sprite: the palette's body
colour `'*'` (Melting Pot's avatar palette), or for sprites without one (`predator_prey__*`) the opaque palette
colour used most in the sprite. Some substrates colour all players alike (`chemistry__*`, `predator_prey__*` within
a role); the colours say so rather than invent a difference.

Allowed player counts: Melting Pot states no range per substrate. Its configs assert some (`coins` and
`hidden_agenda` have a MANDATED_NUM_PLAYERS, paintball needs an even count) and the maps bound the rest through
their spawn points. `PLAYER_COUNTS` lists, for 1 to 8 players (the schema's maximum), the counts with which the
substrate builds, starts and steps with every avatar on its own cell of the map; it was measured by
`probe_player_counts` on dm-meltingpot 2.4.1 and is re-checked by `python -m ap_jax.data.meltingpot --probe`.

The unified action space in Melting Pot
---------------------------------------
Every Melting Pot avatar moves relative to its facing (`Avatar` component, `moveRel`): `move` 0 = none,
1 = forward, 2 = right, 3 = backward, 4 = left; `turn` -1 = left, +1 = right. Each substrate's action set begins
with the same seven entries, so seven of the eight unified actions are expressed exactly in every substrate:

  NOOP {} | FORWARD {move: 1} | BACKWARD {move: 3} | STRAFE_LEFT {move: 4} | STRAFE_RIGHT {move: 2} |
  TURN_LEFT {turn: -1} | TURN_RIGHT {turn: 1}

`unified_action_table` finds these by their move/turn values, not by position, and fails loudly if a substrate
lacks one. INTERACT maps to the substrate's primary non-movement action: the first action-set entry that is not
pure move/turn (Melting Pot lists the main "fire" or "interact" action first). Per substrate (dm-meltingpot 2.4.1):

  interact        (26) the *_in_the_matrix__* games (15), collaborative_cooking__* (7), predator_prey__* (4)
  fireZap         (11) commons_harvest__* (3), territory__* (3), paintball__* (2; fireZap 1 of 1-2),
                  externality_mushrooms__dense, clean_up, allelopathic_harvest__open
  ioAction        (4) chemistry__*
  mine            coop_mining
  row             boat_race__eight_races
  eat             daycare
  pickup          factory_commons__either_or
  eat_apple       fruit_market__concentric_rivers
  refineAndGift   gift_refinements
  tag             hidden_agenda
  (none)          coins: its action set is move/turn only, so INTERACT cannot be expressed and maps to NOOP.

The substrates' other actions (e.g. clean_up's fireClean, territory's fireClaim, hidden_agenda's votes,
fruit_market's offers) are not reachable from the unified space. `action_table_markdown()` renders the full table.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import random
import sys
from collections import Counter
from typing import Any, Sequence

import numpy as np

from ap_jax import actions as A
from ap_jax.data import schema

INSTALL_HINT = "bash launch/install_meltingpot.sh"
POLICIES = ("uniform", "sticky")

# Melting Pot's relative `move` codes (avatar_library.lua: moveRel(_COMPASS[move]) with _COMPASS = N, E, S, W
# taken relative to the facing) and `turn` codes, for the seven unified actions that only move or turn.
_MOVE_TURN: dict[int, tuple[int, int]] = {
    A.NOOP: (0, 0),
    A.FORWARD: (1, 0),
    A.BACKWARD: (3, 0),
    A.STRAFE_LEFT: (4, 0),
    A.STRAFE_RIGHT: (2, 0),
    A.TURN_LEFT: (0, -1),
    A.TURN_RIGHT: (0, 1),
}
_MOVEMENT_KEYS = ("move", "turn")

# Player counts (of 1..8) with which each substrate builds, starts and steps with every avatar on its own cell.
# Measured by `probe_player_counts` on dm-meltingpot 2.4.1; `python -m ap_jax.data.meltingpot --probe` re-measures.
PLAYER_COUNTS: dict[str, tuple[int, ...]] = {
    'allelopathic_harvest__open': (1, 2, 3, 4, 5, 6, 7, 8),
    'bach_or_stravinsky_in_the_matrix__arena': (1, 2, 3, 4, 5, 6, 7, 8),
    'bach_or_stravinsky_in_the_matrix__repeated': (1, 2, 3, 4, 5, 6, 7, 8),
    'boat_race__eight_races': (6,),
    'chemistry__three_metabolic_cycles': (1, 2, 3, 4, 5, 6, 7, 8),
    'chemistry__three_metabolic_cycles_with_plentiful_distractors': (1, 2, 3, 4, 5, 6, 7, 8),
    'chemistry__two_metabolic_cycles': (1, 2, 3, 4, 5, 6, 7, 8),
    'chemistry__two_metabolic_cycles_with_distractors': (1, 2, 3, 4, 5, 6, 7, 8),
    'chicken_in_the_matrix__arena': (1, 2, 3, 4, 5, 6, 7, 8),
    'chicken_in_the_matrix__repeated': (1, 2, 3, 4, 5, 6, 7, 8),
    'clean_up': (1, 2, 3, 4, 5, 6, 7, 8),
    'coins': (2,),
    'collaborative_cooking__asymmetric': (1, 2),
    'collaborative_cooking__circuit': (1, 2),
    'collaborative_cooking__cramped': (1, 2),
    'collaborative_cooking__crowded': (1, 2, 3, 4, 5, 6, 7, 8),
    'collaborative_cooking__figure_eight': (1, 2, 3, 4, 5, 6),
    'collaborative_cooking__forced': (1, 2),
    'collaborative_cooking__ring': (1, 2),
    'commons_harvest__closed': (1, 2, 3, 4, 5, 6, 7, 8),
    'commons_harvest__open': (1, 2, 3, 4, 5, 6, 7, 8),
    'commons_harvest__partnership': (1, 2, 3, 4, 5, 6, 7, 8),
    'coop_mining': (1, 2, 3, 4, 5, 6, 7, 8),
    'daycare': (1, 2, 3, 4, 5, 6, 7, 8),
    'externality_mushrooms__dense': (1, 2, 3, 4, 5, 6),
    'factory_commons__either_or': (1, 2, 3, 4, 5, 6, 7, 8),
    'fruit_market__concentric_rivers': (1, 2, 3, 4, 5, 6, 7, 8),
    'gift_refinements': (1, 2, 3, 4, 5, 6, 7, 8),
    'hidden_agenda': (5,),
    'paintball__capture_the_flag': (2, 4, 6, 8),
    'paintball__king_of_the_hill': (2, 4, 6, 8),
    'predator_prey__alley_hunt': (1, 2, 3, 4, 5, 6, 7, 8),
    'predator_prey__open': (1, 2, 3, 4, 5, 6, 7, 8),
    'predator_prey__orchard': (1, 2, 3, 4, 5, 6, 7, 8),
    'predator_prey__random_forest': (1, 2, 3, 4, 5, 6, 7, 8),
    'prisoners_dilemma_in_the_matrix__arena': (1, 2, 3, 4, 5, 6, 7, 8),
    'prisoners_dilemma_in_the_matrix__repeated': (1, 2, 3, 4, 5, 6, 7, 8),
    'pure_coordination_in_the_matrix__arena': (1, 2, 3, 4, 5, 6, 7, 8),
    'pure_coordination_in_the_matrix__repeated': (1, 2, 3, 4, 5, 6, 7, 8),
    'rationalizable_coordination_in_the_matrix__arena': (1, 2, 3, 4, 5, 6, 7, 8),
    'rationalizable_coordination_in_the_matrix__repeated': (1, 2, 3, 4, 5, 6, 7, 8),
    'running_with_scissors_in_the_matrix__arena': (1, 2, 3, 4, 5, 6, 7, 8),
    'running_with_scissors_in_the_matrix__one_shot': (1, 2, 3, 4, 5, 6, 7, 8),
    'running_with_scissors_in_the_matrix__repeated': (1, 2, 3, 4, 5, 6, 7, 8),
    'stag_hunt_in_the_matrix__arena': (1, 2, 3, 4, 5, 6, 7, 8),
    'stag_hunt_in_the_matrix__repeated': (1, 2, 3, 4, 5, 6, 7, 8),
    'territory__inside_out': (1, 2, 3, 4, 5, 6, 7, 8),
    'territory__open': (1, 2, 3, 4, 5, 6, 7, 8),
    'territory__rooms': (1, 2, 3, 4, 5, 6, 7, 8),
}


def _import_meltingpot():
  """Imports Melting Pot's pieces on first use, with a clear error when the extra is missing."""
  try:
    import dmlab2d  # pylint: disable=import-outside-toplevel
    from dmlab2d import runfiles_helper  # pylint: disable=import-outside-toplevel
    from meltingpot.configs import substrates as substrate_configs  # pylint: disable=import-outside-toplevel
    from meltingpot.utils.substrates import builder  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Melting Pot is not installed ({e}). Install the `meltingpot` extra (dm-meltingpot, dmlab2d) into the "
        f"active environment with `{INSTALL_HINT}`.") from e
  return dmlab2d, runfiles_helper, substrate_configs, builder


def list_substrates() -> list[str]:
  """All Melting Pot substrate names, sorted."""
  _, _, substrate_configs, _ = _import_meltingpot()
  return sorted(substrate_configs.SUBSTRATES)


def check_substrate(substrate: str) -> str:
  """Returns `substrate` if Melting Pot has it, else raises ValueError listing the valid names."""
  valid = list_substrates()
  if substrate not in valid:
    raise ValueError(f"unknown Melting Pot substrate {substrate!r}: expected one of {', '.join(valid)}")
  return substrate


@functools.lru_cache(maxsize=None)
def _config(substrate: str):
  _, _, substrate_configs, _ = _import_meltingpot()
  return substrate_configs.get_config(check_substrate(substrate))


# --------------------------------------------------------------------------------------------------------------
# Actions


def _is_movement(action: dict[str, int]) -> bool:
  return all(v == 0 for k, v in action.items() if k not in _MOVEMENT_KEYS)


@functools.lru_cache(maxsize=None)
def _action_mapping(substrate: str) -> tuple[tuple[int, ...], str | None]:
  """(index into the substrate's action_set for each unified action, the INTERACT action's key or None)."""
  action_set = [dict(a) for a in _config(substrate).action_set]
  indices = []
  for unified in range(A.NUM_ACTIONS):
    if unified == A.INTERACT:
      primary = [i for i, a in enumerate(action_set) if not _is_movement(a)]
      indices.append(primary[0] if primary else indices[A.NOOP])
      continue
    move, turn = _MOVE_TURN[unified]
    match = [i for i, a in enumerate(action_set)
             if _is_movement(a) and a.get("move", 0) == move and a.get("turn", 0) == turn]
    if not match:
      raise ValueError(
          f"substrate {substrate!r} has no action with move={move}, turn={turn} for {A.ACTION_NAMES[unified]}; "
          f"its action set is {action_set}")
    indices.append(match[0])
  interact = action_set[indices[A.INTERACT]]
  interact_key = next((k for k, v in interact.items() if k not in _MOVEMENT_KEYS and v != 0), None)
  return tuple(indices), interact_key


def unified_action_table(substrate: str) -> list[int]:
  """For each unified action (ap_jax.actions order), its index into the substrate's Melting Pot action set.

  `meltingpot.substrate.get_config(substrate).action_set[table[a]]` is the DMLab2D action dict of unified action
  `a`. Where a substrate cannot express INTERACT (coins), INTERACT's entry is NOOP's.
  """
  return list(_action_mapping(substrate)[0])


def unified_action_dicts(substrate: str) -> list[dict[str, int]]:
  """For each unified action, the substrate's DMLab2D action dict (non-zero entries only; {} is NOOP)."""
  action_set = _config(substrate).action_set
  return [{k: int(v) for k, v in dict(action_set[i]).items() if v != 0} for i in unified_action_table(substrate)]


def unexpressed_actions(substrate: str) -> list[str]:
  """Unified actions the substrate cannot express (mapped to NOOP instead)."""
  return [] if _action_mapping(substrate)[1] is not None else [A.ACTION_NAMES[A.INTERACT]]


def _format_action(action: dict[str, int]) -> str:
  return "{" + ", ".join(f"{k}: {v}" for k, v in action.items()) + "}" if action else "{} (no-op)"


def action_table_markdown(substrates: Sequence[str] | None = None) -> str:
  """The unified -> Melting Pot action mapping of every substrate, as Markdown (for README)."""
  substrates = list_substrates() if substrates is None else list(substrates)
  shared = {a: unified_action_dicts(substrates[0])[a] for a in _MOVE_TURN}
  for name in substrates:
    dicts = unified_action_dicts(name)
    differ = [A.ACTION_NAMES[a] for a in _MOVE_TURN if dicts[a] != shared[a]]
    if differ:  # Never the case in dm-meltingpot 2.4.1; the table would then need a column per action.
      raise ValueError(f"substrate {name!r} expresses {differ} differently from {substrates[0]!r}: {dicts}")
  lines = [
      "Melting Pot avatars move relative to their facing, as the unified actions do. These seven map the same way "
      "in every substrate:",
      "",
      "| unified | Melting Pot action |",
      "|---|---|",
  ]
  lines += [f"| {A.ACTION_NAMES[a]} | `{_format_action(shared[a])}` |" for a in _MOVE_TURN]
  lines += [
      "",
      "INTERACT is the substrate's primary non-movement action (the first in its action set). Per substrate:",
      "",
      "| substrate | default players | allowed players (of 1-8) | actions | INTERACT | not expressible | "
      "substrate actions left unused |",
      "|---|---|---|---|---|---|---|",
  ]
  for name in substrates:
    cfg = _config(name)
    interact = unified_action_dicts(name)[A.INTERACT]
    missing = unexpressed_actions(name)
    interact_cell = f"`{_format_action(interact)}`" if not missing else "NOOP (no non-movement action)"
    counts = PLAYER_COUNTS.get(name)
    used = set(unified_action_table(name))
    unused = [_format_action({k: int(v) for k, v in dict(a).items() if v != 0})
              for i, a in enumerate(cfg.action_set) if i not in used]
    lines.append(
        f"| `{name}` | {len(cfg.default_player_roles)} | {_format_counts(counts) if counts else 'unknown'} | "
        f"{len(cfg.action_set)} | {interact_cell} | {', '.join(missing) or '-'} | "
        f"{' '.join(f'`{u}`' for u in unused) or '-'} |")
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Players


def _format_counts(counts: Sequence[int]) -> str:
  counts = sorted(counts)
  if not counts:
    return "none"
  if counts == list(range(counts[0], counts[-1] + 1)):
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
  return ", ".join(map(str, counts))


def player_counts(substrate: str) -> tuple[int, ...]:
  """The player counts (of 1..8) that `substrate` supports; see PLAYER_COUNTS."""
  check_substrate(substrate)
  if substrate not in PLAYER_COUNTS:
    raise ValueError(
        f"substrate {substrate!r} has no measured player counts (a newer Melting Pot?); run "
        f"`python -m ap_jax.data.meltingpot --probe` and add it to PLAYER_COUNTS")
  return PLAYER_COUNTS[substrate]


def check_num_players(substrate: str, num_players: int) -> int:
  """Returns `num_players` if the substrate supports it, else raises ValueError naming the allowed counts."""
  allowed = player_counts(substrate)
  if not isinstance(num_players, (int, np.integer)) or int(num_players) not in allowed:
    raise ValueError(
        f"num_players = {num_players!r} for substrate {substrate!r}, expected one of {_format_counts(allowed)} "
        f"(default {len(_config(substrate).default_player_roles)})")
  return int(num_players)


def roles_for(substrate: str, num_players: int) -> tuple[str, ...]:
  """Roles for `num_players` players: spread evenly over the default role list, so mixed games stay mixed."""
  default = tuple(_config(substrate).default_player_roles)
  return tuple(default[(i * len(default)) // num_players % len(default)] for i in range(num_players))


# --------------------------------------------------------------------------------------------------------------
# Building the environment


def _components(game_object) -> list:
  return list(game_object.get("components", []))


def _avatar_component(game_object):
  return next((c for c in _components(game_object) if c.get("component") == "Avatar"), None)


def _add_location_observers(settings) -> list:
  """Adds a LocationObserver to every avatar object; returns the avatar objects in player-index order."""
  avatars = []
  for game_object in settings.simulation.get("gameObjects", []):
    avatar = _avatar_component(game_object)
    if avatar is None:
      continue
    if avatar.get("kwargs", {}).get("useAbsoluteCoordinates", False):
      raise ValueError("an avatar uses absolute movement (useAbsoluteCoordinates), but the unified actions are "
                       "relative to facing")
    observers = [c for c in _components(game_object) if c.get("component") == "LocationObserver"]
    if observers:  # Some substrates add one behind a debug flag: make it report what we need.
      for c in observers:
        c["kwargs"] = {**dict(c.get("kwargs", {})), "objectIsAvatar": True, "alsoReportOrientation": True}
    else:
      game_object["components"].append({
          "component": "LocationObserver",
          "kwargs": {"objectIsAvatar": True, "alsoReportOrientation": True},
      })
    avatars.append(game_object)
  avatars.sort(key=lambda o: int(_avatar_component(o)["kwargs"]["index"]))
  return avatars


def _avatar_colour(game_object) -> tuple[int, int, int]:
  """The avatar sprite's main colour: palette '*' (Melting Pot's body colour) or the most used opaque colour."""
  appearance = next((c for c in _components(game_object) if c.get("component") == "Appearance"), None)
  kwargs = appearance.get("kwargs", {}) if appearance is not None else {}
  if kwargs.get("spriteRGBColors"):  # renderMode 'colored_square' (e.g. the *_in_the_matrix__repeated games)
    return tuple(int(c) for c in kwargs["spriteRGBColors"][0][:3])
  if not kwargs.get("palettes"):
    raise ValueError(f"avatar object {game_object.get('name')!r} has no Appearance colours: {kwargs}")
  palette = dict(kwargs["palettes"][0])
  if "*" in palette:
    return tuple(int(c) for c in palette["*"][:3])
  opaque = {k: v for k, v in palette.items() if len(v) < 4 or v[3] > 0}
  shapes = kwargs.get("spriteShapes")
  if shapes:
    counts = Counter(ch for ch in shapes[0] if ch in opaque)
    if counts:
      return tuple(int(c) for c in opaque[counts.most_common(1)[0][0]][:3])
  return tuple(int(c) for c in next(iter(opaque.values()))[:3])


# LuaJIT (inside dmlab2d) seeds its string hash from /dev/urandom, so the order in which `pairs` visits a
# string-keyed table changes from one Lua state to the next. Melting Pot's simulation assigns avatars to spawn points
# (and runs other per-object loops) in `pairs` order, so two environments built with the same seeds play different
# episodes. We run Melting Pot's Lua from a copy whose files shadow `pairs` with one that visits string and number
# keys in sorted order (tables with other keys keep the native order).
_SORTED_PAIRS_LUA = """-- ap_jax: deterministic `pairs` (see ap_jax/data/meltingpot.py)
local _nativePairs = pairs
local function pairs(t)
  local keys = {}
  for k in _nativePairs(t) do
    local kind = type(k)
    if kind ~= 'string' and kind ~= 'number' then return _nativePairs(t) end
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta == 'number' end
    return a < b
  end)
  local i = 0
  return function()
    i = i + 1
    local k = keys[i]
    if k ~= nil then return k, t[k] end
  end
end
"""
_PATCHED_LUA_FILES = ("*.lua",)


@functools.lru_cache(maxsize=None)
def _deterministic_lua_root() -> str:
  """A directory holding a copy of meltingpot/lua with deterministic `pairs`; used as DMLab2D's levelDirectory."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  import meltingpot  # pylint: disable=import-outside-toplevel
  source = pathlib.Path(meltingpot.__file__).parent / "lua"
  files = sorted(p for p in source.rglob("*.lua"))
  digest = hashlib.sha256(_SORTED_PAIRS_LUA.encode())
  for f in files:
    digest.update(str(f.relative_to(source)).encode())
    digest.update(f.read_bytes())
  cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "ap_jax"
  root = cache / f"meltingpot_lua_{digest.hexdigest()[:16]}"
  if (root / "meltingpot" / "lua").is_dir():
    return str(root)
  cache.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=".staging_"))
  try:
    for f in files:
      dest = staging / "meltingpot" / "lua" / f.relative_to(source)
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_text(_SORTED_PAIRS_LUA + f.read_text())
    try:
      os.rename(staging, root)  # Atomic: a concurrent process either wins or finds the finished copy.
    except OSError:
      if not (root / "meltingpot" / "lua").is_dir():
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return str(root)


class _EpisodeSettings:
  """The DMLab2D settings of one episode, with what we read from them (avatar colours, sprite size)."""

  def __init__(self, substrate: str, num_players: int, settings_seed: int):
    _, _, _, builder = _import_meltingpot()
    from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
    cfg = _config(substrate)
    roles = roles_for(substrate, num_players)
    # Some substrates draw their settings from Python's global `random` (coins: map size and colours), so the
    # episode seed seeds it here; the caller's random state is restored afterwards.
    saved = random.getstate()
    random.seed(settings_seed)
    try:
      settings = cfg.lab2d_settings_builder(roles=roles, config=cfg)
    finally:
      random.setstate(saved)
    # As meltingpot.utils.substrates.builder.builder does, plus the location observers and our Lua copy.
    settings = config_dict.ConfigDict(copy.deepcopy(settings)).unlock()
    builder.apply_prefab_overrides(settings, None)
    builder.maybe_build_and_add_avatar_objects(settings)
    avatars = _add_location_observers(settings)
    if len(avatars) != num_players:
      raise ValueError(f"substrate {substrate!r} built {len(avatars)} avatars for {num_players} players")
    builder.locate_and_overwrite_level_directory(settings)
    settings.levelDirectory = _deterministic_lua_root()
    self.substrate = substrate
    self.num_players = num_players
    self.sprite_size = int(settings.get("spriteSize", 8))
    self.colors = np.array([_avatar_colour(o) for o in avatars], np.uint8)
    self.settings = builder.parse_python_settings_for_dmlab2d(settings)

  def start(self, env_seed: int, episode_seed: int):
    """A fresh, started Lab2d environment (a fresh one per episode, as Melting Pot's own reset builds)."""
    dmlab2d, runfiles_helper, _, _ = _import_meltingpot()
    env = dmlab2d.Lab2d(runfiles_helper.find(), dict(self.settings, env_seed=str(env_seed)))
    names = env.observation_names()
    wanted = [f"{i}.{kind}" for i in range(1, self.num_players + 1) for kind in ("POSITION", "ORIENTATION")]
    missing = [n for n in ["WORLD.RGB", *wanted] if n not in names]
    if missing:
      raise RuntimeError(f"substrate {self.substrate!r} does not report {missing}; the LocationObserver was not "
                         f"attached to every avatar")
    env.start(episode=0, seed=episode_seed)
    return env

  def action_vectors(self, env) -> np.ndarray:
    """[P, 8, D] int32: the DMLab2D discrete action vector of each player's unified action (others zero)."""
    names = list(env.action_discrete_names())
    vectors = np.zeros((self.num_players, A.NUM_ACTIONS, len(names)), np.int32)
    for a, action in enumerate(unified_action_dicts(self.substrate)):
      for key, value in action.items():
        for p in range(self.num_players):
          vectors[p, a, names.index(f"{p + 1}.{key}")] = value
    return vectors


def _observe(env, num_players: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(WORLD.RGB [h, w, 3] copy, cell positions [P, 2] (y, x), orientations [P])."""
  world = np.array(env.observation("WORLD.RGB"), dtype=np.uint8)
  xy = np.array([np.asarray(env.observation(f"{i}.POSITION")) for i in range(1, num_players + 1)], np.int32)
  ori = np.array([int(np.asarray(env.observation(f"{i}.ORIENTATION"))) for i in range(1, num_players + 1)], np.int32)
  return world, xy[:, ::-1].copy(), ori


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
  check_substrate(substrate)
  check_num_players(substrate, num_players)
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
  dmlab2d, _, _, _ = _import_meltingpot()
  actions = A.check_actions(actions)
  if actions.ndim != 2 or actions.shape[1] != num_players:
    raise ValueError(f"actions has shape {actions.shape}, expected [T, {num_players}]")
  env_seed, episode_seed, settings_seed, _ = _seeds(seed)
  episode = _EpisodeSettings(substrate, num_players, settings_seed)
  env = episode.start(env_seed, episode_seed)
  vectors = episode.action_vectors(env)
  players = np.arange(num_players)
  worlds, cells, oris = [], [], []
  world, cell, ori = _observe(env, num_players)
  worlds.append(world), cells.append(cell), oris.append(ori)
  for t in range(actions.shape[0]):
    env.act_discrete(vectors[players, actions[t]].sum(axis=0))
    status, _ = env.advance()
    world, cell, ori = _observe(env, num_players)
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
  names = [s for s in args.substrates.split(",") if s] or list_substrates()
  for name in names:
    check_substrate(name)
  if args.probe:
    counts = {}
    for name in names:
      counts[name] = probe_player_counts(name)
      print(f"    {name!r}: {counts[name]},", flush=True)
    drift = {n: (PLAYER_COUNTS.get(n), c) for n, c in counts.items() if PLAYER_COUNTS.get(n) != c}
    print(json.dumps({"differs_from_PLAYER_COUNTS": drift}))
    sys.exit(1 if drift else 0)
  print(action_table_markdown(names))


if __name__ == "__main__":
  _main()
