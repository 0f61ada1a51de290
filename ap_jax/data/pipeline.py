"""The Grain input pipeline: stored (or live-generated) episodes -> padded, normalised training clips.

Stages, in order (each deterministic given `PipelineConfig.seed`, so a restored iterator state reproduces exactly
the batches that would have come next):

  1. source          `EpisodeSource` (a TFDS ArrayRecord split) or `LiveEpisodeSource` (the built-in game,
                     generating episodes on the fly from per-index seeds, so runs never repeat data)
  2. shuffle, repeat a global shuffle per epoch (stored sources only), repeated `num_epochs` times (None: forever)
  3. clip            a random window of `clip_steps` actions (`clip_steps + 1` frames) from each episode; player
                     slots padded to `max_players` with a mask; optionally a random permutation of the slots, so
                     slot identity cannot be memorised (a player's colour is the only stable identity)
  4. normalise       frames to float32 in [-1, 1] (or kept uint8 with `frames_dtype='uint8'`)
  5. shard           global batch g is clips [g B, (g + 1) B) of that global sequence; process k of n reads only
                     its contiguous slice [g B + k B/n, g B + (k + 1) B/n), so processes read disjoint data and
                     the global batch is the same whatever the number of processes (a run resumed on another
                     host count, or checked against a single process, sees identical batches)
  6. batch           `global_batch_size / process_count` clips per process
  7. prefetch        threads (`read_threads`) and optionally processes (`worker_count`, via `mp_prefetch`)

Every random choice (shuffle order, window start, slot permutation) is a function of the seed and the clip's
global index, never of the process or worker that computes it.

A clip (dimension letters: B batch, T = clip_steps, P = max_players, H, W pixels):

  frames        float32 [B, T+1, H, W, 3] in [-1, 1]
  actions       int32   [B, T, P]        padded slots: NOOP
  positions     float32 [B, T+1, P, 2]   pixel centres (y, x); padded slots: 0
  orientations  int32   [B, T+1, P]      padded slots: 0
  player_mask   bool    [B, P]
  colors        uint8   [B, P, 3]        padded slots: 0
  num_players   int32   [B]
  seed          int64   [B]              the episode's seed
  start         int32   [B]              the window's first frame in the episode
  latents       float32 [B, T+1, h, w, c] only for a source with precomputed latents (`LatentEpisodes`), whose
                clips carry no frames
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Protocol

import grain
import numpy as np

from ap_jax import actions as A
from ap_jax.data import frames as frames_lib

LIVE_SEED_OFFSET = 300_000_000  # live episodes never share seeds with stored splits (see tfds_builder)


class RandomAccessSource(Protocol):

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  clip_steps: int = 4
  max_players: int = A.MAX_PLAYERS
  global_batch_size: int = 8
  shuffle: bool = True
  permute_players: bool = True
  seed: int = 0
  num_epochs: int | None = None
  frames_dtype: str = "float32"
  drop_remainder: bool = True
  read_threads: int = 2
  prefetch_buffer_size: int = 8
  worker_count: int = 0  # > 0: Python worker processes via grain's mp_prefetch
  worker_buffer_size: int = 2


class ClipTransform(grain.transforms.RandomMap):
  """Cuts a random window from an episode, pads player slots, permutes them, and normalises frames."""

  def __init__(self, config: PipelineConfig):
    self.config = config

  def random_map(self, episode: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    return make_clip(episode, self.config, rng)


def make_clip(episode: dict[str, Any], config: PipelineConfig, rng: np.random.Generator | None = None,
              start: int | None = None) -> dict[str, Any]:
  """One training clip from one episode (see the module docstring for the layout)."""
  t, p_max = config.clip_steps, config.max_players
  actions = np.asarray(episode["actions"])
  steps, players = actions.shape
  if t > steps:
    raise ValueError(f"clip_steps = {t} is longer than the episode (seed {episode.get('seed')}), which has "
                     f"{steps} steps; expected clip_steps <= {steps}")
  if players > p_max:
    raise ValueError(f"episode seed {episode.get('seed')} has {players} players, but max_players = {p_max}")
  if start is None:
    start = int(rng.integers(0, steps - t + 1)) if rng is not None else 0
  frames = None if "frames" not in episode else np.asarray(episode["frames"])[start:start + t + 1]
  latents = None if "latents" not in episode else np.asarray(episode["latents"], np.float32)[start:start + t + 1]
  if frames is None and latents is None:
    raise ValueError(f"episode seed {episode.get('seed')} carries neither frames nor latents")

  def pad(x, fill=0):  # per-player arrays here are [time, player, ...] (np.pad cost 4x this per clip)
    x = np.asarray(x)
    out = np.full((x.shape[0], p_max) + x.shape[2:], fill, x.dtype)
    out[:, :players] = x
    return out

  clip_actions = pad(actions[start:start + t], A.NOOP)
  positions = pad(np.asarray(episode["positions"])[start:start + t + 1])
  orientations = pad(np.asarray(episode["orientations"])[start:start + t + 1])
  mask = np.arange(p_max) < players
  colors = np.zeros((p_max, 3), np.uint8)
  colors[:players] = episode["colors"]
  if config.permute_players and rng is not None:
    perm = rng.permutation(p_max)
    clip_actions, positions, orientations = clip_actions[:, perm], positions[:, perm], orientations[:, perm]
    mask, colors = mask[perm], colors[perm]
  if config.frames_dtype not in ("float32", "uint8"):
    raise ValueError(f"frames_dtype = {config.frames_dtype!r}, expected 'float32' or 'uint8'")
  clip = dict(
      actions=clip_actions.astype(np.int32),
      positions=positions.astype(np.float32),
      orientations=orientations.astype(np.int32),
      player_mask=mask,
      colors=colors,
      num_players=np.int32(players),
      seed=np.int64(episode["seed"]),
      start=np.int32(start),
  )
  if frames is not None:
    clip["frames"] = frames_lib.to_model_range(frames) if config.frames_dtype == "float32" else frames
  if latents is not None:
    clip["latents"] = latents
  return clip


class LatentEpisodes:
  """A source's episodes held in host memory with precomputed denoiser latents [T+1, h, w, c] (`latents[i]` for
  episode i) in place of their frames; `make_clip` cuts the latents like the frames (key `latents`).

  With the frozen autoencoder's latents cached (`data.cache_latents`) the training step never reads pixels. Each
  episode's small arrays (actions, positions, facings, colours) are read once here, so a clip costs a slice of
  host memory instead of an ArrayRecord read and decode each time: the read was half of the 1.1 ms per clip that
  made the tiny denoiser's step input-bound on a GPU (docs/research_log.md entry 18)."""

  def __init__(self, source: RandomAccessSource, latents: np.ndarray):
    if len(latents) != len(source):
      raise ValueError(f"{len(latents)} latent episodes for a source of {len(source)} episodes")
    self._episodes = [{k: v for k, v in source[i].items() if k != "frames"} for i in range(len(source))]
    self._latents = latents
    self.info = getattr(source, "info", None)

  def __len__(self) -> int:
    return len(self._episodes)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return dict(self._episodes[index], latents=self._latents[index])


