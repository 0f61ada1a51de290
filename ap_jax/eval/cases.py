"""The rollouts an evaluation runs: a `Case` is one rollout to generate (the initial frame, each player's initial
position, the actions) with its truth (the true game's replay of the same actions from the same seed:
`ap_jax.eval.replay`), when there is one. Cases come from dataset episodes, action files, or fresh built-in or
Melting Pot episodes of chosen player counts.

Dimension letters: T steps (actions) per rollout, P players, H, W pixels.

Held-out episodes for player counts the dataset lacks (`fresh_builtin_cases`) use seeds
`generation_seed + FRESH_SEED_OFFSET + 1000 n + i` for n players: disjoint from every dataset split
(`tfds_builder.SPLIT_SEED_OFFSETS` 0 / 1e8 / 2e8) and from live training episodes (`pipeline.LIVE_SEED_OFFSET`,
3e8), so the model has never seen them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import numpy as np

from ap_jax import actions as A
from ap_jax.data import dataset as dataset_lib
from ap_jax.data import locate
from ap_jax.data import meltingpot_substrates
from ap_jax.eval import action_files, replay
from ap_jax.games import gridgame

log = logging.getLogger("ap_jax.eval.cases")

FRESH_SEED_OFFSET = 400_000_000


class EvalError(ValueError):
  """Inputs that cannot be evaluated (wrong source, too many steps, no detector); names the problem."""


@dataclasses.dataclass
class Case:
  """One rollout to generate. frame uint8 [H, W, 3]; positions float32 [P, 2] pixel centres (y, x); actions int32
  [T, P]; colors uint8 [P, 3]; truth: the replay dict (frames [T+1, ...], cells, positions, orientations, ...) or
  None; name: where it came from (for logs and JSON)."""

  frame: np.ndarray
  positions: np.ndarray
  actions: np.ndarray
  colors: np.ndarray
  truth: dict[str, Any] | None
  name: str
  seed: int
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  orientations: np.ndarray | None = None  # int [P] initial facing (0 N, 1 E, 2 S, 3 W), when known

  def initial_orientations(self) -> np.ndarray:
    """Each player's initial facing: the case's own, or the true game's first frame's."""
    if self.orientations is not None:
      return np.asarray(self.orientations, np.int32)
    if self.truth is not None and "orientations" in self.truth:
      return np.asarray(self.truth["orientations"][0], np.int32)
    raise EvalError(f"{self.name}: no initial orientations, which a model with facing in its subject state needs")

  @property
  def num_players(self) -> int:
    return int(self.actions.shape[1])


def _check_steps(steps: int | None, available: int, what: str) -> int:
  if steps is None:
    return available
  if not 1 <= steps <= available:
    raise EvalError(f"--steps {steps}, but {what} has {available} steps of actions; expected 1 to {available}")
  return int(steps)


def case_from_episode(episode: dict[str, Any], steps: int | None, name: str) -> Case:
  """A dataset episode's first frame, positions and first `steps` actions; truth replayed in the true game from
  the episode's seed (Melting Pot needs the meltingpot extra; `replay.replay_episode`)."""
  actions = np.asarray(episode["actions"], np.int32)
  steps = _check_steps(steps, actions.shape[0], f"episode {name} (seed {episode['seed']})")
  actions = actions[:steps]
  truth = replay.replay_episode(episode, actions)
  return Case(frame=np.asarray(episode["frames"])[0], positions=np.asarray(episode["positions"], np.float32)[0],
              actions=actions, colors=np.asarray(episode["colors"], np.uint8), truth=truth, name=name,
              seed=int(episode["seed"]), info=dict(source=str(episode["source"]), layout=str(episode["substrate"])))


