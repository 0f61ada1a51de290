"""The subject state: each player's coordinates (and facing), normalised, and where its token sits on the grid.

`coords` are subject positions normalised to [-1, 1] over the canvas: c = 2 pixel / size - 1
(positions_to_coords). A subject token's rotary (y, x) is its coordinate in token-grid units,
(c + 1) / 2 * (Y, X) - 1/2, so a subject centred on video token (i, j) rotates exactly like that token
(coords_to_token_grid; fractional positions allowed). With dit.state_facing the state also carries the player's
facing as a unit vector (dy, dx).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ap_jax import actions as actions_lib


def state_dims(config: ml_collections.ConfigDict) -> int:
  """Entries of a subject's state: its normalised (y, x), plus its facing (dy, dx) with dit.state_facing."""
  return 4 if config.dit.get("state_facing", False) else 2


def facing_vectors(orientations: jax.Array) -> jax.Array:
  """int orientations (0 N, 1 E, 2 S, 3 W) [...] -> unit facing vectors (dy, dx) [..., 2] float32."""
  table = jnp.asarray(actions_lib.ORIENTATION_DELTAS, jnp.float32)
  return jnp.take(table, jnp.clip(orientations.astype(jnp.int32), 0, 3), axis=0)


def subject_state(positions_px: jax.Array, orientations, canvas_hw, config: ml_collections.ConfigDict) -> jax.Array:
  """Pixel centres [..., 2] (and orientations [...]) -> the subject state [..., state_dims]: normalised
  coordinates, then the facing vector with dit.state_facing."""
  coords = positions_to_coords(positions_px, canvas_hw)
  if not config.dit.get("state_facing", False):
    return coords
  if orientations is None:
    raise ValueError("dit.state_facing needs each player's orientation (batch['orientations'] [B, F, P])")
  return jnp.concatenate([coords, facing_vectors(orientations)], axis=-1)


def positions_to_coords(positions_px: jax.Array, canvas_hw: tuple[int, int]) -> jax.Array:
  """Pixel centres (y, x) -> coordinates normalised to [-1, 1] over the canvas: 2 p / size - 1."""
  size = jnp.asarray(canvas_hw, jnp.float32)
  return 2.0 * positions_px.astype(jnp.float32) / size - 1.0


def coords_to_positions(coords: jax.Array, canvas_hw: tuple[int, int]) -> jax.Array:
  """Inverse of positions_to_coords."""
  size = jnp.asarray(canvas_hw, jnp.float32)
  return (coords.astype(jnp.float32) + 1.0) * 0.5 * size


def coords_to_token_grid(coords: jax.Array, grid_yx: tuple[int, int]) -> jax.Array:
  """Normalised coordinates -> token-grid units, where the centre of video token (i, j) is exactly (i, j)."""
  grid = jnp.asarray(grid_yx, jnp.float32)
  return (coords.astype(jnp.float32) + 1.0) * 0.5 * grid - 0.5


def coord_features(coords: jax.Array, num_freqs: int) -> jax.Array:
  """[..., S] -> [..., S + 2 S num_freqs]: the raw state and sin/cos at octave frequencies (pi to 64 pi), fine
  enough to tell apart cells of a 64-wide grid."""
  freqs = jnp.pi * 2.0 ** jnp.linspace(0.0, 6.0, num_freqs)
  args = coords[..., None] * freqs  # [..., S, n]
  feats = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1).reshape(coords.shape[:-1] + (-1,))
  return jnp.concatenate([coords, feats], axis=-1)
