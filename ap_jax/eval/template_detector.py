"""The detector learned from labelled true frames (`TemplateDetector`): the avatars of a grid game whose true state
is known (Melting Pot, per substrate; or the built-in game), read as identity, cell and facing.

The templates come from the frames themselves, labelled with where each avatar stands and which way it faces (the
environment says so for every frame it renders). Every tile of a cell where player p stands facing f is an example
of label (p, f); every other tile is background. A label's template is the median
of its tiles with a mask of the values that agree across them: the sprite, not the ground under it, which varies
(a nearest-whole-tile classifier read 13% of `clean_up`'s players wrong when they stood on ground it had not seen
them on). A cell of a new (generated) frame shows the label whose masked RMS difference (0-255 scale) is smallest,
if that is smaller than the RMS difference to the nearest background tile; else background; and it is rejected
when both are farther than `max_rms`. Templates and background tiles are also taken from the frames blurred by a
Gaussian (in context, so the neighbours bleed in as they would), because generated frames are smoother than the
game's.

What cannot be told apart is found from the exemplars and reported, never guessed:
- Identity groups: players whose sprites coincide (the same main colour, or the same masked template;
  e.g. all players of `chemistry__*`, or the prey of `predator_prey__*`). Metrics skip the identity of such
  players: movement accuracy and subject preservation are not scored for them (NaN, left out of the averages).
- Unreadable facing: a player whose facings draw the same sprite (the coloured squares of
  `*_in_the_matrix__repeated`). Its movement is scored by the change of cell alone.
- Removed avatars (zapped, caught): the truth's `visible` flag (the player's main colour appears in its cell;
  `player_visible`) is False, and the player is not scored at that step rather than counted as lost.

Fitting it for Melting Pot substrates from random rollouts, and its cache, are `ap_jax.eval.learned_detector`;
where the cells lie on the frame is `ap_jax.eval.cell_grid`.

Dimension letters: N frames (any leading shape), R, C grid rows and columns (the map's cells), D = S*S*3 values per
tile of S x S pixels, L player labels (4 per player), V blur levels, K background tiles, P players.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from ap_jax import actions as A
from ap_jax.eval import detector as detector_lib
from ap_jax.eval.cell_grid import COLOUR_TOLERANCE, Grid

BACKGROUND = -1  # exemplar label of a cell with no player; player p facing f is p * 4 + f
# Blur levels in units of an 8 px cell (scaled by cell_size / 8), as the built-in detector's.
BLUR_SIGMAS_8PX = (0.0, 0.7, 1.0, 1.4)
DEFAULT_MAX_RMS = 48.0
DETECTOR_VERSION = 3  # of the saved file (`save`, `load`); a cached detector of another version is fitted again
# A value belongs to a label's sprite mask when MASK_SHARE of the fitted tiles of the label are within
# MASK_TOLERANCE of their median (0-255 scale): the sprite, not the ground under it (or a passing beam).
MASK_TOLERANCE = 12.0
MASK_SHARE = 0.95
# A cell can show player p only if p's body-colour values are within this RMS (0-255) of its template.
BODY_MAX_RMS = 40.0
# Two labels draw the same sprite when their means differ by less than this RMS on their shared mask.
SAME_SPRITE_RMS = 4.0


def _cell_ground(tiles_NRCD: np.ndarray, free_NRC: np.ndarray) -> np.ndarray:
  """[R, C, D] median tile of each cell over the frames where it is free (NaN where it never is)."""
  n, r, c, d = tiles_NRCD.shape
  out = np.full((r, c, d), np.nan, np.float32)
  for y in range(r):
    for x in range(c):
      rows = tiles_NRCD[free_NRC[:, y, x], y, x]
      if len(rows):
        out[y, x] = np.median(rows, axis=0)
  return out


def _blurred(frames: np.ndarray, sigma: float) -> np.ndarray:
  if sigma == 0:
    return frames
  from scipy import ndimage

  return ndimage.gaussian_filter(frames, (0,) * (frames.ndim - 3) + (sigma, sigma, 0), mode="nearest")


@dataclasses.dataclass
class TemplateDetector:
  """Masked-template cell classifier (see the module docstring). `detect` returns `detector.Detections`, with
  kind 0 for background cells, 3 for player cells and -1 for rejected ones.

  Player label l (player p facing f is l = 4p + f) has, per blur level v, a mean tile `templates_LVD` and a mask
  `masks_LVD` of the values that stay within MASK_STD of that mean over every fitted tile of the label (the sprite;
  the ground under it varies and drops out). Background cells are `background_KD`, distinct tiles of cells where no
  player stands. A tile's distance to a label is the RMS over the label's mask (the best blur level); to the
  background, the RMS to the nearest background tile. The cell shows the nearest player label if that is nearer
  than the background, else background; rejected if the nearer of the two is farther than `max_rms`.
  """

  grid: Grid
  templates_LVD: np.ndarray  # float32
  masks_LVD: np.ndarray  # bool
  body_LD: np.ndarray  # bool: the mask's values in the player's main colour (identity)
  background_KD: np.ndarray  # float32
  colors: np.ndarray  # uint8 [P, 3]: the players' main colours it was fitted on (identity is by colour)
  num_players: int
  groups: tuple[tuple[int, ...], ...]  # every player in exactly one group; a group of one is identifiable
  facing_readable: np.ndarray  # bool [P]
  max_rms: float = DEFAULT_MAX_RMS
  name: str = ""
  info: dict = dataclasses.field(default_factory=dict)

  @property
  def identifiable(self) -> np.ndarray:
    """bool [P]: players whose sprites no other player shares."""
    out = np.zeros(self.num_players, bool)
    for g in self.groups:
      if len(g) == 1:
        out[g[0]] = True
    return out

  # -------------------------------------------------------------------------------------------------- fitting

  @classmethod
  def fit(cls, frames: np.ndarray, cells: np.ndarray, orientations: np.ndarray, visible: np.ndarray,
          colors: np.ndarray, grid: Grid, *, blur_sigmas: Sequence[float] | None = None,
          max_background: int = 20000, max_rms: float = DEFAULT_MAX_RMS, seed: int = 0,
          name: str = "") -> "TemplateDetector":
    """Fits on labelled true frames [N, H, W, 3] with cells [N, P, 2] (map cells, (y, x)), orientations [N, P]
    and visible [N, P]. A player label never seen in the frames gets an empty mask (never detected; `info`
    lists it)."""
    frames = detector_lib.to_uint8_scale(frames)
    cells, orientations = np.asarray(cells, np.int64), np.asarray(orientations, np.int64)
    visible = np.asarray(visible, bool)
    colors = np.asarray(colors, np.uint8)
    n, p = cells.shape[:2]
    if frames.ndim != 4 or frames.shape[0] != n or orientations.shape != (n, p) or visible.shape != (n, p):
      raise ValueError(f"frames {frames.shape}, cells {cells.shape}, orientations {orientations.shape}, visible "
                       f"{visible.shape}: expected [N, H, W, 3], [N, P, 2], [N, P], [N, P]")
    if colors.shape != (p, 3):
      raise ValueError(f"colors has shape {colors.shape}, expected [{p}, 3]")
    if blur_sigmas is None:
      blur_sigmas = tuple(s * grid.cell_size / 8.0 for s in BLUR_SIGMAS_8PX)
    num_labels = p * A.NUM_ORIENTATIONS
    d = grid.cell_size**2 * 3
    labels = np.full((n, grid.rows, grid.cols), BACKGROUND, np.int64)
    fi, pi = np.nonzero(visible)
    labels[fi, cells[fi, pi, 0], cells[fi, pi, 1]] = pi * A.NUM_ORIENTATIONS + orientations[fi, pi]
    flat_labels = labels.reshape(-1)

    rng = np.random.default_rng(seed)
    templates = np.zeros((num_labels, len(blur_sigmas), d), np.float32)
    masks = np.zeros((num_labels, len(blur_sigmas), d), bool)
    background = []
    free = labels == BACKGROUND  # [N, R, C]
    for v, sigma in enumerate(blur_sigmas):
      tiles_nrc = grid.tiles(_blurred(frames, float(sigma)))
      tiles = tiles_nrc.reshape(-1, d)
      # Each cell's ground: its median tile over the frames where no player stands on it.
      ground = _cell_ground(tiles_nrc, free)
      ground_flat = np.broadcast_to(ground, tiles_nrc.shape).reshape(-1, d)
      for lab in range(num_labels):
        sel = flat_labels == lab
        own = tiles[sel]
        if len(own):
          templates[lab, v] = np.median(own, axis=0)
          steady = np.mean(np.abs(own - templates[lab, v]) <= MASK_TOLERANCE, axis=0) >= MASK_SHARE
          # The sprite is what differs from the ground it stands on (where that ground is known).
          under = ground_flat[sel]
          known = ~np.isnan(under)
          drawn = np.where(known, np.abs(own - np.nan_to_num(under)) > MASK_TOLERANCE, True).mean(axis=0) >= 0.5
          masks[lab, v] = steady & drawn if (steady & drawn).any() else steady
      bg = np.unique(np.round(tiles[flat_labels == BACKGROUND]).astype(np.uint8), axis=0)
      background.append(bg)
    background = np.concatenate(background)
    if len(background) > max_background:
      background = background[np.sort(rng.choice(len(background), max_background, replace=False))]
    seen = masks[:, 0].any(axis=-1)
    # Identity lives in the body colour: the sharp template's masked pixels in the player's main colour.
    px = templates[:, 0].reshape(num_labels, -1, 3)
    label_colour = np.repeat(colors.astype(np.float32), A.NUM_ORIENTATIONS, axis=0)[:, None, :]
    body = np.all(np.abs(px - label_colour) <= COLOUR_TOLERANCE, axis=-1)  # [L, S*S]
    body = np.repeat(body, 3, axis=1) & masks[:, 0]
    # A label whose template shows no body colour (too few examples to separate sprite from ground, or a sprite
    # drawn without it) has an empty body: it is never detected, and `info` names it.

    # What cannot be told apart: players of one main colour, or with the same sharp sprite (equal on both masks).
    def same(a: int, b: int) -> bool:
      both = masks[a, 0] & masks[b, 0]
      either = masks[a, 0] | masks[b, 0]
      if not seen[a] or not seen[b] or both.sum() < 0.9 * either.sum():
        return False
      return bool(np.sqrt(np.mean((templates[a, 0, both] - templates[b, 0, both]) ** 2)) < SAME_SPRITE_RMS)

    parent = list(range(p))

    def find(a):
      while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
      return a

    for a in range(p):
      for b in range(a + 1, p):
        alike = np.array_equal(colors[a], colors[b]) or any(
            same(a * A.NUM_ORIENTATIONS + f, b * A.NUM_ORIENTATIONS + f) for f in range(A.NUM_ORIENTATIONS))
        if alike:
          parent[find(b)] = find(a)
    groups: dict[int, list[int]] = {}
    for q in range(p):
      groups.setdefault(find(q), []).append(q)
    facing_readable = np.array([
        not any(same(q * A.NUM_ORIENTATIONS + f, q * A.NUM_ORIENTATIONS + g)
                for f in range(A.NUM_ORIENTATIONS) for g in range(f + 1, A.NUM_ORIENTATIONS))
        for q in range(p)])
    info = dict(fit_frames=int(n), background_tiles=int(len(background)),
                unseen_labels=[[int(l) // A.NUM_ORIENTATIONS, int(l) % A.NUM_ORIENTATIONS]
                               for l in np.nonzero(~seen)[0]],
                labels_without_body_colour=[[int(l) // A.NUM_ORIENTATIONS, int(l) % A.NUM_ORIENTATIONS]
                                            for l in np.nonzero(seen & ~body.any(axis=1))[0]],
                mask_fraction=float(masks[seen, 0].mean()) if seen.any() else 0.0)
    return cls(grid=grid, templates_LVD=templates, masks_LVD=masks, body_LD=body,
               background_KD=background.astype(np.float32), colors=colors.copy(),
               num_players=p, groups=tuple(tuple(g) for g in sorted(groups.values())),
               facing_readable=facing_readable, max_rms=float(max_rms), name=name, info=info)

  # ------------------------------------------------------------------------------------------------ detecting

  def _distances(self, flat: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, ...]:
    """Per tile of `flat` [M, D]: (RMS over each label's body values [M, L], RMS over each label's mask [M, L],
    both at their best blur level, and RMS to the nearest background tile [M])."""
    num_labels, num_variants, d = self.templates_LVD.shape
    mu = self.templates_LVD.reshape(-1, d).astype(np.float64)

    def masked(x, sq, m):  # mean squared difference over mask m [LV, D], inf where the mask is empty
      count = m.sum(axis=1)
      d2 = (sq @ m.T - 2.0 * x @ (m * mu).T + np.sum(m * mu**2, axis=1)[None, :]) / np.maximum(count, 1.0)
      d2 = np.where(count[None, :] > 0, d2, np.inf).reshape(len(x), num_labels, num_variants).min(axis=2)
      return np.sqrt(np.maximum(d2, 0.0))

    mask = self.masks_LVD.reshape(-1, d).astype(np.float64)
    body = np.repeat(self.body_LD[:, None, :], num_variants, axis=1).reshape(-1, d).astype(np.float64)
    bg = self.background_KD.astype(np.float64)
    bg_sq = np.sum(bg**2, axis=1)
    body_rms = np.empty((len(flat), num_labels))
    mask_rms = np.empty((len(flat), num_labels))
    bg_rms = np.full(len(flat), np.inf)
    for start in range(0, len(flat), chunk):
      x = flat[start:start + chunk].astype(np.float64)
      sq = x**2
      body_rms[start:start + chunk] = masked(x, sq, body)
      mask_rms[start:start + chunk] = masked(x, sq, mask)
      if len(bg):
        b2 = (np.sum(sq, axis=1)[:, None] + bg_sq[None, :] - 2.0 * x @ bg.T) / d
        bg_rms[start:start + chunk] = np.sqrt(np.maximum(b2.min(axis=1), 0.0))
    return body_rms, mask_rms, bg_rms

  def detect(self, frames: np.ndarray) -> detector_lib.Detections:
    """Reads frames [..., H, W, 3] (uint8, or float in [-1, 1]). A group of look-alike players is reported under
    its first member (`groups`); the others are never detected."""
    tiles = self.grid.tiles(detector_lib.to_uint8_scale(frames))
    *lead, r, c, d = tiles.shape
    body_rms, mask_rms, bg_rms = self._distances(tiles.reshape(-1, d))
    # A player is where some label's body colour is drawn, its whole sprite fits (a wall painted in a player's
    # colour has the colour but not the sprite), and fits better than any background tile (blurred templates
    # blend a small body into the ground); of those labels, the one whose sprite fits best.
    candidate = (body_rms <= BODY_MAX_RMS) & (mask_rms <= self.max_rms) & (mask_rms < bg_rms[:, None])
    is_player = candidate.any(axis=1)
    label = np.argmin(np.where(candidate, mask_rms, np.inf), axis=1)
    label_rms = mask_rms[np.arange(len(label)), label]
    rms = np.where(is_player, label_rms, bg_rms).astype(np.float32)
    representative = np.arange(self.num_players)
    for g in self.groups:
      representative[list(g)] = g[0]
    player = np.where(is_player, representative[label // A.NUM_ORIENTATIONS], -1)
    facing = np.where(is_player, label % A.NUM_ORIENTATIONS, -1)
    kind = np.where(is_player, detector_lib.KIND_PLAYER, detector_lib.KIND_FLOOR)
    rejected = rms > self.max_rms
    kind = np.where(rejected, detector_lib.KIND_REJECTED, kind)
    player = np.where(rejected, -1, player)
    facing = np.where(rejected, -1, facing)

    return detector_lib.from_cells(kind, player, facing, rms, tuple(lead), (r, c), self.num_players,
                                   self.grid.centres, np.zeros(lead, np.int32))

  def accuracy(self, frames: np.ndarray, cells: np.ndarray, orientations: np.ndarray, visible: np.ndarray
               ) -> dict[str, Any]:
    """How well it reads true frames [..., H, W, 3] with known cells [..., P, 2], orientations and visibility.

    player_accuracy: over visible, identifiable (player, frame) instances, the fraction detected exactly once in
    the true cell with the true facing (facing checked where readable). false_detections: the fraction of frames
    with a player detected where no visible player is. skipped_instances: visible instances of look-alike players
    (not scored). Below 0.99 the detector is not good enough to judge a model.
    """
    det = self.detect(frames)
    cells, orientations = np.asarray(cells), np.asarray(orientations)
    visible = np.asarray(visible, bool)
    scored = visible & self.identifiable
    facing_ok = (det.facing_NP == orientations) | ~self.facing_readable
    correct = (det.count_NP == 1) & np.all(det.cells_NP2 == cells, axis=-1) & facing_ok
    r, c = self.grid.rows, self.grid.cols
    flat_cells = (np.clip(cells[..., 0], 0, r - 1) * c + np.clip(cells[..., 1], 0, c - 1))
    flat_cells = flat_cells.reshape(-1, cells.shape[-2])
    occupied = np.zeros((flat_cells.shape[0], r * c), bool)
    vis_flat = visible.reshape(flat_cells.shape)
    rows = np.repeat(np.arange(flat_cells.shape[0])[:, None], flat_cells.shape[1], axis=1)
    occupied[rows[vis_flat], flat_cells[vis_flat]] = True
    detected = (det.kind_NYX == detector_lib.KIND_PLAYER).reshape(flat_cells.shape[0], -1)
    false_frames = np.any(detected & ~occupied, axis=1)
    instances = int(scored.sum())
    return {
        "player_accuracy": float(correct[scored].mean()) if instances else None,
        "false_detections": float(false_frames.mean()),
        "player_instances": instances,
        "skipped_instances": int((visible & ~self.identifiable).sum()),
        "groups": [list(g) for g in self.groups if len(g) > 1],
        "facing_unreadable": [int(q) for q in np.nonzero(~self.facing_readable)[0]],
    }

  # ---------------------------------------------------------------------------------------------- save, load

  def save(self, path: str) -> str:
    """Writes the detector to `path` (.npz) atomically (a temporary file, then a rename)."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    meta = dict(version=DETECTOR_VERSION, grid=self.grid.to_json(), num_players=self.num_players,
                groups=[list(g) for g in self.groups], max_rms=self.max_rms, name=self.name, info=self.info)
    np.savez_compressed(tmp, templates=self.templates_LVD, masks=self.masks_LVD, body=self.body_LD, colors=self.colors,
                        background=np.round(self.background_KD).astype(np.uint8),
                        facing_readable=self.facing_readable, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str) -> "TemplateDetector":
    import json

    with np.load(path) as z:
      meta = json.loads(str(z["meta"]))
      if meta.get("version") != DETECTOR_VERSION:
        raise ValueError(f"{path} holds a detector of version {meta.get('version')}, expected {DETECTOR_VERSION}; "
                         "delete it and it is fitted again")
      return cls(grid=Grid(**meta["grid"]), templates_LVD=z["templates"].astype(np.float32),
                 masks_LVD=z["masks"].astype(bool), body_LD=z["body"].astype(bool),
                 colors=z["colors"].astype(np.uint8), background_KD=z["background"].astype(np.float32),
                 num_players=int(meta["num_players"]), groups=tuple(tuple(g) for g in meta["groups"]),
                 facing_readable=z["facing_readable"].astype(bool), max_rms=float(meta["max_rms"]),
                 name=meta["name"], info=meta["info"])
