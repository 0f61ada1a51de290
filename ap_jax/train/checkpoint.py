"""Orbax checkpoints holding everything a bit-exact resume needs, verified on restore, skipping damaged ones.

One composite checkpoint per saved step, under `WORKDIR/checkpoints/<step>/`:
  state  params, optimizer state, EMA, step, RNG (a pytree of jax.Arrays; restored onto any mesh)
  data   the Grain iterator state of every process (each process writes and reads its own)
  meta   JSON: the model fingerprint, the full config, stage facts such as the latent statistics, and a checksum
         of every array of `state` (`state_checksums`), computed on the device before the save

Orbax writes a step into a temporary directory and renames it when complete, so a checkpoint being written when
the process died is never listed. A complete-looking checkpoint that fails to restore (truncated or damaged
files), or restores to arrays whose checksums differ from the ones written with it (damage that still parses),
is moved to `WORKDIR/checkpoints_damaged/` with a warning by the training process, and the previous one is
restored instead.

Only the process that trains owns a workdir. Readers (sampling, evaluation, a denoiser reading its autoencoder)
open it with `read_only=True`: they never create, clean up or move anything, so they can read checkpoints while
a run is still writing them; a damaged checkpoint is skipped with a warning and left where it is.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ap_jax import fs, pytree

log = logging.getLogger(__name__)


class _QuietReadOnly(logging.Filter):
  """Orbax warns on every read-only open that it is read-only; for ap_jax's readers that is the point."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("read_only=True, setting" in message or "Given directory is read only" in message)


logging.getLogger("absl").addFilter(_QuietReadOnly())


class CheckpointError(RuntimeError):
  pass


class ChecksumMismatch(CheckpointError):
  pass


# ---------------------------------------------------------------------------------------------- checksums


