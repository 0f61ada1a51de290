"""The training input: the Grain iterator of this process's shard, and the denoiser's latent table (the frozen
autoencoder's encoding of every training episode, cached between runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from ap_jax import fs
from ap_jax.data import dataset as dataset_lib
from ap_jax.data import frames as frames_lib
from ap_jax.data import locate
from ap_jax.data import pipeline as pipeline_lib
from ap_jax.model import vae as vae_lib
from ap_jax.train import config_utils

log = logging.getLogger("ap_jax.train")

def open_source(config: ml_collections.ConfigDict, split: str = "train"):
  """The random-access episode source of the config's data (live episodes, or a stored dataset's split)."""
  data = config.data
  if data.source == "live":
    return pipeline_lib.LiveEpisodeSource(locate.generation_spec(data))
  if data.source in locate.GENERATED_SOURCES + ("dir",):
    return dataset_lib.open_split(locate.resolve_dataset(data), split)
  raise config_utils.ConfigError(f"data.source = {data.source!r}, expected 'builtin', 'meltingpot', 'dir' or 'live'")


def build_data(config: ml_collections.ConfigDict, split: str = "train", latents: np.ndarray | None = None):
  """The Grain iterator of this process's shard of the training data (global batch / process count); with
  `latents` (`encode_source`), clips carry them instead of frames."""
  data = config.data
  pipe = pipeline_lib.PipelineConfig(
      clip_steps=int(data.clip_steps), max_players=int(config.model.max_players),
      global_batch_size=int(data.global_batch_size), permute_players=bool(data.permute_players),
      seed=int(config.seed), read_threads=int(data.read_threads), worker_count=int(data.worker_count),
      prefetch_buffer_size=int(data.prefetch_buffer_size))
  source = open_source(config, split)
  if latents is not None:
    source = pipeline_lib.LatentEpisodes(source, latents)
  return iter(pipeline_lib.make_dataset(source, pipe))


def close_iterator(iterator) -> None:
  """Stops a Grain iterator's worker processes and threads (a no-op for iterators without any)."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


def encode_source(source, vae_params, model_config, *, batch_frames: int = 128, progress: bool = True,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray | None:
  """Denoiser latents of every episode of a stored source, [episodes, T+1, h, w, c] float32, by the frozen
  autoencoder exactly as the training step would encode them (posterior mean, normalised). Held in host memory:
  for the small datasets of CPU-sized configs (2,000 tiny episodes: 280 MB); a pod-sized dataset wants latents
  written to disk instead. `should_stop` is asked before each call (a preemption notice must not wait minutes
  for the encoding to end): when it says stop, returns None."""
  encode = jax.jit(lambda p, x: vae_lib.vae_encode(p, model_config, x))
  first = source[0]
  frames_per_episode = np.asarray(first["frames"]).shape[0]
  per_call = max(1, batch_frames // frames_per_episode)
  out = None
  bar = tqdm(total=len(source), desc="encoding latents", unit="ep", disable=not progress, leave=False)
  for start in range(0, len(source), per_call):
    if should_stop is not None and should_stop():
      bar.close()
      return None
    idx = range(start, min(start + per_call, len(source)))
    frames = frames_lib.to_model_range(np.stack([np.asarray(source[i]["frames"]) for i in idx]))
    if len(idx) < per_call:  # one compiled shape: pad the last call
      frames = np.concatenate([frames, np.zeros((per_call - len(idx),) + frames.shape[1:], frames.dtype)])
    latents = np.asarray(jax.device_get(encode(vae_params, frames)))[:len(idx)]
    if out is None:
      out = np.empty((len(source),) + latents.shape[1:], np.float32)
    out[start:start + len(idx)] = latents
    bar.update(len(idx))
  bar.close()
  return out


def latent_cache_path(config: ml_collections.ConfigDict, ae_meta: dict, stage_meta: dict) -> str:
  """Where the training latents of this dataset, encoded by this autoencoder, are kept between runs (several
  denoisers on one autoencoder, as `ap-jax compare` trains, encode the same table): the cache folder, keyed by
  the dataset (its folder and train files) and the autoencoder (its weights' checksums, step and latent
  statistics). The autoencoder's workdir is never written to."""
  path = locate.resolve_dataset(config.data)
  path = path if fs.is_url(path) else os.path.realpath(path)
  info = dataset_lib.read_info(path)
  files = info.split_files.get("train") or []
  key = dict(dataset=path, generation=info.generation, vae=config.model.vae.to_dict(),
             train_files=[(fs.basename(f), n, fs.mtime(f)) for f, n in files],
             autoencoder=fs.absolute(config.autoencoder_workdir), step=ae_meta.get("step"),
             checksums=ae_meta.get("checksums"),
             statistics=[float(stage_meta["latent_shift"]), float(stage_meta["latent_scale"])])
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return os.path.join(locate.dataset_cache_dir(), "latents", f"{fs.basename(path)}-{digest}.npy")


def cached_latents(path: str, encode: Callable[[], np.ndarray | None]) -> np.ndarray | None:
  """The table at `path` if a run wrote it, else `encode()` (None: stopped), then written there atomically."""
  if os.path.exists(path):
    try:
      table = np.load(path)
      log.info("read the training latents %s from %s", list(table.shape), path)
      return table
    except (OSError, ValueError) as e:  # a damaged file: encode again and replace it
      log.warning("latent cache %s does not read (%s); encoding again", path, e)
  table = encode()
  if table is not None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
      np.save(f, table)
    os.replace(tmp, path)
  return table


def latent_statistics(config, ae_params) -> dict:
  """Latent shift and scale from a fixed set of training frames (deterministic, so resumes agree)."""
  it = build_data(config)
  frames = np.concatenate([next(it)["frames"] for _ in range(4)])
  shift, scale = vae_lib.latent_statistics(jax.device_get(ae_params), config.model, jnp.asarray(frames))
  return dict(latent_shift=shift, latent_scale=scale)
