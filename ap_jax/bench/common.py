"""What every benchmark shares: the machine it ran on, the timing rule (a median over repeats), loading a config
with overrides, and the number format of the tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count(),
              device_kind=getattr(device, "device_kind", str(device)))


def median_seconds(fn: Callable[[], Any], *, repeats: int, inner: int = 1) -> float:
  """Median over `repeats` of the wall time of `inner` calls of `fn` (which must block on its result), per call."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      fn()
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times)


def load_config(name: str, overrides: Sequence[str] = ()):
  """The config `name` (a name in configs/ or a file) with `--config.x=y` overrides applied."""
  from ap_jax.train import config_utils

  return config_utils.apply_overrides(config_utils.load_config(name), list(overrides))


def fmt(value, spec: str) -> str:
  """A table cell: `value` formatted by `spec`, or '-' when there is none."""
  return "-" if value is None else format(value, spec)
