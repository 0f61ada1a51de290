"""The rollouts dataset as a TensorFlow Datasets builder writing ArrayRecord files.

One builder, `ap_jax_rollouts`, with one config per source: `builtin` (the JAX grid game) and Melting Pot
substrate groups (`meltingpot_coins`, `meltingpot_harvest`, `meltingpot_all`, and `meltingpot` for any list of
substrates given at build time). What a build generates (episode count, steps, player range, frame size, policy)
is a `GenerationSpec` handed to the builder, since those are run-time choices rather than fixed variants; the spec
is recorded in the dataset's metadata so that a dataset says how it was made.

Splits are by episode seed: episode i of split s has seed `spec.seed + SPLIT_SEED_OFFSETS[s] + i`, so no two
splits share an episode, and any episode can be regenerated (or replayed in the true game) from its seed.

With `beam=True` the builder hands each split to Apache Beam (TFDS's own Beam support: `_generate_examples` returns
a PTransform over chunks of seeds), so generation spreads over a Beam runner's workers: the DirectRunner's processes
here, Dataflow, Flink or Spark for a team (the `beam` extra). The episodes are the same either way; only their order
in the shards differs.

The builder module must live inside the package (TFDS records its code path). Reading needs neither this module
nor tensorflow: `ap_jax.data.dataset.open_split` reads the directory with `tfds.builder_from_directory`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from ap_jax import actions as A
from ap_jax.data import schema

SPLIT_SEED_OFFSETS = {"train": 0, "validation": 100_000_000, "test": 200_000_000}
SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}

MELTINGPOT_GROUPS: dict[str, tuple[str, ...] | None] = {
    "meltingpot_coins": ("coins",),
    "meltingpot_harvest": ("commons_harvest__open", "commons_harvest__closed", "commons_harvest__partnership"),
    "meltingpot_all": None,  # every substrate Melting Pot lists
    "meltingpot": (),  # substrates given by the user (`--substrates a,b`)
}


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
  """What to generate. Frames are [steps+1, canvas_hw[0], canvas_hw[1], 3]."""

  source: str = "builtin"
  substrates: tuple[str, ...] = ()  # built-in: layouts (empty = all); Melting Pot: substrate names
  episodes: int = 1000  # all splits together
  steps: int = 16
  players: tuple[int, int] = (2, 4)
  grid_hw: tuple[int, int] = (8, 8)  # built-in only
  cell_size: int = 8  # built-in only
  canvas_hw: tuple[int, int] = (64, 64)  # Melting Pot canvas; the built-in canvas is grid_hw * cell_size
  policy: str = "sticky"
  sticky_p: float = 0.7
  seed: int = 0
  workers: int = 2  # processes generating Melting Pot episodes
  chunk: int = 64  # built-in episodes per vmapped call

  def split_sizes(self) -> dict[str, int]:
    n_val = max(1, int(round(self.episodes * SPLIT_FRACTIONS["validation"])))
    n_test = max(1, int(round(self.episodes * SPLIT_FRACTIONS["test"])))
    n_train = self.episodes - n_val - n_test
    if n_train < 1:
      raise ValueError(f"episodes = {self.episodes}, expected at least 3 (one per split)")
    return {"train": n_train, "validation": n_val, "test": n_test}

  def frame_hw(self) -> tuple[int, int]:
    if self.source == "builtin":
      return (self.grid_hw[0] * self.cell_size, self.grid_hw[1] * self.cell_size)
    return tuple(self.canvas_hw)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  def content_hash(self) -> str:
    """12 hex digits naming what is generated (not how: `workers` and `chunk` leave the episodes unchanged)."""
    content = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("workers", "chunk")}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:12]


def config_name_for(spec: GenerationSpec) -> str:
  if spec.source == "builtin":
    return "builtin"
  return "meltingpot"


class ApJaxRollouts(tfds.core.GeneratorBasedBuilder):
  """Multi-player game rollouts (frames, per-player actions, positions and facings) for ActionParty."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: built-in game and Melting Pot rollouts."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="builtin", description="The built-in JAX grid game (ap_jax.games.gridgame)."),
  ] + [
      tfds.core.BuilderConfig(name=name, description=f"Melting Pot substrates: {subs or 'all' if subs is None else subs}")
      for name, subs in MELTINGPOT_GROUPS.items()
  ]

  def __init__(self, *, spec: GenerationSpec | None = None, beam: bool = False, **kwargs):
    self._spec = spec or GenerationSpec()
    self._beam = beam
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    t = self._spec.steps
    h, w = self._spec.frame_hw()
    zlib = "zlib"
    return self.dataset_info_from_configs(
        description=f"ap_jax rollouts; generation spec: {self._spec.to_json()}",
        features=tfds.features.FeaturesDict({
            "frames": tfds.features.Tensor(shape=(t + 1, h, w, 3), dtype=np.uint8, encoding=zlib),
            "actions": tfds.features.Tensor(shape=(t, None), dtype=np.int32, encoding=zlib),
            "positions": tfds.features.Tensor(shape=(t + 1, None, 2), dtype=np.float32, encoding=zlib),
            "orientations": tfds.features.Tensor(shape=(t + 1, None), dtype=np.int32, encoding=zlib),
            "player_mask": tfds.features.Tensor(shape=(None,), dtype=np.bool_, encoding=zlib),
            "colors": tfds.features.Tensor(shape=(None, 3), dtype=np.uint8, encoding=zlib),
            "source": tfds.features.Text(),
            "substrate": tfds.features.Text(),
            "seed": tfds.features.Scalar(dtype=np.int64),
            "cell_size": tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(generation=dataclasses.asdict(self._spec)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    sizes = self._spec.split_sizes()
    return {
        split: self._generate_examples(split=split, count=sizes[split])
        for split in ("train", "validation", "test")
    }

  def _generate_examples(self, split: str, count: int):
    seeds = [self._spec.seed + SPLIT_SEED_OFFSETS[split] + i for i in range(count)]
    if self._beam:
      import apache_beam as beam

      chunks = [seeds[i:i + self._spec.chunk] for i in range(0, count, self._spec.chunk)]
      return (f"seeds_{split}" >> beam.Create(chunks)
              | f"generate_{split}" >> beam.FlatMap(keyed_episodes, spec=self._spec, split=split))
    return keyed_episodes(seeds, spec=self._spec, split=split)


def keyed_episodes(seeds: list[int], *, spec: GenerationSpec, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(seed, episode) for each seed, checked against the schema: one split's examples, or one Beam chunk of them."""
  for episode in generate(spec, list(seeds)):
    schema.validate_episode(episode, where=f"{split} episode seed {episode['seed']}")
    yield int(episode["seed"]), episode


def generate(spec: GenerationSpec, seeds: list[int]) -> Iterator[dict[str, Any]]:
  """Episodes in the schema, in seed order, from the spec's source."""
  if spec.source == "builtin":
    yield from _generate_builtin(spec, seeds)
  elif spec.source == "meltingpot":
    yield from _generate_meltingpot(spec, seeds)
  else:
    raise ValueError(f"unknown source {spec.source!r}: expected 'builtin' or 'meltingpot'")


def _generate_builtin(spec: GenerationSpec, seeds: list[int]) -> Iterator[dict[str, Any]]:
  from ap_jax.games import gridgame

  config = gridgame.GameConfig(grid_height=spec.grid_hw[0], grid_width=spec.grid_hw[1], cell_size=spec.cell_size)
  layouts = tuple(spec.substrates) or gridgame.LAYOUTS
  for start in range(0, len(seeds), spec.chunk):
    chunk = seeds[start:start + spec.chunk]
    # Pad the last chunk to the full size so the vmapped rollout compiles once.
    padded = chunk + [chunk[-1]] * (spec.chunk - len(chunk))
    yield from gridgame.generate_episodes(padded, config=config, steps=spec.steps, players=spec.players,
                                          layouts=layouts, policy=spec.policy,
                                          sticky_p=spec.sticky_p)[:len(chunk)]


def meltingpot_episode_plan(spec: GenerationSpec, seed: int) -> tuple[str, int]:
  """(substrate, num_players) of a Melting Pot episode, drawn from its seed: a substrate, then one of the player
  counts that substrate allows within `spec.players` (some allow only a few, e.g. paintball even counts)."""
  from ap_jax.data import meltingpot_substrates

  rng = np.random.default_rng(np.uint64(seed) + np.uint64(0x5EED))
  substrate = spec.substrates[int(rng.integers(len(spec.substrates)))]
  allowed = [n for n in meltingpot_substrates.player_counts(substrate) if spec.players[0] <= n <= spec.players[1]]
  return substrate, int(allowed[int(rng.integers(len(allowed)))])


def _meltingpot_worker(args: tuple[GenerationSpec, int]) -> dict[str, Any]:
  from ap_jax.data import meltingpot

  spec, seed = args
  substrate, num_players = meltingpot_episode_plan(spec, seed)
  return meltingpot.generate_episode(substrate, num_players, spec.steps, seed, policy=spec.policy,
                                     sticky_p=spec.sticky_p, canvas_hw=tuple(spec.canvas_hw))


def _generate_meltingpot(spec: GenerationSpec, seeds: list[int]) -> Iterator[dict[str, Any]]:
  import logging

  if not spec.substrates:
    raise ValueError("a Melting Pot dataset needs substrates (e.g. --substrates coins,commons_harvest__open)")
  work = [(spec, s) for s in seeds]

  def full_length(episodes):
    # A substrate may end an episode early (e.g. *_in_the_matrix__one_shot); the dataset holds fixed-length
    # episodes, so those are left out (and logged) rather than padded with frames that never happened.
    for ep in episodes:
      if ep["actions"].shape[0] == spec.steps:
        yield ep
      else:
        logging.getLogger(__name__).warning(
            "Melting Pot %s seed %d ended after %d of %d steps: left out", ep["substrate"], ep["seed"],
            ep["actions"].shape[0], spec.steps)

  if spec.workers <= 1:
    yield from full_length(map(_meltingpot_worker, work))
    return
  # Environments are single-threaded: one process per core. Spawn, not fork: the parent has JAX threads.
  with multiprocessing.get_context("spawn").Pool(spec.workers) as pool:
    yield from full_length(pool.imap(_meltingpot_worker, work, chunksize=1))


def check_spec(spec: GenerationSpec) -> GenerationSpec:
  """Validates a spec before any work starts; returns it with Melting Pot substrate groups resolved."""
  lo, hi = spec.players
  if not 1 <= lo <= hi <= A.MAX_PLAYERS:
    raise ValueError(f"players = {lo}-{hi}, expected MIN-MAX with 1 <= MIN <= MAX <= {A.MAX_PLAYERS}")
  if spec.steps < 1:
    raise ValueError(f"steps = {spec.steps}, expected at least 1")
  if spec.policy not in ("uniform", "sticky"):
    raise ValueError(f"policy = {spec.policy!r}, expected 'uniform' or 'sticky'")
  spec.split_sizes()
  if spec.source == "builtin":
    from ap_jax.games import gridgame

    config = gridgame.GameConfig(grid_height=spec.grid_hw[0], grid_width=spec.grid_hw[1],
                                 cell_size=spec.cell_size)
    gridgame.check_num_players(hi, config)
    for name in spec.substrates:
      gridgame.layout_id(name)
    return spec
  if spec.source == "meltingpot":
    from ap_jax.data import meltingpot_substrates

    valid = meltingpot_substrates.list_substrates()
    substrates = spec.substrates or tuple(valid)
    unknown = [s for s in substrates if s not in valid]
    if unknown:
      raise ValueError(f"unknown Melting Pot substrate(s) {unknown}: expected names from {', '.join(valid)}")
    for name in substrates:
      allowed = meltingpot_substrates.player_counts(name)
      if not any(lo <= n <= hi for n in allowed):
        raise ValueError(f"players = {lo}-{hi}, but Melting Pot substrate {name!r} allows only "
                         f"{', '.join(map(str, allowed))} players")
    return dataclasses.replace(spec, substrates=tuple(substrates))
  raise ValueError(f"unknown source {spec.source!r}: expected 'builtin' or 'meltingpot'")
