"""3D rotary position embedding over (t, y, x), Wan2.1 style, with real-valued (fractional) positions.

The head dimension D is split into three groups of rotated pairs as in Wan2.1: t gets D - 4 (D // 6) dims,
y and x get 2 (D // 6) each. Pairs are interleaved (x[..., 0::2], x[..., 1::2]), as Wan's complex view.
Positions are floats: a subject token at fractional grid coordinates rotates by the same formula, so its
score against a video key varies smoothly between those of the neighbouring grid cells.

Five positions (t, y, x, y', x') add a second spatial pair of groups, 2 (D // 16) dims each, taken from t's share
(y and x keep theirs): dit.subject_rope_previous rotates a subject token by its previous cell there, and a video
token by its own cell in both (dit_model.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_split(head_dim: int, num_positions: int = 3) -> tuple[int, ...]:
  """Dims given to (t, y, x), or with num_positions = 5 to (t, y, x, y', x'); each even, summing to head_dim."""
  if num_positions not in (3, 5):
    raise ValueError(f"num_positions = {num_positions}, expected 3 (t, y, x) or 5 (t, y, x, y', x')")
  least = 6 if num_positions == 3 else 16
  if head_dim % 2 or head_dim < least:
    raise ValueError(f"head_dim = {head_dim}, expected an even number >= {least} for RoPE over {num_positions} "
                     f"positions")
  s = 2 * (head_dim // 6)
  if num_positions == 3:
    return head_dim - 2 * s, s, s
  s_prev = 2 * (head_dim // 16)
  return head_dim - 2 * s - 2 * s_prev, s, s, s_prev, s_prev


def rope_frequencies(head_dim: int, theta: float = 10000.0, num_positions: int = 3) -> tuple[np.ndarray, ...]:
  """Per-pair angular frequencies for each position group: theta ** (-2i / dim) within each group."""
  return tuple(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in rope_split(head_dim, num_positions))


def rope_angles(positions: jax.Array, head_dim: int, theta: float = 10000.0) -> jax.Array:
  """[..., 3] positions (t, y, x), or [..., 5] (t, y, x, y', x'), -> [..., head_dim // 2] rotation angles
  (float32)."""
  num_positions = positions.shape[-1]
  freqs = rope_frequencies(head_dim, theta, num_positions)
  pos = positions.astype(jnp.float32)
  return jnp.concatenate([pos[..., i:i + 1] * jnp.asarray(f, jnp.float32) for i, f in enumerate(freqs)], axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of x [..., D] by angles [..., D/2] (broadcast over heads); float32 inside."""
  x32 = x.astype(jnp.float32)
  x_even, x_odd = x32[..., 0::2], x32[..., 1::2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  out_even = x_even * cos - x_odd * sin
  out_odd = x_even * sin + x_odd * cos
  return jnp.stack([out_even, out_odd], axis=-1).reshape(x.shape).astype(x.dtype)
