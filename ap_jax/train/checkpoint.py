"""Orbax checkpoints holding everything a bit-exact resume needs, and restoring past damaged ones.

One composite checkpoint per saved step, under `WORKDIR/checkpoints/<step>/`:
  state  params, optimizer state, EMA, step, RNG (a pytree of jax.Arrays; restored onto any mesh)
  data   the Grain iterator state of every process (each process writes and reads its own)
  meta   JSON: the model fingerprint, the full config, and stage facts such as the latent statistics

Orbax writes a step into a temporary directory and renames it when complete, so a checkpoint being written when
the process died is never listed. A complete-looking checkpoint that fails to restore (truncated or damaged
files) is moved to `WORKDIR/checkpoints_damaged/` with a warning, and the previous one is restored instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, keep_period: int | None = None, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.damaged_dir = os.path.abspath(os.path.join(workdir, "checkpoints_damaged"))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, keep_period=keep_period or None, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator, meta: dict, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iterator),
                              meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def read_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore_latest(self, abstract_state: Any, data_iterator) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that restores cleanly onto `abstract_state`'s shardings (any mesh).
    Returns (step, state, meta), or None when there is no usable checkpoint."""
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # damaged files surface as many exception types (OSError, ValueError, ...)
        self._quarantine(step, e)
        continue
      return step, restored["state"], dict(restored["meta"])
    return None

  def _quarantine(self, step: int, error: Exception) -> None:
    path = os.path.join(self.directory, str(step))
    log.warning("checkpoint at step %d cannot be restored (%s: %s); moving it aside and trying the previous one",
                step, type(error).__name__, str(error).splitlines()[0][:300])
    if jax.process_index() == 0 and os.path.exists(path):
      os.makedirs(self.damaged_dir, exist_ok=True)
      shutil.move(path, os.path.join(self.damaged_dir, f"{step}-{int(time.time())}"))
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
