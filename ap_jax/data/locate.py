"""Where datasets live: the cache folder, what a config's generated source generates, and the dataset directory a
config reads (generated into the cache on first use). Training, evaluation and the demo all find their data here.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from ap_jax import fs
from ap_jax.data import dataset as dataset_lib
from ap_jax.data import tfds_builder
from ap_jax.train import config_utils

log = logging.getLogger("ap_jax.data")

def dataset_cache_dir() -> str:
  return os.environ.get("AP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ap_jax"))


def generation_spec(data: ml_collections.ConfigDict, heldout: bool = False) -> tfds_builder.GenerationSpec:
  """What `data.source = 'builtin'` or `'meltingpot'` generates (`data.substrates` on a `data.frame_hw` canvas for
  Melting Pot). With `heldout`, the Melting Pot substrates held out of training (`data.heldout_substrates`, with
  `data.heldout_players` and `data.heldout_episodes`), on the same canvas, steps and policy."""
  common = dict(episodes=int(data.episodes), steps=int(data.steps), players=tuple(data.players), policy=data.policy,
                sticky_p=float(data.sticky_p), seed=int(data.generation_seed))
  if data.source == "meltingpot":
    if not data.get("frame_hw"):
      raise config_utils.ConfigError("data.source = 'meltingpot' needs data.frame_hw, the canvas (height, width)")
    common.update(source="meltingpot", canvas_hw=(int(data.frame_hw[0]), int(data.frame_hw[1])),
                  substrates=tuple(data.get("substrates") or ()))
    if heldout:
      held = tuple(data.get("heldout_substrates") or ())
      if not held:
        raise config_utils.ConfigError("no held-out substrates: set data.heldout_substrates (comma-separated "
                                       "Melting Pot substrates not in data.substrates)")
      overlap = sorted(set(held) & set(common["substrates"]))
      if overlap:
        raise config_utils.ConfigError(f"data.heldout_substrates = {held} includes training substrates {overlap}")
      common.update(substrates=held, players=tuple(data.get("heldout_players") or data.players),
                    episodes=int(data.get("heldout_episodes") or data.episodes))
    return tfds_builder.GenerationSpec(**common)
  if heldout:
    raise config_utils.ConfigError(f"held-out substrates are for data.source = 'meltingpot', not {data.source!r}")
  return tfds_builder.GenerationSpec(source="builtin", grid_hw=tuple(data.grid), cell_size=int(data.cell_size),
                                     substrates=tuple(data.get("substrates") or ()), **common)


GENERATED_SOURCES = ("builtin", "meltingpot")


def resolve_dataset(data: ml_collections.ConfigDict, heldout: bool = False) -> str:
  """The dataset directory of `data.source = 'dir'` (data.dir), or of a generated source ('builtin' or
  'meltingpot'), generated into the cache the first time (every process may do so; the atomic rename keeps exactly
  one copy) under a name that hashes what was generated. `heldout`: the held-out Melting Pot substrates' dataset
  (`generation_spec`)."""
  if data.source == "dir" and not heldout:
    if not data.dir:
      raise config_utils.ConfigError("data.source = 'dir' needs data.dir, a dataset written by `ap-jax data`")
    return data.dir
  if data.source not in GENERATED_SOURCES:
    raise config_utils.ConfigError(f"data.source = {data.source!r} has no generated dataset; expected one of "
                                   f"{', '.join(GENERATED_SOURCES)}" + (" for held-out substrates" if heldout else ""))
  return cached_dataset(generation_spec(data, heldout), data.dir if data.dir and not heldout else None)


def cached_dataset(spec: tfds_builder.GenerationSpec, path: str | None = None) -> str:
  """The dataset `spec` generates, at `path` or in the cache under a name that hashes the spec; generated there the
  first time (every process may do so; the atomic rename keeps exactly one copy)."""
  path = path or os.path.join(dataset_cache_dir(), "datasets", f"{spec.source}-{spec.content_hash()}")
  if not fs.exists(fs.join(path, dataset_lib.INFO_FILE)):
    log.info("%s dataset not found at %s: generating %d episodes", spec.source, path, spec.episodes)
    try:
      dataset_lib.build(spec, path)
    except (FileExistsError, OSError):
      if not fs.exists(fs.join(path, dataset_lib.INFO_FILE)):
        raise
  return path


def frame_hw(config) -> tuple[int, int]:
  data = config.data
  if data.get("frame_hw"):
    return int(data.frame_hw[0]), int(data.frame_hw[1])
  return int(data.grid[0]) * int(data.cell_size), int(data.grid[1]) * int(data.cell_size)
