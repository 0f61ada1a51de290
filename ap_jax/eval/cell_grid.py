"""Where a grid game's map cells lie on a frame (`Grid`: cell tiles and centres), and whether each player's cell
shows its main colour (`player_visible`). Shared by the learned detector (`ap_jax.eval.template_detector`), its
Melting Pot fitting (`ap_jax.eval.learned_detector`) and the replayed truths (`ap_jax.eval.replay`).

Dimension letters: R, C grid rows and columns (the map's cells), D = S*S*3 values per tile of S x S pixels,
P players.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ap_jax.eval import detector as detector_lib

# A player counts as visible when this many of its cell's pixels are within COLOUR_TOLERANCE of its main colour.
COLOUR_TOLERANCE = 12


@dataclasses.dataclass(frozen=True)
class Grid:
  """Where the map's cells lie on the frame: `rows` x `cols` cells of `cell_size` px, the first at (top, left)."""

  cell_size: int
  top: int
  left: int
  rows: int
  cols: int

  def __post_init__(self):
    for name in ("cell_size", "rows", "cols"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"Grid.{name} = {getattr(self, name)}, expected at least 1")
    if self.top < 0 or self.left < 0:
      raise ValueError(f"Grid offset ({self.top}, {self.left}), expected non-negative pixels")

  def check_frames(self, frames: np.ndarray) -> None:
    h, w = frames.shape[-3:-1]
    if self.top + self.rows * self.cell_size > h or self.left + self.cols * self.cell_size > w:
      raise ValueError(f"frames are {h} x {w} px, too small for {self.rows} x {self.cols} cells of "
                       f"{self.cell_size} px at ({self.top}, {self.left})")

  def tiles(self, frames: np.ndarray) -> np.ndarray:
    """[..., R, C, D] float32 cell tiles of frames [..., H, W, 3] on the 0-255 scale (uint8 or float; convert
    model-range frames with `detector.to_uint8_scale` first)."""
    frames = np.asarray(frames, np.float32)
    self.check_frames(frames)
    s = self.cell_size
    *lead, _, _, _ = frames.shape
    crop = frames[..., self.top:self.top + self.rows * s, self.left:self.left + self.cols * s, :]
    crop = crop.reshape(*lead, self.rows, s, self.cols, s, 3)
    order = tuple(range(len(lead))) + tuple(len(lead) + i for i in (0, 2, 1, 3, 4))
    return crop.transpose(order).reshape(*lead, self.rows, self.cols, s * s * 3)

  def centres(self, cells: np.ndarray) -> np.ndarray:
    """Pixel centres (y, x) on the frame of cells [..., 2]."""
    return (np.array([self.top, self.left], np.float32)
            + (np.asarray(cells, np.float32) + 0.5) * self.cell_size).astype(np.float32)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def player_visible(frames: np.ndarray, cells: np.ndarray, colors: np.ndarray, grid: Grid,
                   min_pixels: int = 1) -> np.ndarray:
  """bool [..., P]: does player p's cell show its main colour (`colors[p]`)? False for a removed (zapped) avatar
  whose reported cell shows the ground, or a cell outside the map. frames [..., H, W, 3], cells [..., P, 2]."""
  tiles = grid.tiles(detector_lib.to_uint8_scale(frames))  # [..., R, C, D]
  cells = np.asarray(cells)
  inside = np.all((cells >= 0) & (cells < np.array([grid.rows, grid.cols])), axis=-1)
  y = np.clip(cells[..., 0], 0, grid.rows - 1)
  x = np.clip(cells[..., 1], 0, grid.cols - 1)
  lead = tiles.shape[:-3]
  idx = np.indices(lead + (cells.shape[-2],))[:-1]
  own = tiles[(*idx, y, x)]  # [..., P, D]
  own = own.reshape(*own.shape[:-1], -1, 3)
  close = np.all(np.abs(own - np.asarray(colors, np.float32)[..., :, None, :]) <= COLOUR_TOLERANCE, axis=-1)
  return inside & (close.sum(axis=-1) >= min_pixels)
