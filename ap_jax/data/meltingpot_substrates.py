"""Melting Pot's substrates: importing Melting Pot, substrate names and configs, allowed player counts, roles.

Needs the `meltingpot` extra (`bash launch/install_meltingpot.sh`); importing this module does not, so the rest of
ap_jax works without it. Everything that touches Melting Pot imports it on first use (`import_meltingpot`).

Players: `num_players` players take roles spread evenly over the substrate's default role list (so
`predator_prey__*` with 2 players has one predator and one prey).

Allowed player counts: Melting Pot states no range per substrate. Its configs assert some (`coins` and
`hidden_agenda` have a MANDATED_NUM_PLAYERS, paintball needs an even count) and the maps bound the rest through
their spawn points. `PLAYER_COUNTS` lists, for 1 to 8 players (the schema's maximum), the counts with which the
substrate builds, starts and steps with every avatar on its own cell of the map; it was measured by
`meltingpot.probe_player_counts` on dm-meltingpot 2.4.1 and is re-checked by
`python -m ap_jax.data.meltingpot --probe`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

INSTALL_HINT = "bash launch/install_meltingpot.sh"


def import_meltingpot():
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
  _, _, substrate_configs, _ = import_meltingpot()
  return sorted(substrate_configs.SUBSTRATES)


def check_substrate(substrate: str) -> str:
  """Returns `substrate` if Melting Pot has it, else raises ValueError listing the valid names."""
  valid = list_substrates()
  if substrate not in valid:
    raise ValueError(f"unknown Melting Pot substrate {substrate!r}: expected one of {', '.join(valid)}")
  return substrate


@functools.lru_cache(maxsize=None)
def substrate_config(substrate: str):
  """The substrate's Melting Pot config (cached); ValueError for an unknown name."""
  _, _, substrate_configs, _ = import_meltingpot()
  return substrate_configs.get_config(check_substrate(substrate))


# --------------------------------------------------------------------------------------------------------------
# Players

# Player counts (of 1..8) with which each substrate builds, starts and steps with every avatar on its own cell.
# Measured by `meltingpot.probe_player_counts` on dm-meltingpot 2.4.1; `python -m ap_jax.data.meltingpot --probe`
# re-measures.
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


def format_counts(counts: Sequence[int]) -> str:
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
        f"num_players = {num_players!r} for substrate {substrate!r}, expected one of {format_counts(allowed)} "
        f"(default {len(substrate_config(substrate).default_player_roles)})")
  return int(num_players)


def roles_for(substrate: str, num_players: int) -> tuple[str, ...]:
  """Roles for `num_players` players: spread evenly over the default role list, so mixed games stay mixed."""
  default = tuple(substrate_config(substrate).default_player_roles)
  return tuple(default[(i * len(default)) // num_players % len(default)] for i in range(num_players))

