"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

On TPU VMs (and other clusters JAX detects) `initialize()` needs no arguments. Elsewhere the coordinator
address, process count and process id come from flags or `AP_JAX_COORDINATOR`, `AP_JAX_NUM_PROCESSES`,
`AP_JAX_PROCESS_ID`. On the CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> None:
  coordinator = coordinator or os.environ.get("AP_JAX_COORDINATOR")
  if num_processes is None and os.environ.get("AP_JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["AP_JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("AP_JAX_PROCESS_ID"):
    process_id = int(os.environ["AP_JAX_PROCESS_ID"])
  if coordinator:
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator {coordinator!r} given without the process count and id: pass "
                       "--num-processes and --process-id (or AP_JAX_NUM_PROCESSES / AP_JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    if os.environ.get("JAX_PLATFORMS", "") in ("cpu", "") and not _has_accelerator_env():
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif auto or _has_accelerator_env():
    jax.distributed.initialize()
  else:
    return
  log.info("process %d of %d: %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())


def _has_accelerator_env() -> bool:
  # TPU VM pods set these; a single TPU VM host needs no distributed initialisation.
  return bool(os.environ.get("TPU_WORKER_HOSTNAMES") and "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))
