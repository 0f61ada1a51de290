"""`ap-jax train`: sharded, resumable, multi-host training of both stages (autoencoder, then denoiser).

The trainer is a handful of `build_*` functions, each importable on its own (jasmine / big_vision style), one job
per module:

  mesh.build_mesh        mesh from `config.mesh`, logical-axis rules from `config.logical_axis_rules`
  stages.build_stage     the model half being trained: init, logical axes, loss (autoencoder or denoiser)
  optim.build_optimizer  optax AdamW + schedule + clipping + decay mask, and the EMA decay
  inputs.build_data      the Grain pipeline for this process (the built-in dataset is generated on first use)
  state.build_state      the jitted, sharded init (parameters are born sharded) and the state's shardings
  state.build_step       `jax.jit(step, in_shardings, out_shardings, donate_argnums)`, compiled ahead of time

and around them `checkpoint` (Orbax, data iterator included), `preemption` (SIGTERM), `telemetry` (metrics.jsonl,
TensorBoard, the loss plot) and `restore` (trained weights for inference). This module sets a run up and runs
the loop: `train(config, workdir)` always resumes from the workdir when a checkpoint is there, saves every
`checkpoint_every` steps (asynchronously) and on SIGTERM / Ctrl-C (after finishing the current step), and stops on
a NaN or inf loss naming the step, leaving the last good checkpoint in place.

Randomness: the step's key is `fold_in(key(seed), step)`, and the data order is a function of the seed and the
restored iterator state, so a resumed run repeats exactly the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import Any

import jax
import ml_collections

from ap_jax import fs
from ap_jax.data import pipeline as pipeline_lib
from ap_jax.model import layers as layers_lib
from ap_jax.model import sharding as sharding_lib
from ap_jax.train import checkpoint as checkpoint_lib
from ap_jax.train import config_utils
from ap_jax.train import inputs as inputs_lib
from ap_jax.train import mesh as mesh_lib
from ap_jax.train import optim as optim_lib
from ap_jax.train import stages as stages_lib
from ap_jax.train import state as state_lib
from ap_jax.train import telemetry
from ap_jax.train.errors import Stopped, TrainError
from ap_jax.train.preemption import StopSignal
from ap_jax.train.restore import load_autoencoder

log = logging.getLogger("ap_jax.train")

__all__ = ["train", "train_stage", "Stopped", "TrainError"]


def train_stage(config: ml_collections.ConfigDict, workdir: str, *, what: str, progress: bool = True) -> dict:
  """`train`, for a stage of a longer job: raises Stopped when a signal stopped it before `total_steps`."""
  summary = train(config, workdir, progress=progress)
  if summary.get("stopped_by"):
    raise Stopped(summary["stopped_by"], f"{what} ({workdir}, step {summary['end_step']} of "
                                         f"{summary['total_steps']})")
  return summary


def train(config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False,
          progress: bool = True) -> dict:
  """Trains `config.stage` in `workdir`, resuming from its newest good checkpoint. Returns a summary dict
  (`stopped_by` is set when SIGTERM / Ctrl-C stopped the run before `total_steps`). SIGTERM and Ctrl-C are
  caught from the first line (a stop during set-up exits before the first step), and everything opened is closed
  on every exit path, errors included."""
  with StopSignal() as stop, contextlib.ExitStack() as resources:
    run = _set_up(config, workdir, fresh=fresh, progress=progress, stop=stop, resources=resources)
    if isinstance(run, dict):  # stopped during set-up
      return run
    return _loop(run, stop)


# ------------------------------------------------------------------------------------------------------ set-up


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, made by `_set_up`."""

  config: ml_collections.ConfigDict
  workdir: str
  stage: stages_lib.Stage
  ckpt: checkpoint_lib.Checkpointer
  state: Any
  data_iter: Any
  step_fn: Any
  batch_sharding: Any
  start_step: int
  good_checkpoint: str | None  # what a NaN error names: the newest checkpoint known to hold finite, verified state
  summary: dict
  meter: "_Meter"