class LiveEpisodeSource:
  """Built-in game episodes generated on demand: global index i is the episode with seed
  `seed + LIVE_SEED_OFFSET + i`. Processes and Grain workers read disjoint global indices (see `make_dataset`),
  so they never produce the same episode, and every episode is reproducible from its index.

  Episodes are generated `chunk` at a time with one vmapped call and cached, since each process reads runs of
  consecutive indices (live episodes are already random, so they are not shuffled).
  """

  def __init__(self, spec, *, length: int = 2**31 - 1, chunk: int = 8):
    from ap_jax.data import tfds_builder

    if spec.source != "builtin":
      raise ValueError(f"the live source generates built-in game episodes only, got source {spec.source!r}")
    self.spec = tfds_builder.check_spec(spec)
    self._length = length
    self._chunk = chunk
    self._cache: collections.OrderedDict[int, list[dict[str, Any]]] = collections.OrderedDict()

  def __len__(self) -> int:
    return self._length

  def seed_of(self, index: int) -> int:
    return self.spec.seed + LIVE_SEED_OFFSET + index

  def __getitem__(self, index: int) -> dict[str, Any]:
    from ap_jax.data import tfds_builder

    if not 0 <= index < self._length:
      raise IndexError(f"live episode index {index} out of range [0, {self._length})")
    chunk_id = index // self._chunk
    if chunk_id not in self._cache:
      first = chunk_id * self._chunk
      seeds = [self.seed_of(i) for i in range(first, min(first + self._chunk, self._length))]
      spec = dataclasses.replace(self.spec, chunk=self._chunk)
      self._cache[chunk_id] = list(tfds_builder.generate(spec, seeds))
      while len(self._cache) > 4:
        self._cache.popitem(last=False)
    return self._cache[chunk_id][index - chunk_id * self._chunk]

  def __repr__(self) -> str:
    return f"LiveEpisodeSource({self.spec})"