def dataset_cases(config, split: str, indices: Sequence[int], steps: int | None) -> list[Case]:
  """Episodes `indices` of `split` of the training config's dataset (`locate.resolve_dataset`)."""
  if config.data.source == "live":
    raise EvalError("the model was trained on live built-in episodes (data.source = 'live'), which have no stored "
                    "splits: use `--players MIN-MAX` (fresh held-out episodes) or an action file instead")
  return dataset_dir_cases(locate.resolve_dataset(config.data), split, indices, steps)


def dataset_dir_cases(path: str, split: str, indices: Sequence[int], steps: int | None) -> list[Case]:
  """Episodes `indices` of `split` of the dataset at `path` (`ap-jax data`), each with its true game's replay."""
  source = dataset_lib.open_split(path, split)
  cases = []
  for k in indices:
    if not 0 <= k < len(source):
      raise EvalError(f"episode {k}: split {split!r} of {path} has episodes 0 to {len(source) - 1}")
    cases.append(case_from_episode(source[k], steps, f"{split}:{k}"))
  return cases


def check_frame_size(config, cases: Sequence[Case]) -> None:
  """Cases from another dataset must have the frame size the model was trained on."""
  hw = tuple(locate.frame_hw(config))
  for case in cases:
    if tuple(case.frame.shape[:2]) != hw:
      raise EvalError(f"{case.name}: frames are {case.frame.shape[0]} x {case.frame.shape[1]} px, but the model was "
                      f"trained on {hw[0]} x {hw[1]} px frames; expected a dataset of that canvas")


def game_config(config):
  """The built-in game's GameConfig for frames of the size the model was trained on."""
  return replay.builtin_config(locate.frame_hw(config), int(config.data.cell_size))


def case_from_action_file(config, path: str, steps: int | None) -> Case:
  """An action file (ap_jax.eval.action_files) with a `seed`: the initial frame is the true game's reset for that
  seed (built-in: `layout`, default the layout the dataset would draw for that seed; Melting Pot: `substrate`)."""
  actions, meta = action_files.load_action_file(path)
  if "seed" not in meta:
    raise action_files.ActionFileError(
        f"{path}: no 'seed': the initial frame comes from the true game's reset for a seed, so the file needs "
        "\"seed\": <non-negative integer> (and optionally \"layout\")")
  steps = _check_steps(steps, actions.shape[0], f"action file {path}")
  actions = actions[:steps]
  seed, num_players = int(meta["seed"]), actions.shape[1]
  source = meta.get("source", "builtin")
  if source == "meltingpot":
    if "substrate" not in meta:
      raise action_files.ActionFileError(f"{path}: source 'meltingpot' needs a 'substrate'")

    try:
      truth = replay.replay_meltingpot(str(meta["substrate"]), seed, actions, locate.frame_hw(config))
    except ImportError as e:
      raise EvalError(f"{path} asks for Melting Pot, which is not installed ({e}); install the meltingpot extra") \
          from e
    layout = str(meta["substrate"])
  else:
    if "substrate" in meta:
      raise action_files.ActionFileError(f"{path}: 'substrate' is for source 'meltingpot'; the built-in game takes "
                                         f"'layout' ({', '.join(gridgame.LAYOUTS)})")
    layout = meta.get("layout")
    if layout is None:
      layout = gridgame.LAYOUTS[gridgame.episode_spec(seed, (num_players, num_players))[1]]
    truth = replay.replay_builtin(seed, layout, actions, game_config(config))
  return Case(frame=truth["frames"][0], positions=truth["positions"][0], actions=actions, colors=truth["colors"],
              truth=truth, name=os.path.basename(path), seed=seed, info=dict(source=source, layout=layout))


