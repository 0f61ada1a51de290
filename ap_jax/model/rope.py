"""3D rotary position embedding over (t, y, x), Wan2.1 style, with real-valued (fractional) positions.

The head dimension D is split into three groups of rotated pairs as in Wan2.1: t gets D - 4 (D // 6) dims,
y and x get 2 (D // 6) each. Pairs are interleaved (x[..., 0::2], x[..., 1::2]), as Wan's complex view.
Positions are floats: a subject token at fractional grid coordinates rotates by the same formula, so its
score against a video key varies smoothly between those of the neighbouring grid cells.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Dims given to (t, y, x); each even, summing to head_dim."""
  if head_dim % 2 or head_dim < 6:
    raise ValueError(f"head_dim = {head_dim}, expected an even number >= 6 for 3D RoPE")
  s = 2 * (head_dim // 6)
  return head_dim - 2 * s, s, s


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-pair angular frequencies for t, y and x: theta ** (-2i / dim) within each group."""
  return tuple(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in rope_split(head_dim))


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
  """[..., 3] positions (t, y, x) -> [..., head_dim // 2] rotation angles (float32)."""
  ft, fy, fx = (jnp.asarray(f, jnp.float32) for f in rope_frequencies(head_dim, theta))
  pos = positions.astype(jnp.float32)
  return jnp.concatenate([pos[..., 0:1] * ft, pos[..., 1:2] * fy, pos[..., 2:3] * fx], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of x [..., D] by angles [..., D/2] (broadcast over heads); float32 inside."""
  x32 = x.astype(jnp.float32)
  x_even, x_odd = x32[..., 0::2], x32[..., 1::2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  out_even = x_even * cos - x_odd * sin
  out_odd = x_even * sin + x_odd * cos
  return jnp.stack([out_even, out_odd], axis=-1).reshape(x.shape).astype(x.dtype)
