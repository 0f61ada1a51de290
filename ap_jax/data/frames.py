"""Frames between pixels and the model's range: uint8 [0, 255] <-> float32 [-1, 1], one definition for the input
pipeline (`pipeline.make_clip`), latent encoding (`train.inputs.encode_source`) and the sampler, so the frames a
model trains on and the frames it starts a rollout from are normalised by the same arithmetic."""

from __future__ import annotations

import numpy as np


def to_model_range(frames: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] frames -> float32 in [-1, 1] (x * 2/255 - 1); floating-point frames are taken as already in
  [-1, 1] (cast to float32). Any other dtype is a ValueError."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    return frames.astype(np.float32) * (2.0 / 255.0) - 1.0
  if not np.issubdtype(frames.dtype, np.floating):
    raise ValueError(f"frames have dtype {frames.dtype}, expected uint8 or floating point in [-1, 1]")
  return frames.astype(np.float32)


def to_uint8(frames: np.ndarray) -> np.ndarray:
  """Frames in [-1, 1] -> uint8 [0, 255], rounded and clipped (`to_model_range`'s inverse)."""
  return np.clip(np.round((np.asarray(frames, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