def _open_workdir(config, workdir: str, fresh: bool, resources) -> tuple[checkpoint_lib.Checkpointer, int | None,
                                                                            dict]:
  """The workdir's checkpointer, its newest step and that step's meta; refuses a workdir of another model."""
  ckpt_dir = fs.join(workdir, "checkpoints")
  if fresh and fs.isdir(ckpt_dir) and jax.process_index() == 0:
    aside = f"{ckpt_dir}.old-{int(time.time())}"
    fs.rename(ckpt_dir, aside)
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
    fingerprint = config_utils.model_fingerprint(config)
    if old and old.get("fingerprint") != fingerprint:
      raise TrainError(
          f"workdir {workdir} holds a checkpoint of another model (stage {old.get('stage')!r}, model "
          f"{old.get('model_name')!r}, fingerprint {old.get('fingerprint')}; this config is stage "
          f"{config.stage!r}, model {config.get('model_name')!r}, fingerprint {fingerprint}). Use another "
          "--workdir, or pass --fresh to start over (the old checkpoints are moved aside, not deleted).")
  return ckpt, latest, old


def _build_stage(config, mesh, rules, latest: int | None, old: dict) -> tuple[stages_lib.Stage, dict]:
  """The stage, with the frozen autoencoder and its latent statistics for the denoiser; and the autoencoder's
  checkpoint meta (which keys the latent cache)."""
  frozen, meta, ae_meta = None, {}, {}
  if config.stage == "denoiser":
    frozen, ae_meta = load_autoencoder(config, mesh, rules)
    if latest is not None and "latent_shift" in old:
      meta = {k: old[k] for k in ("latent_shift", "latent_scale")}
    else:  # a fresh run, or a newest checkpoint whose metadata is unreadable (it is deterministic: recompute)
      meta = inputs_lib.latent_statistics(config, frozen)
    meta["autoencoder_step"] = ae_meta.get("step")
  return stages_lib.build_stage(config, frozen=frozen, meta=meta), ae_meta


def _set_up(config, workdir, *, fresh, progress, stop, resources) -> _Run | dict:
  """Checks the config, opens the workdir, builds mesh, stage, optimizer, data and state (restored or fresh) and
  compiles the step. Returns the run, or the summary of a run stopped while encoding its latents."""
  if config.stage not in stages_lib.STAGES:
    raise config_utils.ConfigError(f"stage = {config.stage!r}, expected one of {stages_lib.STAGES}")
  fs.makedirs(workdir)
  if config.autoencoder_workdir:
    config.autoencoder_workdir = fs.absolute(config.autoencoder_workdir)  # so sampling finds it from anywhere
  is_main = jax.process_index() == 0
  mesh = mesh_lib.build_mesh(config.mesh)
  rules = mesh_lib.rules_from_config(config)
  mesh_lib.check_batch(int(config.data.global_batch_size), mesh, rules)
  ckpt, latest, old = _open_workdir(config, workdir, fresh, resources)
  stage, ae_meta = _build_stage(config, mesh, rules, latest, old)
  tx, schedule = optim_lib.build_optimizer(config.optim, int(config.total_steps))
  init_fn, state_shardings, abstract_state = state_lib.build_state(config, stage, tx, mesh, rules)
  cache_latents = stage.name == "denoiser" and config.data.get("cache_latents", False)
  if cache_latents and config.data.source == "live":
    raise config_utils.ConfigError("data.cache_latents needs stored episodes; data.source = 'live' generates new "
                                   "ones forever")

  def encoded_latents():
    def encode():
      start = time.time()
      table = inputs_lib.encode_source(inputs_lib.open_source(config), stage.frozen, stage.model_config,
                                       progress=progress and is_main, should_stop=stop.should_stop)
      if table is not None:
        log.info("encoded %d training episodes into latents %s in %.0fs (data.cache_latents)", table.shape[0],
                 list(table.shape[1:]), time.time() - start)
      return table

    if jax.process_count() > 1:  # hosts may not share a cache folder, and encoding stops collectively
      return encode()
    return inputs_lib.cached_latents(inputs_lib.latent_cache_path(config, ae_meta, stage.meta), encode)

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
  data_iter = inputs_lib.build_data(config, latents=latents)

  start_step, good_checkpoint = 0, None
  restored = ckpt.restore_latest(abstract_state, data_iter) if latest is not None else None
  if restored is not None:
    start_step, state, restored_meta = restored
    good_checkpoint = (f"step {start_step}, restored at the start of this run "
                       + ("with its checksums verified" if restored_meta.get("verified") else
                          "(written without checksums, unverified)"))
    log.info("resumed from %s at step %d", ckpt.directory, start_step)
    if cache_latents and finished and start_step < int(config.total_steps):
      # The newest checkpoint was damaged and an earlier one restored: this run trains after all.
      position = data_iter.get_state()
      inputs_lib.close_iterator(data_iter)
      latents = encoded_latents()
      if latents is None:
        return stopped_while_encoding()
      data_iter = inputs_lib.build_data(config, latents=latents)
      data_iter.set_state(position)
  else:
    state = init_fn(jax.random.PRNGKey(int(config.seed)))
  resources.callback(inputs_lib.close_iterator, data_iter)  # stops Grain's worker processes (data.worker_count)
  if stage.frozen is not None:
    stage.frozen = jax.device_put(stage.frozen, sharding_lib.tree_shardings(stage.frozen_axes, mesh, rules,
                                                                            shapes=stage.frozen))
  step_fn, analysis, _ = state_lib.build_step(config, stage, tx, schedule, mesh, rules, state_shardings,
                                              abstract_state)
  summary = _describe(config, workdir, stage, mesh, analysis, abstract_state, start_step, is_main)
  meter = _Meter(config, workdir, stage, summary, start_step, progress=progress and is_main, resources=resources)
  return _Run(config=config, workdir=workdir, stage=stage, ckpt=ckpt, state=state, data_iter=data_iter,
              step_fn=step_fn, batch_sharding=mesh_lib.batch_sharding(mesh, rules), start_step=start_step,
              good_checkpoint=good_checkpoint, summary=summary, meter=meter)


