"""`ap-jax train`: sharded, resumable, multi-host training of both stages (autoencoder, then denoiser).

The trainer is a handful of `build_*` functions, each importable on its own (jasmine / big_vision style):

  build_mesh        mesh from `config.mesh`, logical-axis rules from `config.logical_axis_rules`
  build_stage       the model half being trained: init, logical axes, loss (autoencoder or denoiser)
  build_optimizer   optax AdamW + schedule + clipping + decay mask, and the EMA decay
  build_data        the Grain pipeline for this process (the built-in dataset is generated on first use)
  build_state       the jitted, sharded init (parameters are born sharded) and the state's shardings
  build_step        `jax.jit(step, in_shardings, out_shardings, donate_argnums)`, compiled ahead of time

`train(config, workdir)` runs the loop: it always resumes from the workdir when a checkpoint is there, saves
every `checkpoint_every` steps (asynchronously) and on SIGTERM / Ctrl-C (after finishing the current step), and
stops on a NaN or inf loss naming the step, leaving the last good checkpoint in place.

Randomness: the step's key is `fold_in(key(seed), step)`, and the data order is a function of the seed and the
restored iterator state, so a resumed run repeats exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ap_jax.data import dataset as dataset_lib
from ap_jax.data import pipeline as pipeline_lib
from ap_jax.data import tfds_builder
from ap_jax.model import config as model_config_lib
from ap_jax.model import dit as dit_lib
from ap_jax.model import layers as layers_lib
from ap_jax.model import sharding as sharding_lib
from ap_jax.model import vae as vae_lib
from ap_jax.train import checkpoint as checkpoint_lib
from ap_jax.train import config_utils
from ap_jax.train import mesh as mesh_lib
from ap_jax.train import optim as optim_lib

log = logging.getLogger("ap_jax.train")

STAGES = ("autoencoder", "denoiser")

# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices (CPU) report MFU as null.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


class TrainError(RuntimeError):
  pass


class Stopped(Exception):
  """A job of several stages (demo, compare) was asked to stop (SIGTERM / Ctrl-C) while one was training: that
  stage saved a checkpoint, and the job stops instead of going on to the next stage with a half-trained one."""

  def __init__(self, signal_name: str, what: str):
    self.signal_name = signal_name
    super().__init__(f"stopped by {signal_name} while training {what}; its checkpoint is saved, and the same "
                     "command resumes the job")


def train_stage(config: ml_collections.ConfigDict, workdir: str, *, what: str, progress: bool = True) -> dict:
  """`train`, for a stage of a longer job: raises Stopped when a signal stopped it before `total_steps`."""
  summary = train(config, workdir, progress=progress)
  if summary.get("stopped_by"):
    raise Stopped(summary["stopped_by"], f"{what} ({workdir}, step {summary['end_step']} of "
                                         f"{summary['total_steps']})")
  return summary


# ---------------------------------------------------------------------------------------------------- stages


@dataclasses.dataclass
class Stage:
  """One trainable half of the model. `loss(params, batch, rng, frozen)` -> (loss, metrics)."""

  name: str
  model_config: ml_collections.ConfigDict
  init: Callable[[jax.Array], Any]
  logical_axes: Any
  loss: Callable[..., tuple[jax.Array, dict]]
  batch_keys: tuple[str, ...]
  frozen: Any = None  # parameters of earlier stages (the autoencoder, for the denoiser), not trained
  frozen_axes: Any = None
  meta: dict = dataclasses.field(default_factory=dict)


def build_stage(config: ml_collections.ConfigDict, *, frozen: Any = None, meta: dict | None = None) -> Stage:
  """The stage `config.stage` names. The denoiser needs the trained autoencoder's parameters (`frozen`) and its
  latent statistics (`meta['latent_shift']`, `meta['latent_scale']`)."""
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  if config.stage == "autoencoder":
    crop = int(config.get("autoencoder_crop", 0))
    on_subjects = float(config.get("autoencoder_crop_on_subjects", 0.0))
    if not 0.0 <= on_subjects <= 1.0:
      raise config_utils.ConfigError(f"autoencoder_crop_on_subjects = {on_subjects}, expected a fraction in [0, 1]")
    if on_subjects and not crop:
      raise config_utils.ConfigError(f"autoencoder_crop_on_subjects = {on_subjects} needs autoencoder_crop > 0")
    foreground = model_config.vae.get("foreground", "colour")
    if foreground not in ("colour", "subjects"):
      raise config_utils.ConfigError(f"model.vae.foreground = {foreground!r}, expected 'colour' or 'subjects'")
    needs_positions = foreground == "subjects" or on_subjects > 0

    def ae_loss(params, batch, rng, frozen):
      del frozen
      frames, weights = batch["frames"], None
      if foreground == "subjects":
        weights = vae_lib.subject_weights(batch["positions"], batch["player_mask"], frames.shape[2:4],
                                          float(model_config.vae.subject_radius_px),
                                          float(model_config.vae.foreground_weight))
      if crop:
        rng, crop_rng = jax.random.split(rng)
        subjects = (batch["positions"], batch["player_mask"], on_subjects) if on_subjects else None
        if weights is None:
          frames = random_crops(frames, crop, crop_rng, subjects)
        else:  # the same crop of the frames and their weights
          both = random_crops(jnp.concatenate([frames, weights], axis=-1), crop, crop_rng, subjects)
          frames, weights = both[..., :-1], both[..., -1:]
      return vae_lib.vae_loss(params, model_config, frames, rng, weights)

    return Stage(
        name="autoencoder", model_config=model_config,
        init=lambda rng: vae_lib.vae_init(rng, model_config),
        logical_axes=vae_lib.vae_logical_axes(model_config), loss=ae_loss,
        batch_keys=("frames",) + (("positions", "player_mask") if needs_positions else ()))
  if config.stage == "denoiser":
    if frozen is None or meta is None:
      raise TrainError("the denoiser stage needs a trained autoencoder: set --config.autoencoder_workdir")
    model_config.vae.latent_shift = float(meta["latent_shift"])
    model_config.vae.latent_scale = float(meta["latent_scale"])

    def loss(params, batch, rng, frozen_params):
      if "latents" in batch:  # precomputed by the frozen autoencoder (data.cache_latents)
        latents = batch["latents"]
      else:
        latents = jax.lax.stop_gradient(vae_lib.vae_encode(frozen_params, model_config, batch["frames"]))
      dit_batch = dict(latents=latents, positions=batch["positions"], actions=batch["actions"],
                       player_mask=batch["player_mask"])
      if "orientations" in batch:
        dit_batch["orientations"] = batch["orientations"]
      return dit_lib.loss_fn(params, model_config, dit_batch, rng)

    return Stage(
        name="denoiser", model_config=model_config,
        init=lambda rng: dit_lib.init(rng, model_config),
        logical_axes=dit_lib.param_logical_axes(model_config), loss=loss,
        batch_keys=("latents" if config.data.get("cache_latents", False) else "frames", "actions", "positions",
                    "player_mask") + (("orientations",) if model_config.dit.get("state_facing", False) else ()),
        frozen=frozen, frozen_axes=vae_lib.vae_logical_axes(model_config), meta=dict(meta))
  raise config_utils.ConfigError(f"stage = {config.stage!r}, expected one of {STAGES}")


def random_crops(frames_BTHWC: jax.Array, size: int, rng: jax.Array,
                 subjects: tuple[jax.Array, jax.Array, float] | None = None) -> jax.Array:
  """One random size x size crop per frame, [B, T, H, W, C] -> [B T, 1, size, size, C]. The autoencoder is
  convolutional, so crops teach it the same thing as whole frames at a fraction of the cost.

  `subjects` = (positions [B, T, P, 2] in pixels (y, x), player_mask [B, P], fraction): that fraction of the crops
  contains a real player, drawn at random, anywhere in the crop's middle half (clipped to the frame). Players
  are a few percent of a large canvas, so uniform crops mostly show the floor: on Melting Pot's 128 x 128 kitchens
  they left the sprites blurred (docs/research_log.md entry 25). Frames of clips without players keep uniform crops.
  """
  b, t, h, w, c = frames_BTHWC.shape
  if size > min(h, w):
    raise config_utils.ConfigError(f"autoencoder_crop = {size} is larger than the {h}x{w} frames")
  flat = frames_BTHWC.reshape(b * t, h, w, c)
  ky, kx, kp, kj, kf = jax.random.split(rng, 5)
  ys = jax.random.randint(ky, (b * t,), 0, h - size + 1)
  xs = jax.random.randint(kx, (b * t,), 0, w - size + 1)
  if subjects is not None:
    positions, player_mask, fraction = subjects
    real = jnp.broadcast_to(player_mask.astype(bool)[:, None, :], positions.shape[:3]).reshape(b * t, -1)
    # A random real player per frame: the argmax of Gumbel-perturbed logits that are -inf on padding slots.
    logits = jnp.where(real, 0.0, -jnp.inf) + jax.random.gumbel(kp, real.shape)
    who = jnp.argmax(logits, axis=-1)
    centre = jnp.take_along_axis(positions.reshape(b * t, -1, 2).astype(jnp.float32), who[:, None, None], axis=1)[:, 0]
    jitter = jax.random.uniform(kj, (b * t, 2), minval=-size / 4, maxval=size / 4)
    corner = jnp.round(centre + jitter - size / 2).astype(jnp.int32)
    use = (jax.random.uniform(kf, (b * t,)) < fraction) & jnp.any(real, axis=-1)
    ys = jnp.where(use, jnp.clip(corner[:, 0], 0, h - size), ys)
    xs = jnp.where(use, jnp.clip(corner[:, 1], 0, w - size), xs)
  crop = lambda f, y, x: jax.lax.dynamic_slice(f, (y, x, 0), (size, size, c))
  return jax.vmap(crop)(flat, ys, xs)[:, None]


# ------------------------------------------------------------------------------------------------------ data


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
  if not os.path.exists(os.path.join(path, dataset_lib.INFO_FILE)):
    log.info("%s dataset not found at %s: generating %d episodes", spec.source, path, spec.episodes)
    try:
      dataset_lib.build(spec, path)
    except (FileExistsError, OSError):
      if not os.path.exists(os.path.join(path, dataset_lib.INFO_FILE)):
        raise
  return path


def open_source(config: ml_collections.ConfigDict, split: str = "train"):
  """The random-access episode source of the config's data (live episodes, or a stored dataset's split)."""
  data = config.data
  if data.source == "live":
    return pipeline_lib.LiveEpisodeSource(generation_spec(data))
  if data.source in GENERATED_SOURCES + ("dir",):
    return dataset_lib.open_split(resolve_dataset(data), split)
  raise config_utils.ConfigError(f"data.source = {data.source!r}, expected 'builtin', 'meltingpot', 'dir' or 'live'")


def encode_source(source, vae_params, model_config, *, batch_frames: int = 128, progress: bool = True,
                  should_stop: Callable[[], bool] | None = None) -> np.ndarray | None:
  """Denoiser latents of every episode of a stored source, [episodes, T+1, h, w, c] float32, by the frozen
  autoencoder exactly as the training step would encode them (posterior mean, normalised). Held in host memory:
  for the small datasets of CPU-sized configs (2,000 tiny episodes: 280 MB); a pod-sized dataset wants latents
  written to disk instead. `should_stop` is asked before each call (a preemption notice must not wait minutes
  for the encoding to end): when it says stop, returns None."""
  from tqdm import tqdm

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
    frames = np.stack([np.asarray(source[i]["frames"]) for i in idx]).astype(np.float32) * (2.0 / 255.0) - 1.0
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
  path = os.path.realpath(resolve_dataset(config.data))
  info = dataset_lib.read_info(path)
  files = info.split_files.get("train") or []
  key = dict(dataset=path, generation=info.generation, vae=config.model.vae.to_dict(),
             train_files=[(os.path.basename(f), n, os.path.getmtime(f)) for f, n in files],
             autoencoder=os.path.realpath(config.autoencoder_workdir), step=ae_meta.get("step"),
             checksums=ae_meta.get("checksums"),
             statistics=[float(stage_meta["latent_shift"]), float(stage_meta["latent_scale"])])
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
  return os.path.join(dataset_cache_dir(), "latents", f"{os.path.basename(path)}-{digest}.npy")


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


# ----------------------------------------------------------------------------------------------------- state


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path)


def shardings_like(tree_shapes, param_shardings, params_shapes, mesh) -> Any:
  """Shardings for an optimizer-state-like tree: a leaf whose path ends with a parameter's path and has that
  parameter's shape gets the parameter's sharding (Adam's mu and nu); anything else is replicated."""
  by_path = {}
  for (path, sh), (_, shape) in zip(jax.tree_util.tree_flatten_with_path(param_shardings)[0],
                                    jax.tree_util.tree_flatten_with_path(params_shapes)[0]):
    by_path[_path_names(path)] = (sh, shape.shape)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    names = _path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
        return hit[0]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def build_state(config, stage: Stage, tx: optax.GradientTransformation, mesh, rules):
  """Returns (jitted init(rng) -> state, state shardings, abstract state). Parameters are created sharded."""
  param_shardings_ = sharding_lib.tree_shardings(stage.logical_axes, mesh, rules,
                                                 shapes=jax.eval_shape(stage.init, jax.random.PRNGKey(0)))

  def init_state(rng):
    params = stage.init(rng)
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                ema=jax.tree.map(lambda p: p.astype(jnp.float32), params), rng=rng)

  shapes = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_shardings = dict(
      step=mesh_lib.replicated(mesh), params=param_shardings_,
      opt_state=shardings_like(shapes["opt_state"], param_shardings_, shapes["params"], mesh),
      ema=param_shardings_, rng=mesh_lib.replicated(mesh))
  init_fn = jax.jit(init_state, out_shardings=state_shardings)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings)
  return init_fn, state_shardings, abstract