class ProcessSlice(grain.MapDataset):
  """Process k's part of a global sequence: local element j is global element
  (j // b) * b * n + k * b + j % b, with b the per-process batch and n processes."""

  def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, local_batch: int):
    super().__init__(parent)
    self._index, self._count, self._local = process_index, process_count, local_batch

  def __len__(self) -> int:
    return (len(self._parent) // (self._local * self._count)) * self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    group, offset = divmod(int(index), self._local)
    return self._parent[group * self._local * self._count + self._index * self._local + offset]

  def __str__(self) -> str:
    return f"ProcessSlice(process {self._index} of {self._count}, {self._local} per batch)"


def make_dataset(source: RandomAccessSource, config: PipelineConfig, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """Builds the Grain pipeline for this process. Iterate it with `iter(...)`; the iterator has
  `get_state()`/`set_state()` for checkpointing."""
  if process_index is None or process_count is None:
    import jax

    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index = {process_index}, expected 0 <= index < process_count = {process_count}")
  if config.global_batch_size % process_count:
    raise ValueError(f"global_batch_size = {config.global_batch_size} does not divide over {process_count} "
                     "processes; expected a multiple of the process count")
  if not 1 <= config.max_players <= A.MAX_PLAYERS:
    raise ValueError(f"max_players = {config.max_players}, expected 1 to {A.MAX_PLAYERS}")
  if config.clip_steps < 1:
    raise ValueError(f"clip_steps = {config.clip_steps}, expected at least 1")
  info = getattr(source, "info", None)
  if info is not None:
    gen = info.generation
    if config.clip_steps > info.steps:
      raise ValueError(f"clip_steps = {config.clip_steps} is longer than the episodes of {info.path}, which have "
                       f"{info.steps} steps; expected clip_steps <= {info.steps}")
    if gen.get("players") and gen["players"][1] > config.max_players:
      raise ValueError(f"{info.path} has episodes with up to {gen['players'][1]} players, but max_players = "
                       f"{config.max_players}")
  live = isinstance(source, LiveEpisodeSource)
  if live and config.clip_steps > source.spec.steps:
    raise ValueError(f"clip_steps = {config.clip_steps} is longer than live episodes of {source.spec.steps} steps")
  local_batch = config.global_batch_size // process_count

  ds = grain.MapDataset.source(source)
  if len(ds) < config.global_batch_size and config.drop_remainder and not live:
    raise ValueError(f"{len(ds)} episodes are fewer than one global batch of {config.global_batch_size}")
  ds = ds.seed(config.seed)
  if config.shuffle and not live:
    ds = ds.shuffle()
  if not live:
    ds = ds.repeat(config.num_epochs)
  ds = ds.random_map(ClipTransform(config))
  if process_count > 1:
    ds = ProcessSlice(ds, process_index, process_count, local_batch)
  ds = ds.batch(local_batch, drop_remainder=config.drop_remainder)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=config.prefetch_buffer_size))
  if config.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                     per_worker_buffer_size=config.worker_buffer_size))
  return it


def global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict[str, Any]:
  """Assembles each process's local batch into global jax.Arrays laid out by `sharding` (batch-leading)."""
  import jax

  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