def fresh_builtin_cases(config, players: tuple[int, int], episodes_per_count: int, steps: int) -> list[Case]:
  """`episodes_per_count` new built-in episodes for each player count in [MIN, MAX], from held-out seeds (module
  docstring), played with the dataset's policy; layouts drawn from each seed as the dataset draws them."""
  if config.data.source == "dir":
    generation = dataset_lib.read_info(config.data.dir).generation
    if generation.get("source", "builtin") != "builtin":
      raise EvalError(f"--players makes fresh built-in-game episodes, but the model was trained on "
                      f"{generation.get('source')!r} data ({config.data.dir}): they would be another game")
  lo, hi = players
  if not 1 <= lo <= hi <= A.MAX_PLAYERS:
    raise EvalError(f"--players {lo}-{hi}, expected 1 <= MIN <= MAX <= {A.MAX_PLAYERS}")
  if steps < 1:
    raise EvalError(f"--steps {steps}, expected at least 1")
  game = game_config(config)
  cases = []
  for n in range(lo, hi + 1):
    seeds = [int(config.data.generation_seed) + FRESH_SEED_OFFSET + 1000 * n + i for i in range(episodes_per_count)]
    for ep in gridgame.generate_episodes(seeds, config=game, steps=steps, players=(n, n),
                                         policy=str(config.data.policy), sticky_p=float(config.data.sticky_p)):
      truth = replay.replay_episode(ep)
      cases.append(Case(frame=ep["frames"][0], positions=ep["positions"][0], actions=ep["actions"],
                        colors=ep["colors"], truth=truth, name=f"fresh:{n}p:{ep['seed']}", seed=int(ep["seed"]),
                        info=dict(source="builtin", layout=ep["substrate"])))
  return cases


def fresh_meltingpot_cases(config, players: tuple[int, int], episodes_per_count: int, steps: int) -> list[Case]:
  """`episodes_per_count` new Melting Pot episodes of the config's training substrates for each player count in
  [MIN, MAX] that at least one of them allows (counts none allows are skipped, and logged), `steps` actions long,
  from seeds `generation_seed + FRESH_SEED_OFFSET + ...`: a dataset per count, generated into the cache once."""
  if config.data.source != "meltingpot":
    raise EvalError(f"fresh Melting Pot episodes need a model trained on data.source = 'meltingpot', not "
                    f"{config.data.source!r}")
  lo, hi = players
  if not 1 <= lo <= hi <= A.MAX_PLAYERS:
    raise EvalError(f"--players {lo}-{hi}, expected 1 <= MIN <= MAX <= {A.MAX_PLAYERS}")
  if steps < 1 or episodes_per_count < 1:
    raise EvalError(f"steps {steps}, episodes per count {episodes_per_count}: expected at least 1 of each")
  spec = locate.generation_spec(config.data)
  cases = []
  for n in range(lo, hi + 1):
    substrates = tuple(s for s in spec.substrates if n in meltingpot_substrates.player_counts(s))
    if not substrates:
      log.info("no training substrate takes %d players (%s): skipped", n, ", ".join(spec.substrates))
      continue
    total = max(episodes_per_count, 3)  # a dataset has at least one episode per split
    while dataclasses.replace(spec, episodes=total).split_sizes()["train"] < episodes_per_count:
      total += 1
    fresh = dataclasses.replace(spec, substrates=substrates, players=(n, n), steps=steps, episodes=total,
                                seed=spec.seed + FRESH_SEED_OFFSET + 1000 * n)
    path = locate.cached_dataset(fresh)
    cases += [dataclasses.replace(c, name=f"fresh:{n}p:{c.seed}")
              for c in dataset_dir_cases(path, "train", range(episodes_per_count), steps)]
  if not cases:
    raise EvalError(f"no training substrate ({', '.join(spec.substrates)}) takes {lo}-{hi} players")
  return cases


def fresh_cases(config, players: tuple[int, int], episodes_per_count: int, steps: int) -> list[Case]:
  """Fresh held-out episodes of each player count: of the built-in game, or of the config's Melting Pot
  substrates."""
  if config.data.source == "meltingpot":
    return fresh_meltingpot_cases(config, players, episodes_per_count, steps)
  return fresh_builtin_cases(config, players, episodes_per_count, steps)