def _describe(config, workdir, stage, mesh, analysis, abstract_state, start_step, is_main) -> dict:
  """The run's summary (model, mesh, FLOPs, memory), logged and with the config written to config.json."""
  num_params = layers_lib.count_params(abstract_state["params"])
  device = jax.devices()[0]
  # MFU uses the analytic count: XLA's cost analysis counts a scanned layer stack's body once, not `depth`
  # times. The compiled figure is logged beside it as a cross-check (they agree when layers are unrolled).
  analytic = stages_lib.analytic_step_flops(config, stage)
  summary = dict(stage=stage.name, model=config.get("model_name"), mesh=mesh_lib.describe(mesh),
                 processes=jax.process_count(), device=getattr(device, "device_kind", str(device)),
                 parameters=num_params, flops_per_step=analytic, flops_per_step_per_device=analytic / mesh.devices.size,
                 compiled_flops_per_device=analysis.get("flops_per_device"),
                 memory_per_device=analysis.get("memory_bytes_per_device"),
                 global_batch=int(config.data.global_batch_size), start_step=start_step,
                 total_steps=int(config.total_steps), fingerprint=config_utils.model_fingerprint(config))
  if is_main:
    mem = analysis.get("memory_bytes_per_device") or {}
    log.info("stage %s | model %s | %s parameters | mesh %s | %d process(es) on %s", stage.name,
             config.get("model_name"), f"{num_params:,}", summary["mesh"], jax.process_count(), summary["device"])
    log.info("step: %.3g FLOPs (analytic; %.3g per device, XLA's compiled count %.3g per device%s), "
             "memory/device %.1f MiB (args %.1f, temps %.1f)", analytic, summary["flops_per_step_per_device"],
             analysis.get("flops_per_device") or float("nan"),
             ", scan body counted once" if stage.name == "denoiser" and stage.model_config.dit.scan_layers else "",
             mem.get("total", 0) / 2**20, mem.get("arguments", 0) / 2**20, mem.get("temporaries", 0) / 2**20)
    fs.write_atomic(fs.join(workdir, "config.json"), config_utils.to_json(config))
  return summary


# -------------------------------------------------------------------------------------------------------- loop


