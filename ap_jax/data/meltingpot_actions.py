"""The unified actions (`ap_jax.actions`) in each Melting Pot substrate's action set.

Needs the `meltingpot` extra for the substrates' configs (`meltingpot_substrates`); importing this module does not.

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

import functools
from typing import Sequence

from ap_jax import actions as A
from ap_jax.data import meltingpot_substrates as mp_substrates

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


def _is_movement(action: dict[str, int]) -> bool:
  return all(v == 0 for k, v in action.items() if k not in _MOVEMENT_KEYS)


@functools.lru_cache(maxsize=None)
def _action_mapping(substrate: str) -> tuple[tuple[int, ...], str | None]:
  """(index into the substrate's action_set for each unified action, the INTERACT action's key or None)."""
  action_set = [dict(a) for a in mp_substrates.substrate_config(substrate).action_set]
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
  action_set = mp_substrates.substrate_config(substrate).action_set
  return [{k: int(v) for k, v in dict(action_set[i]).items() if v != 0} for i in unified_action_table(substrate)]


def unexpressed_actions(substrate: str) -> list[str]:
  """Unified actions the substrate cannot express (mapped to NOOP instead)."""
  return [] if _action_mapping(substrate)[1] is not None else [A.ACTION_NAMES[A.INTERACT]]


def _format_action(action: dict[str, int]) -> str:
  return "{" + ", ".join(f"{k}: {v}" for k, v in action.items()) + "}" if action else "{} (no-op)"


def action_table_markdown(substrates: Sequence[str] | None = None) -> str:
  """The unified -> Melting Pot action mapping of every substrate, as Markdown (for README)."""
  substrates = mp_substrates.list_substrates() if substrates is None else list(substrates)
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
    cfg = mp_substrates.substrate_config(name)
    interact = unified_action_dicts(name)[A.INTERACT]
    missing = unexpressed_actions(name)
    interact_cell = f"`{_format_action(interact)}`" if not missing else "NOOP (no non-movement action)"
    counts = mp_substrates.PLAYER_COUNTS.get(name)
    used = set(unified_action_table(name))
    unused = [_format_action({k: int(v) for k, v in dict(a).items() if v != 0})
              for i, a in enumerate(cfg.action_set) if i not in used]
    allowed = mp_substrates.format_counts(counts) if counts else "unknown"
    lines.append(
        f"| `{name}` | {len(cfg.default_player_roles)} | {allowed} | "
        f"{len(cfg.action_set)} | {interact_cell} | {', '.join(missing) or '-'} | "
        f"{' '.join(f'`{u}`' for u in unused) or '-'} |")
  return "\n".join(lines) + "\n"
