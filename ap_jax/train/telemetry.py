"""What a run reports: metrics.jsonl and TensorBoard scalars, the loss plot."""

from __future__ import annotations

import io
import json
import logging
import os

import numpy as np

from ap_jax import fs

log = logging.getLogger("ap_jax.train")

class MetricsWriter:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars; process 0 only. The workdir may be a
  `gs://` URL (`ap_jax.fs`)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = fs.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      drop_torn_line(self.path)
      try:
        from tensorboardX import SummaryWriter

        logdir = fs.join(workdir, "tensorboard")
        fs.register_tensorboard_writer(logdir)
        self._tb = SummaryWriter(logdir)
      except ImportError:
        log.warning("tensorboardX is not installed: TensorBoard scalars are off")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: (None if v is None else float(v)) for k, v in metrics.items()}}
    fs.append_text(self.path, json.dumps(record) + "\n")
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
  if fs.is_url(path):
    data = fs.read_bytes(path) if fs.exists(path) else b""
    if data and not data.endswith(b"\n"):
      keep = data.rfind(b"\n") + 1
      log.warning("%s: the last line was cut by an interrupted write (%r); dropping it", path,
                  data[keep:keep + 80].decode(errors="replace"))
      fs.write_atomic(path, data[:keep])
    return
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
  for number, line in enumerate(fs.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      log.warning("%s line %d does not parse (%s); skipping it", path, number, e)
  return records


def plot_losses(workdir: str) -> str | None:
  """loss.png from metrics.jsonl: the curve people would rather look at than read."""
  path = fs.join(workdir, "metrics.jsonl")
  if not fs.exists(path):
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
  out = fs.join(workdir, "loss.png")
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  fs.write_atomic(out, buffer.getvalue())
  plt.close(fig)
  return out