class _Meter:
  """The steps' metrics on their way back from the device: they stay there until the logging cadence (or a save,
  or the end), so the host fetches and shards the next batch while the device computes; at most `max_in_flight`
  steps run ahead of the host, which bounds the batches queued on the device. `flush` reads them back, stops on a
  non-finite loss or gradient norm, and writes the newest to metrics.jsonl, TensorBoard and the progress bar."""

  max_in_flight = 2

  def __init__(self, config, workdir, stage, summary, start_step, *, progress: bool, resources):
    self.total = int(config.total_steps)
    self.log_every = max(1, int(config.log_every))
    self.stage_name = stage.name
    self.batch = int(config.data.global_batch_size)
    self.example_tokens = stages_lib.tokens_per_example(config, stage)
    self.flops = summary["flops_per_step_per_device"]
    self.peak = state_lib.peak_flops(jax.devices()[0])
    self.is_main = jax.process_index() == 0
    self.writer = telemetry.MetricsWriter(workdir, self.is_main)
    resources.callback(self.writer.close)
    self.bar = None
    if progress:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=self.total, initial=start_step, desc=f"train {stage.name}", unit="step",
                      dynamic_ncols=True)
      resources.callback(self.bar.close)
    self.pending: list[tuple[int, dict]] = []
    self.history: list[dict] = []
    self.last_time, self.last_step = time.perf_counter(), start_step

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))
    if len(self.pending) > self.max_in_flight:
      jax.block_until_ready(self.pending[-1 - self.max_in_flight][1]["loss"])
    if self.bar is not None:
      self.bar.update(1)

  def flush(self, ckpt: checkpoint_lib.Checkpointer, good_checkpoint: str | None) -> None:
    if not self.pending:
      return
    steps = [s for s, _ in self.pending]
    host_rows = jax.device_get([m for _, m in self.pending])
    self.pending.clear()
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
    if s % self.log_every and s != self.total:
      return
    now = time.perf_counter()
    dt = (now - self.last_time) / max(1, s - self.last_step)
    self.last_time, self.last_step = now, s
    host = {k: float(v) for k, v in row.items()}
    host.update(step_time_s=dt, examples_per_s=self.batch / dt, tokens_per_s=self.batch * self.example_tokens / dt,
                mfu=(self.flops / dt / self.peak) if (self.flops and self.peak) else None)
    self.writer.write(s, host)
    self.history.append(dict(step=s, loss=host["loss"], step_time_s=dt))
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{host['loss']:.4f}", step_s=f"{dt:.3f}")
    elif self.is_main:  # no progress bar: the log says how far the run is
      log.info("%s step %d/%d | loss %.4f | %.3f s/step", self.stage_name, s, self.total, host["loss"], dt)


def _loop(run: _Run, stop: StopSignal) -> dict:
  """Steps until `total_steps` or a stop signal, saving on the cadence and on the way out."""
  config, stage, ckpt, meter = run.config, run.stage, run.ckpt, run.meter
  total, ckpt_every = int(config.total_steps), max(1, int(config.checkpoint_every))
  multi_process = jax.process_count() > 1
  step, state, good, stopped_by = run.start_step, run.state, run.good_checkpoint, None

  def save(force: bool = False):
    meta = dict(stage.meta, fingerprint=run.summary["fingerprint"], stage=stage.name,
                model_name=config.get("model_name"), step=step, config=json.loads(config_utils.to_json(config)))
    ckpt.save(step, state, run.data_iter, meta, force=force)

  if stop.should_stop():  # asked to stop while setting up: no step was taken, nothing new to save
    stopped_by = stop.received or "another process"
    log.warning("stopped by %s before the first step (at step %d); nothing new to save", stopped_by, step)
  while stopped_by is None and step < total:
    local = next(run.data_iter)
    batch = pipeline_lib.global_batch({k: local[k] for k in stage.batch_keys}, run.batch_sharding)
    state, metrics = run.step_fn(state, batch, stage.frozen)
    step += 1
    meter.add(step, metrics)
    saving = step % ckpt_every == 0 or step == total
    if step % meter.log_every == 0 or saving:
      meter.flush(ckpt, good)  # a checkpoint is written only after its steps' losses were read back finite
    if saving:
      save()
      good = f"step {step}, saved by this run after finite losses (with checksums of its arrays)"
    # Several processes agree on stopping with a collective: at the logging cadence, not every step.
    if (not multi_process or step % meter.log_every == 0 or saving) and stop.should_stop():
      stopped_by = stop.received or "another process"
      meter.flush(ckpt, good)
      if ckpt.latest_step() != step:
        save(force=True)
      log.warning("stopped by %s after step %d; checkpoint saved", stopped_by, step)
  meter.flush(ckpt, good)
  ckpt.close()  # waits for the last asynchronous save
  if meter.is_main:
    telemetry.plot_losses(run.workdir)
  return dict(run.summary, end_step=step, stopped_by=stopped_by, history=meter.history)