def frame_hw(config) -> tuple[int, int]:
  data = config.data
  if data.get("frame_hw"):
    return int(data.frame_hw[0]), int(data.frame_hw[1])
  return int(data.grid[0]) * int(data.cell_size), int(data.grid[1]) * int(data.cell_size)


def batch_shapes(config, keys, mesh, rules, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract global batch arrays `keys` (a stage's `batch_keys`) of the config's clips, batch-sharded; the
  batch is `data.global_batch_size` unless `batch_size` is given."""
  data = config.data
  b = int(batch_size or data.global_batch_size)
  t, p = int(data.clip_steps), int(config.model.max_players)
  h, w = frame_hw(config)
  comp = model_config_lib.compression(config.model)
  latent = (b, t + 1, h // comp, w // comp, int(config.model.vae.latent_channels))
  shapes = dict(frames=((b, t + 1, h, w, 3), jnp.float32), latents=(latent, jnp.float32),
                actions=((b, t, p), jnp.int32),
                positions=((b, t + 1, p, 2), jnp.float32), orientations=((b, t + 1, p), jnp.int32),
                player_mask=((b, p), jnp.bool_))
  sharding = mesh_lib.batch_sharding(mesh, rules)
  return {k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1], sharding=sharding) for k in keys}


def build_step(config, stage: Stage, tx, schedule, mesh, rules, state_shardings, abstract_state):
  """The jitted training step, lowered and compiled ahead of time. Returns (compiled step, analysis dict)."""
  ema_decay = float(config.optim.ema_decay)
  frozen_shardings = (sharding_lib.tree_shardings(stage.frozen_axes, mesh, rules, shapes=stage.frozen)
                      if stage.frozen is not None else None)

  def train_step(state, batch, frozen):
    rng = jax.random.fold_in(state["rng"], state["step"])

    def loss_of(params):
      return stage.loss(params, batch, rng, frozen)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    with jax.named_scope("optimizer"):  # scopes name the ops in profiles (`ap-jax bench profile`)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    with jax.named_scope("ema"):
      ema = optim_lib.ema_update(state["ema"], params, ema_decay, state["step"])
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   learning_rate=schedule(state["step"]))
    new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema, rng=state["rng"])
    return new_state, metrics

  shapes = batch_shapes(config, stage.batch_keys, mesh, rules)
  batch_shardings = {k: v.sharding for k, v in shapes.items()}
  jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  frozen_abstract = None
  if stage.frozen is not None:
    frozen_abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                   stage.frozen, frozen_shardings)
  with sharding_lib.logical_sharding(mesh, rules):
    lowered = jitted.lower(abstract_state, shapes, frozen_abstract)
  compiled = lowered.compile()
  return compiled, analyse(compiled), frozen_shardings


def analyse(compiled) -> dict:
  """Per-device memory and FLOPs of a compiled step, from XLA's own analyses."""
  out: dict[str, Any] = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    out["flops_per_device"] = float(cost.get("flops", 0.0)) if cost else None
    out["bytes_accessed_per_device"] = float(cost.get("bytes accessed", 0.0)) if cost else None
  except Exception:  # some backends do not implement it
    out["flops_per_device"] = out["bytes_accessed_per_device"] = None
  try:
    mem = compiled.memory_analysis()
    out["memory_bytes_per_device"] = dict(
        arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
        temporaries=int(mem.temp_size_in_bytes), generated_code=int(mem.generated_code_size_in_bytes),
        aliased=int(getattr(mem, "alias_size_in_bytes", 0)))
    out["memory_bytes_per_device"]["total"] = (
        out["memory_bytes_per_device"]["arguments"] + out["memory_bytes_per_device"]["outputs"]
        + out["memory_bytes_per_device"]["temporaries"] - out["memory_bytes_per_device"]["aliased"])
  except Exception:
    out["memory_bytes_per_device"] = None
  return out


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, value in PEAK_FLOPS.items():
    if kind.startswith(name):
      return value
  return None


# ------------------------------------------------------------------------------------------------ frozen AE


def load_autoencoder(config, mesh, rules) -> tuple[Any, dict]:
  """The trained autoencoder's EMA parameters and latent statistics, from `config.autoencoder_workdir`."""
  ae_dir = config.autoencoder_workdir
  if not ae_dir:
    raise TrainError("stage 'denoiser' needs --config.autoencoder_workdir=DIR, the workdir of a trained "
                     "autoencoder run (`ap-jax train --config ... --config.stage=autoencoder`)")
  if not os.path.isdir(ae_dir):
    raise TrainError(f"autoencoder_workdir {ae_dir} does not exist")
  ae_config = ml_collections.ConfigDict(config.to_dict())
  ae_config.stage = "autoencoder"
  stage = build_stage(ae_config)
  tx, _ = optim_lib.build_optimizer(ae_config.optim, int(ae_config.total_steps))
  _, _, abstract = build_state(ae_config, stage, tx, mesh, rules)
  with checkpoint_lib.Checkpointer(ae_dir, read_only=True) as ckpt:
    found = ckpt.latest_meta()
    if found is None:
      raise TrainError(f"autoencoder_workdir {ae_dir} holds no checkpoint yet: train the autoencoder there first")
    _, meta = found
    if meta.get("fingerprint") != config_utils.model_fingerprint(ae_config):
      raise TrainError(f"autoencoder_workdir {ae_dir} holds an autoencoder of another shape (fingerprint "
                       f"{meta.get('fingerprint')}, this config's autoencoder is "
                       f"{config_utils.model_fingerprint(ae_config)})")
    restored = ckpt.restore_latest(abstract)
  if restored is None:
    raise TrainError(f"autoencoder_workdir {ae_dir}: no checkpoint restores cleanly (see the warnings above)")
  step, state, meta = restored
  params = state["ema"]
  log.info("loaded autoencoder EMA parameters from %s (step %d)", ae_dir, step)
  return params, meta


def latent_statistics(config, ae_params) -> dict:
  """Latent shift and scale from a fixed set of training frames (deterministic, so resumes agree)."""
  it = build_data(config)
  frames = np.concatenate([next(it)["frames"] for _ in range(4)])
  shift, scale = vae_lib.latent_statistics(jax.device_get(ae_params), config.model, jnp.asarray(frames))
  return dict(latent_shift=shift, latent_scale=scale)


# ----------------------------------------------------------------------------------------------- preemption


class StopSignal:
  """Turns SIGTERM (TPU VM preemption notice) and SIGINT (Ctrl-C) into a flag the loop checks between steps."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    log.warning("received %s: finishing the current step, then saving and exiting", self.received)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self) -> bool:
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    # Every process must stop at the same step (a save is a collective): agree on it.
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([local]))))


# ----------------------------------------------------------------------------------------------------- loop


class MetricsWriter:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars; process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      drop_torn_line(self.path)
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        log.warning("tensorboardX is not installed: TensorBoard scalars are off")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: (None if v is None else float(v)) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in metrics.items():
        if value is not None and np.isfinite(value):
          self._tb.add_scalar(key, float(value), step)

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def drop_torn_line(path: str) -> None:
  """A crash mid-write leaves a last line without its newline: cut it (with a warning), so the next record starts
  on a line of its own."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return
  with open(path, "rb+") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    keep = data.rfind(b"\n") + 1
    log.warning("%s: the last line was cut by an interrupted write (%r); dropping it", path,
                data[keep:keep + 80].decode(errors="replace"))
    f.truncate(keep)


def read_metrics(path: str) -> list[dict]:
  """The records of a metrics.jsonl, skipping (and reporting) lines that do not parse, such as a torn last line."""
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        log.warning("%s line %d does not parse (%s); skipping it", path, number, e)
  return records


def plot_losses(workdir: str) -> str | None:
  """loss.png from metrics.jsonl: the curve people would rather look at than read."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  by_step = {}
  for rec in read_metrics(path):
    if "step" in rec:
      by_step[rec["step"]] = rec  # a resumed run rewrites steps it repeats
  if not by_step:
    return None
  steps = sorted(by_step)
  keys = [k for k in ("loss", "video_loss", "coord_loss", "l1", "mse") if k in by_step[steps[-1]]]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for key in keys:
    ax.plot(steps, [by_step[s].get(key) for s in steps], label=key)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  out = os.path.join(workdir, "loss.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def train(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
          progress: bool = True) -> dict:
  """Trains `config.stage` in `workdir`, resuming from its newest good checkpoint. Returns a summary dict
  (`stopped_by` is set when SIGTERM / Ctrl-C stopped the run before `total_steps`). SIGTERM and Ctrl-C are
  caught from the first line (a stop during set-up exits before the first step), and everything opened is closed
  on every exit path, errors included."""
  with StopSignal() as stop, contextlib.ExitStack() as resources:
    return _train(config, workdir, fresh=fresh, progress=progress, stop=stop, resources=resources)


def require_local_path(path: str | None, what: str) -> None:
  """Workdirs and datasets are read and written with local file operations (os, Orbax on a local path). A URL
  would become a local folder named `gs:`; it is refused with the way to use a bucket (a FUSE mount)."""
  if path and "://" in str(path):
    raise TrainError(f"{what} {path}: object-store URLs are not read directly yet; mount the bucket (Cloud Storage "
                     "FUSE: `gcsfuse --implicit-dirs BUCKET /mnt/gcs` on a TPU VM, `launch/tpu_vm.py mount`, or the "
                     "GKE gcsfuse CSI driver, `launch/xpk.py jobset --bucket`) and pass the mounted path, "
                     "e.g. /mnt/gcs/runs/NAME")


def _train(config, workdir, *, fresh, progress, stop, resources) -> dict:
  if config.stage not in STAGES:
    raise config_utils.ConfigError(f"stage = {config.stage!r}, expected one of {STAGES}")
  require_local_path(workdir, "workdir")
  require_local_path(config.get("autoencoder_workdir"), "autoencoder_workdir")
  require_local_path(config.data.get("dir"), "data.dir")
  os.makedirs(workdir, exist_ok=True)
  if config.autoencoder_workdir:
    config.autoencoder_workdir = os.path.abspath(config.autoencoder_workdir)  # so sampling finds it from anywhere
  is_main = jax.process_index() == 0
  mesh = mesh_lib.build_mesh(config.mesh)
  rules = mesh_lib.rules_from_config(config)
  mesh_lib.check_batch(int(config.data.global_batch_size), mesh, rules)
  fingerprint = config_utils.model_fingerprint(config)

  ckpt_dir = os.path.join(workdir, "checkpoints")
  if fresh and os.path.isdir(ckpt_dir) and is_main:
    aside = f"{ckpt_dir}.old-{int(time.time())}"
    os.rename(ckpt_dir, aside)
    log.info("--fresh: moved the existing checkpoints to %s", aside)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("ap_jax fresh workdir")
  ckpt = resources.enter_context(checkpoint_lib.Checkpointer(
      workdir, keep=int(config.keep_checkpoints), keep_period=int(config.keep_period) or None,
      async_save=bool(config.async_checkpointing)))
  latest = ckpt.latest_step()
  old: dict = {}
  if latest is not None:
    try:
      old = ckpt.read_meta(latest)
    except Exception:
      old = {}
    if old and old.get("fingerprint") != fingerprint:
      raise TrainError(
          f"workdir {workdir} holds a checkpoint of another model (stage {old.get('stage')!r}, model "
          f"{old.get('model_name')!r}, fingerprint {old.get('fingerprint')}; this config is stage "
          f"{config.stage!r}, model {config.get('model_name')!r}, fingerprint {fingerprint}). Use another "
          "--workdir, or pass --fresh to start over (the old checkpoints are moved aside, not deleted).")

  frozen, meta, ae_meta = None, {}, {}
  if config.stage == "denoiser":
    frozen, ae_meta = load_autoencoder(config, mesh, rules)
    if latest is not None and "latent_shift" in old:
      meta = {k: old[k] for k in ("latent_shift", "latent_scale")}
    else:  # a fresh run, or a newest checkpoint whose metadata is unreadable (it is deterministic: recompute)
      meta = latent_statistics(config, frozen)
    meta["autoencoder_step"] = ae_meta.get("step")
  stage = build_stage(config, frozen=frozen, meta=meta)
  tx, schedule = optim_lib.build_optimizer(config.optim, int(config.total_steps))
  init_fn, state_shardings, abstract_state = build_state(config, stage, tx, mesh, rules)
  cache_latents = stage.name == "denoiser" and config.data.get("cache_latents", False)
  if cache_latents and config.data.source == "live":
    raise config_utils.ConfigError("data.cache_latents needs stored episodes; data.source = 'live' generates new "
                                   "ones forever")

  def encode():
    start_encode = time.time()
    table = encode_source(open_source(config), stage.frozen, stage.model_config, progress=progress and is_main,
                          should_stop=stop.should_stop)
    if table is not None:
      log.info("encoded %d training episodes into latents %s in %.0fs (data.cache_latents)", table.shape[0],
               list(table.shape[1:]), time.time() - start_encode)
    return table

  def encoded_latents():
    if jax.process_count() > 1:  # hosts may not share a cache folder, and encoding stops collectively
      return encode()
    return cached_latents(latent_cache_path(config, ae_meta, stage.meta), encode)

  def stopped_while_encoding() -> dict:
    stopped_by = stop.received or "another process"
    log.warning("stopped by %s while encoding the training latents (at step %d); nothing new to save", stopped_by,
                latest or 0)
    return dict(stage=stage.name, model=config.get("model_name"), start_step=latest or 0, end_step=latest or 0,
                total_steps=int(config.total_steps), stopped_by=stopped_by, history=[])

  # A run that has already finished needs no latents (it only restores and returns).
  finished = latest is not None and latest >= int(config.total_steps)
  latents = None
  if cache_latents and not finished:
    latents = encoded_latents()
    if latents is None:
      return stopped_while_encoding()
  data_iter = build_data(config, latents=latents)

  start_step = 0
  restored = ckpt.restore_latest(abstract_state, data_iter) if latest is not None else None
  good_checkpoint = None  # what a NaN error names: the newest checkpoint known to hold finite, verified state
  if restored is not None:
    start_step, state, restored_meta = restored
    good_checkpoint = (f"step {start_step}, restored at the start of this run "
                       + ("with its checksums verified" if restored_meta.get("verified") else
                          "(written without checksums, unverified)"))
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
    if cache_latents and finished and start_step < int(config.total_steps):
      # The newest checkpoint was damaged and an earlier one restored: this run trains after all.
      position = data_iter.get_state()
      close_iterator(data_iter)
      latents = encoded_latents()
      if latents is None:
        return stopped_while_encoding()
      data_iter = build_data(config, latents=latents)
      data_iter.set_state(position)
  else:
    state = init_fn(jax.random.PRNGKey(int(config.seed)))
  resources.callback(close_iterator, data_iter)  # stops Grain's worker processes (data.worker_count)
  if stage.frozen is not None:
    stage.frozen = jax.device_put(stage.frozen, sharding_lib.tree_shardings(stage.frozen_axes, mesh, rules,
                                                                            shapes=stage.frozen))

  step_fn, analysis, _ = build_step(config, stage, tx, schedule, mesh, rules, state_shardings, abstract_state)
  num_params = layers_lib.count_params(abstract_state["params"])
  device = jax.devices()[0]
  peak = peak_flops(device)
  # MFU uses the analytic count: XLA's cost analysis counts a scanned layer stack's body once, not `depth`
  # times. The compiled figure is logged beside it as a cross-check (they agree when layers are unrolled).
  analytic = analytic_step_flops(config, stage)
  flops = analytic / mesh.devices.size
  b = int(config.data.global_batch_size)
  example_tokens = tokens_per_example(config, stage)
  summary = dict(stage=stage.name, model=config.get("model_name"), mesh=mesh_lib.describe(mesh),
                 processes=jax.process_count(), device=getattr(device, "device_kind", str(device)),
                 parameters=num_params, flops_per_step=analytic, flops_per_step_per_device=flops,
                 compiled_flops_per_device=analysis.get("flops_per_device"),
                 memory_per_device=analysis.get("memory_bytes_per_device"), global_batch=b, start_step=start_step,
                 total_steps=int(config.total_steps), fingerprint=fingerprint)
  if is_main:
    mem = analysis.get("memory_bytes_per_device") or {}
    log.info("stage %s | model %s | %s parameters | mesh %s | %d process(es) on %s", stage.name,
             config.get("model_name"), f"{num_params:,}", mesh_lib.describe(mesh), jax.process_count(),
             summary["device"])
    log.info("step: %.3g FLOPs (analytic; %.3g per device, XLA's compiled count %.3g per device%s), "
             "memory/device %.1f MiB (args %.1f, temps %.1f)", analytic, flops,
             analysis.get("flops_per_device") or float("nan"),
             ", scan body counted once" if stage.name == "denoiser" and stage.model_config.dit.scan_layers else "",
             mem.get("total", 0) / 2**20, mem.get("arguments", 0) / 2**20, mem.get("temporaries", 0) / 2**20)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_utils.to_json(config))
  writer = MetricsWriter(workdir, is_main)
  resources.callback(writer.close)

  def save(step_now: int, force: bool = False):
    meta_now = dict(stage.meta, fingerprint=fingerprint, stage=stage.name, model_name=config.get("model_name"),
                    step=step_now, config=json.loads(config_utils.to_json(config)))
    ckpt.save(step_now, state, data_iter, meta_now, force=force)

  total = int(config.total_steps)
  log_every, ckpt_every = max(1, int(config.log_every)), max(1, int(config.checkpoint_every))
  bar = None
  if progress and is_main:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start_step, desc=f"train {stage.name}", unit="step", dynamic_ncols=True)
    resources.callback(bar.close)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  step = start_step
  last_time, last_step = time.perf_counter(), step
  history = []
  stopped_by = None
  # Metrics stay on the device until the logging cadence (or a save, or the end): the host does not wait for each
  # step, so it fetches and shards the next batch while the device computes. At most `max_in_flight` steps run
  # ahead of the host, which bounds the batches queued on the device.
  pending: list[tuple[int, dict]] = []
  max_in_flight = 2
  multi_process = jax.process_count() > 1

  def flush() -> None:
    """Reads the pending steps' metrics back, stops on a non-finite loss or gradient norm (naming the step and
    the newest good checkpoint), and writes the newest step's metrics."""
    nonlocal last_time, last_step
    if not pending:
      return
    steps = [s for s, _ in pending]
    host_rows = jax.device_get([m for _, m in pending])
    pending.clear()
    for s, row in zip(steps, host_rows):
      loss, grad_norm = float(row["loss"]), float(row["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        ckpt.wait()  # the state after a non-finite step is never saved: its parameters may be NaN
        window = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        raise TrainError(
            f"loss is {loss} (gradient norm {grad_norm}) at step {s} (the first non-finite one of {window}, read "
            "back together); stopping without saving. "
            + (f"The newest good checkpoint is {good_checkpoint}, in {ckpt.directory}; a relaunch resumes from it "
               "and verifies its checksums." if good_checkpoint else "No checkpoint was written before it."))
    s, row = steps[-1], host_rows[-1]
    if s % log_every and s != total:
      return
    now = time.perf_counter()
    dt = (now - last_time) / max(1, s - last_step)
    last_time, last_step = now, s
    host = {k: float(v) for k, v in row.items()}
    host.update(step_time_s=dt, examples_per_s=b / dt, tokens_per_s=b * example_tokens / dt,
                mfu=(flops / dt / peak) if (flops and peak) else None)
    writer.write(s, host)
    history.append(dict(step=s, loss=host["loss"], step_time_s=dt))
    if bar is not None:
      bar.set_postfix(loss=f"{host['loss']:.4f}", step_s=f"{dt:.3f}")
    elif is_main:  # no progress bar: the log says how far the run is
      log.info("%s step %d/%d | loss %.4f | %.3f s/step", stage.name, s, total, host["loss"], dt)

  if stop.should_stop():  # asked to stop while setting up: no step was taken, nothing new to save
    stopped_by = stop.received or "another process"
    log.warning("stopped by %s before the first step (at step %d); nothing new to save", stopped_by, step)
  else:
    while step < total:
      local = next(data_iter)
      batch = pipeline_lib.global_batch({k: local[k] for k in stage.batch_keys}, batch_sharding)
      state, metrics = step_fn(state, batch, stage.frozen)
      step += 1
      pending.append((step, metrics))
      if len(pending) > max_in_flight:
        jax.block_until_ready(pending[-1 - max_in_flight][1]["loss"])
      if bar is not None:
        bar.update(1)
      saving = step % ckpt_every == 0 or step == total
      if step % log_every == 0 or saving:
        flush()  # a checkpoint is written only after its steps' losses were read back finite
      if saving:
        save(step)
        good_checkpoint = f"step {step}, saved by this run after finite losses (with checksums of its arrays)"
      # Several processes agree on stopping with a collective: at the logging cadence, not every step.
      if (not multi_process or step % log_every == 0 or saving) and stop.should_stop():
        stopped_by = stop.received or "another process"
        flush()
        if ckpt.latest_step() != step:
          save(step, force=True)
          good_checkpoint = f"step {step}"
        log.warning("stopped by %s after step %d; checkpoint saved", stopped_by, step)
        break
    flush()
  ckpt.close()  # waits for the last asynchronous save
  if is_main:
    plot_losses(workdir)
  summary.update(end_step=step, stopped_by=stopped_by, history=history)
  return summary


def analytic_step_flops(config, stage: Stage) -> float:
  """FLOPs of one training step of the whole global batch (ap_jax.model.flops; 2 per multiply-add)."""
  from ap_jax.model import flops as flops_lib

  b, frames = int(config.data.global_batch_size), int(config.data.clip_steps) + 1
  hw = frame_hw(config)
  # Without context tokens the denoiser's sequence holds only the clip's target frames (all are encoded, though).
  dit_frames = frames - (0 if stage.model_config.dit.get("context_tokens", True) else 1)
  if stage.name == "autoencoder":
    crop = int(config.get("autoencoder_crop", 0))
    return flops_lib.vae_train_step_flops(stage.model_config, b * frames, (crop, crop) if crop else hw)
  encode = 0.0 if "latents" in stage.batch_keys else flops_lib.vae_forward_flops(stage.model_config, b * frames, hw,
                                                                                  decoder=False)
  latent_hw = flops_lib.latent_hw(stage.model_config, hw)
  if stage.model_config.flow.get("own_context_prob", 0.0) > 0:
    # A 2-step clip trains one transition after one forward pass that estimates its context frame.
    return (encode + flops_lib.denoiser_train_step_flops(stage.model_config, b, 1, latent_hw)
            + flops_lib.denoiser_forward_flops(stage.model_config, b, 1, latent_hw)["total"])
  return encode + flops_lib.denoiser_train_step_flops(stage.model_config, b, dit_frames, latent_hw)


def tokens_per_example(config, stage: Stage) -> int:
  """Tokens one training example puts through the model (pixels for the autoencoder)."""
  data = config.data
  h, w = frame_hw(config)
  frames = int(data.clip_steps) + 1
  if stage.name == "autoencoder":
    crop = int(config.get("autoencoder_crop", 0))
    return frames * (crop * crop if crop else h * w)  # pixels
  from ap_jax.model import config as model_config_lib

  per_side = model_config_lib.pixels_per_token(stage.model_config)
  subjects = int(config.model.max_players) if stage.model_config.dit.subject_tokens else 0
  frames -= 0 if stage.model_config.dit.get("context_tokens", True) else 1
  if stage.model_config.flow.get("own_context_prob", 0.0) > 0:
    frames = 1  # the trained sequence is the clip's last transition
  return frames * ((h // per_side) * (w // per_side) + subjects)


# ------------------------------------------------------------------------------------------------ inference


@dataclasses.dataclass
class TrainedModel:
  """What sampling and evaluation need from a trained denoiser workdir (and the autoencoder it points at)."""

  config: ml_collections.ConfigDict  # the training config (data, model, ...)
  model_config: ml_collections.ConfigDict  # with the latent statistics filled in
  params: Any  # denoiser EMA parameters
  vae_params: Any  # autoencoder EMA parameters
  step: int


def load_trained(workdir: str, mesh=None, rules=None, *, use_ema: bool = True) -> TrainedModel:
  """Loads a trained denoiser (EMA weights by default) and its autoencoder, laid out on `mesh` (default: one
  device, replicated), for sampling and evaluation."""
  if not os.path.isdir(workdir):
    raise TrainError(f"workdir {workdir} does not exist")
  with checkpoint_lib.Checkpointer(workdir, read_only=True) as ckpt:
    found = ckpt.latest_meta()
    if found is None:
      raise TrainError(f"{workdir} holds no checkpoint yet: train a denoiser there first (`ap-jax train`)")
    _, meta = found
    if meta.get("stage") != "denoiser":
      raise TrainError(f"{workdir} holds a {meta.get('stage')!r} checkpoint; sampling needs a denoiser workdir")
    config = ml_collections.ConfigDict(meta["config"])
    if mesh is None:  # one device (and one slice)
      for axis in mesh_lib.MESH_AXES:
        config.mesh[axis] = 1
        if f"dcn_{axis}" in config.mesh:
          config.mesh[f"dcn_{axis}"] = 1
      mesh = mesh_lib.single_device_mesh()
    rules = rules or mesh_lib.rules_from_config(config)
    vae_params, _ = load_autoencoder(config, mesh, rules)
    stage = build_stage(config, frozen=vae_params, meta=meta)
    tx, _ = optim_lib.build_optimizer(config.optim, int(config.total_steps))
    _, _, abstract = build_state(config, stage, tx, mesh, rules)
    found = ckpt.restore_latest(abstract)
  if found is None:
    raise TrainError(f"{workdir}: no checkpoint restores cleanly (see the warnings above)")
  step, state, _ = found
  params = state["ema" if use_ema else "params"]
  return TrainedModel(config=config, model_config=stage.model_config, params=params, vae_params=vae_params,
                      step=step)
