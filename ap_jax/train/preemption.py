"""Preemption: SIGTERM (a TPU VM's preemption notice) and Ctrl-C become a flag that every process agrees on."""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger("ap_jax.train")

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