def _mix(z: jax.Array) -> jax.Array:
  """A bijective 32-bit finaliser (murmur3's): every input bit changes about half the output bits."""
  z = z ^ (z >> 16)
  z = z * jnp.uint32(0x85EBCA6B)
  z = z ^ (z >> 13)
  z = z * jnp.uint32(0xC2B2AE35)
  return z ^ (z >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """uint32 checksum of one array's bytes and their positions: the wrapping sum of mix(word + position * golden).
  Integer addition is associative, so the value does not depend on how the array is sharded."""
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    words = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    words = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    words = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  elif x.dtype.itemsize == 8:
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # adds a trailing axis of 2 words
  else:
    raise CheckpointError(f"cannot checksum an array of dtype {x.dtype}")
  words = words.reshape(-1)
  position = jnp.arange(words.shape[0], dtype=jnp.uint32)
  return jnp.sum(_mix(words + position * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)


_checksums_jit = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def state_checksums(state: Any) -> dict[str, int]:
  """{'params/blocks/attn/q': 1234..., ...}: one uint32 checksum per array of `state` (sharded or not)."""
  sums = jax.device_get(_checksums_jit(state))
  return {pytree.path_name(path): int(np.asarray(v)) for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def verify_checksums(state: Any, expected: dict[str, int] | None, *, what: str) -> bool:
  """Raises ChecksumMismatch naming the arrays that differ; returns False when `expected` is None (a checkpoint
  written before checksums existed: nothing to check against)."""
  if expected is None:
    return False
  got = state_checksums(state)
  bad = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
  if bad:
    raise ChecksumMismatch(f"{what}: {len(bad)} of {len(got)} arrays differ from the checksums written with it "
                           f"(first: {', '.join(bad[:3])}); its files were damaged after the save")
  return True


def _agree(error: Exception | None, step: int) -> Exception | None:
  """Every process reads its own shards, so damage may show on one process only: all treat the checkpoint as
  damaged when any does (otherwise they would resume from different steps)."""
  if jax.process_count() == 1:
    return error
  from jax.experimental import multihost_utils

  failed = np.asarray(multihost_utils.process_allgather(np.array([error is not None])))
  if error is None and failed.any():
    return CheckpointError(f"checkpoint {step} failed to restore on another process")
  return error


# ------------------------------------------------------------------------------------------- checkpointer


def _retry_vanished(fn, directory: str, attempts: int = 8):
  """Runs `fn` (Orbax's listing of a checkpoint directory) again when a step folder vanishes mid-listing.

  Orbax lists the step folders, then reads each one's timestamp; a training run that keeps `max_to_keep` steps can
  delete a folder in between, and the read fails with FileNotFoundError. Only read-only readers race like this (the
  owner never deletes under its own listing), so only they retry; a folder that stays missing is a real error."""
  for attempt in range(attempts):
    try:
      return fn()
    except FileNotFoundError as e:
      if attempt == attempts - 1:
        raise
      log.info("a checkpoint in %s was removed while being listed (%s); listing again", directory, e.filename)
      time.sleep(0.02 * (attempt + 1))


class Checkpointer:
  """A workdir's checkpoints. `read_only=True` for every process that does not train in the workdir."""

  def __init__(self, workdir: str, *, keep: int = 3, keep_period: int | None = None, async_save: bool = True,
               read_only: bool = False):
    self.workdir = fs.absolute(workdir)  # a local folder or a gs:// URL: Orbax writes to both
    self.directory = fs.join(self.workdir, "checkpoints")
    self.damaged_dir = fs.join(self.workdir, "checkpoints_damaged")
    self.read_only = bool(read_only)
    self.manager = None
    if read_only:
      if not fs.isdir(self.workdir):
        raise CheckpointError(f"workdir {workdir} does not exist")
      if not fs.isdir(self.directory):
        return  # nothing saved yet: no steps, and nothing is created
    if not read_only:
      self._remove_unfinished()
    # Orbax's own clean-up of unfinished saves runs in a background thread that can outlive the process's last
    # line (a traceback after a clean error): the owner removes them itself, synchronously, above.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None, enable_async_checkpointing=async_save and not read_only,
        create=not read_only, cleanup_tmp_directories=False, read_only=read_only)
    make = lambda: ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))
    self.manager = _retry_vanished(make, self.directory) if read_only else make()

  def _remove_unfinished(self) -> None:
    """Removes saves that a killed run left unfinished (Orbax's `*.orbax-checkpoint-tmp*` folders): only the
    training process, which owns the workdir, calls this."""
    if jax.process_index() == 0 and fs.isdir(self.directory):
      for name in fs.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          log.info("removing %s, a save that did not finish", fs.join(self.directory, name))
          fs.rmtree(fs.join(self.directory, name))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("ap_jax unfinished checkpoints removed")

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def all_steps(self) -> list[int]:
    if self.manager is None:
      return []
    if self.read_only:
      _retry_vanished(self.manager.reload, self.directory)  # the training run may have added or removed steps
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator, meta: dict, *, force: bool = False) -> bool:
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only; only the training process saves")
    meta = dict(meta, checksums=state_checksums(state))
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def read_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def latest_meta(self) -> tuple[int, dict] | None:
    """(step, meta) of the newest checkpoint whose metadata reads, or None. A reader may race the training run's
    clean-up of old steps (max_to_keep): a step that disappears while being read is skipped."""
    for step in reversed(self.all_steps()):
      try:
        return step, self.read_meta(step)
      except Exception as e:  # removed under us, or damaged
        if self.read_only and step not in self.all_steps():
          continue
        log.warning("checkpoint %d: its metadata does not read (%s: %s); trying the previous one", step,
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return None

  def _restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict, bool]:
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    meta = dict(restored["meta"])
    verified = verify_checksums(restored["state"], meta.get("checksums"),
                                what=f"checkpoint {fs.join(self.directory, str(step))}")
    return restored["state"], meta, verified

  def restore_latest(self, abstract_state: Any, data_iterator=None) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that restores cleanly onto `abstract_state`'s shardings (any mesh) and
    matches its checksums. Returns (step, state, meta; meta['verified'] says whether checksums were checked), or
    None when there is no usable checkpoint. The training process moves damaged checkpoints aside; a read-only
    reader skips them."""
    for step in reversed(self.all_steps()):
      error = None
      try:
        state, meta, verified = self._restore(step, abstract_state, data_iterator)
      except Exception as e:  # damaged files surface as many exception types (OSError, ValueError, ...)
        error = e
      error = _agree(error, step)
      if error is not None:
        if self.read_only and step not in self.all_steps():
          log.info("checkpoint %d was removed by the training run while being read; trying the next", step)
        else:
          self._damaged(step, error)
        continue
      if not verified:
        log.warning("checkpoint %d carries no checksums (written by an older ap_jax): restored unverified", step)
      meta["verified"] = verified
      return step, state, meta
    return None

  def restore_latest_part(self, abstract_part: dict) -> tuple[int, dict, dict] | None:
    """Restores only the entries of `state` that `abstract_part` names (e.g. `{'ema': ..., 'step': ...}`) from the
    newest checkpoint that restores cleanly, onto the part's shardings. Inference reads the EMA weights alone: no
    optimizer is built and Adam's moments are never read. Checksums of the restored arrays are verified. Returns
    (step, part, meta) or None, skipping (never moving) damaged checkpoints, as a read-only reader does."""
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                               dtype=x.dtype), abstract_part)
    reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    for step in reversed(self.all_steps()):
      try:
        meta = self.read_meta(step)
        part = reader.restore(fs.join(self.directory, str(step), "state"), args=ocp.args.PyTreeRestore(
            item=abstract_part, restore_args=restore_args, partial_restore=True))
        expected = meta.get("checksums")
        if expected is not None:
          expected = {k: v for k, v in expected.items() if k.split("/")[0] in abstract_part}
        verified = verify_checksums(part, expected, what=f"checkpoint {fs.join(self.directory, str(step))}")
      except Exception as e:  # damaged, or removed by the training run while being read
        if step in self.all_steps():
          log.warning("checkpoint at step %d cannot be restored (%s: %s); skipping it", step, type(e).__name__,
                      str(e).splitlines()[0][:300] if str(e) else "")
        continue
      meta["verified"] = verified
      return step, dict(part), meta
    return None

  def _damaged(self, step: int, error: Exception) -> None:
    path = fs.join(self.directory, str(step))
    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    if self.read_only:
      log.warning("checkpoint at step %d cannot be restored (%s); skipping it (read-only: left in place)", step,
                  reason)
      return
    log.warning("checkpoint at step %d cannot be restored (%s); moving it to %s and trying the previous one", step,
                reason, self.damaged_dir)
    if jax.process_index() == 0 and fs.exists(path):
      fs.makedirs(self.damaged_dir)
      fs.rename(path, fs.join(self.damaged_dir, f"{step}-{int(time.time())}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"ap_jax quarantine {step}")
    self.manager.reload()

  def wait(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()

  def close(self) -> None:
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
