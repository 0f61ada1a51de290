"""A detector learned from labelled true frames: Melting Pot avatars per substrate (or any grid game whose true
state is known), read as identity, cell and facing.

Why learned, not drawn: Melting Pot has 49 substrates, each with its own avatar sprites, ground, objects, beams and
palettes, and the built-in detector's hand-built templates (`ap_jax.eval.detector`) cover only the built-in game.
But the environment tells us, for every frame it renders, where each avatar is and which way it faces
(`meltingpot.rollout`). So the templates come from the frames themselves: every cell tile of a rollout is an
exemplar, labelled with the player and facing standing there, or as background. A cell of a new (generated) frame
is read as the label of its nearest exemplar by root-mean-square difference (0-255 scale), or rejected when even
the nearest is farther than `max_rms`. Exemplars are also taken from the frames blurred by a Gaussian (in context,
so the neighbours bleed in as they would), because generated frames are smoother than the game's.

What cannot be told apart is found from the exemplars and reported, never guessed:
- Identity groups: players whose sprites coincide (the same main colour, or an identical tile under two labels;
  e.g. all players of `chemistry__*`, or the prey of `predator_prey__*`). Metrics skip the identity of such
  players: movement accuracy and subject preservation are not scored for them (NaN, left out of the averages).
- Unreadable facing: a player whose four facings draw the same tile (the coloured squares of
  `*_in_the_matrix__repeated`). Its movement is scored by the change of cell alone.
- Removed avatars (zapped, caught): the truth's `visible` flag (the player's main colour appears in its cell;
  `player_visible`) is False, and the player is not scored at that step rather than counted as lost.

Detectors for Melting Pot are fitted by `meltingpot_detector(substrate, players, canvas_hw)` from uniformly random
rollouts with seeds of their own (`FIT_SEED_OFFSET`), checked on other rollouts (`CHECK_SEED_OFFSET`), and cached
in memory and on disk (`dataset_cache_dir()/detectors`). `python -m ap_jax.eval.learned_detector --substrates
a,b` prints each one's accuracy on true frames.

Dimension letters: N frames (any leading shape), R, C grid rows and columns (the map's cells), D = S*S*3 values per
tile of S x S pixels, K exemplars, P players.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ap_jax import actions as A
from ap_jax.eval import detector as detector_lib

log = logging.getLogger("ap_jax.eval")

BACKGROUND = -1  # exemplar label of a cell with no player; player p facing f is p * 4 + f
# Blur levels in units of an 8 px cell (scaled by cell_size / 8), as the built-in detector's.
BLUR_SIGMAS_8PX = (0.0, 0.7, 1.0, 1.4)
DEFAULT_MAX_RMS = 48.0
# Seeds of the fitting and checking rollouts: disjoint from the dataset splits (0, 1e8, 2e8 + i), live training
# episodes (3e8) and fresh evaluation episodes (4e8).
FIT_SEED_OFFSET = 700_000_000
CHECK_SEED_OFFSET = 710_000_000
DETECTOR_VERSION = 1
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


def _blurred(frames: np.ndarray, sigma: float) -> np.ndarray:
  if sigma == 0:
    return frames
  from scipy import ndimage

  return ndimage.gaussian_filter(frames, (0,) * (frames.ndim - 3) + (sigma, sigma, 0), mode="nearest")


@dataclasses.dataclass
class TemplateDetector:
  """Nearest-exemplar cell classifier (see the module docstring). `detect` returns `detector.Detections`, with
  kind 0 for background cells, 3 for player cells and -1 for rejected ones."""

  grid: Grid
  exemplars_KD: np.ndarray  # float32
  labels_K: np.ndarray  # int32: BACKGROUND or player * 4 + facing
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
          max_per_label: int = 400, max_background: int = 3000, max_rms: float = DEFAULT_MAX_RMS, seed: int = 0,
          name: str = "") -> "TemplateDetector":
    """Fits on labelled true frames [N, H, W, 3] with cells [N, P, 2] (map cells, (y, x)), orientations [N, P]
    and visible [N, P]. Exemplars are the distinct tiles of every label (sharp and blurred), subsampled to at
    most `max_per_label` per player-facing label and `max_background` background tiles."""
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
    labels = np.full((n, grid.rows, grid.cols), BACKGROUND, np.int64)
    fi, pi = np.nonzero(visible)
    labels[fi, cells[fi, pi, 0], cells[fi, pi, 1]] = pi * A.NUM_ORIENTATIONS + orientations[fi, pi]

    # What cannot be told apart, from the sharp tiles: one tile under two labels.
    sharp = grid.tiles(frames).reshape(-1, grid.cell_size**2 * 3)
    flat_labels = labels.reshape(-1)
    keys = np.round(sharp).astype(np.uint8)
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    pairs = np.unique(np.stack([inverse, flat_labels], axis=1), axis=0)
    parent = list(range(p))

    def find(a):
      while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
      return a

    facing_readable = np.ones(p, bool)
    background_like = set()
    for tile_id in np.unique(pairs[:, 0]):
      labs = pairs[pairs[:, 0] == tile_id, 1]
      if len(labs) < 2:
        continue
      players = sorted({int(l) // A.NUM_ORIENTATIONS for l in labs if l != BACKGROUND})
      if BACKGROUND in labs and players:
        background_like.add(int(tile_id))  # a player tile that also occurs with no player there: drop it
      for a in players[1:]:
        parent[find(a)] = find(players[0])
      for q in players:
        facings = {int(l) % A.NUM_ORIENTATIONS for l in labs if l != BACKGROUND and int(l) // A.NUM_ORIENTATIONS == q}
        if len(facings) > 1:
          facing_readable[q] = False
    same_colour = [(a, b) for a in range(p) for b in range(a + 1, p) if np.array_equal(colors[a], colors[b])]
    for a, b in same_colour:
      parent[find(b)] = find(a)
    groups: dict[int, list[int]] = {}
    for q in range(p):
      groups.setdefault(find(q), []).append(q)

    rng = np.random.default_rng(seed)
    ex_parts, lab_parts = [], []
    for sigma in blur_sigmas:
      tiles = sharp if sigma == 0 else grid.tiles(_blurred(frames, float(sigma))).reshape(sharp.shape)
      rounded = np.round(tiles).astype(np.uint8)
      keep = np.ones(len(tiles), bool)
      if background_like:
        keep &= ~((flat_labels != BACKGROUND) & np.isin(inverse, sorted(background_like)))
      both = np.concatenate([rounded[keep], flat_labels[keep, None].astype(np.int64).view(np.uint8).reshape(-1, 8)],
                            axis=1)
      _, first = np.unique(both, axis=0, return_index=True)
      ex_parts.append(rounded[keep][first])
      lab_parts.append(flat_labels[keep][first])
    exemplars = np.concatenate(ex_parts).astype(np.float32)
    ex_labels = np.concatenate(lab_parts).astype(np.int32)
    chosen = []
    for lab in np.unique(ex_labels):
      idx = np.nonzero(ex_labels == lab)[0]
      cap = max_background if lab == BACKGROUND else max_per_label
      chosen.append(idx if len(idx) <= cap else rng.choice(idx, cap, replace=False))
    chosen_idx = np.sort(np.concatenate(chosen))
    info = dict(fit_frames=int(n), labels_seen=int(len(np.unique(ex_labels))),
                dropped_background_like_tiles=len(background_like))
    return cls(grid=grid, exemplars_KD=exemplars[chosen_idx], labels_K=ex_labels[chosen_idx], num_players=p,
               groups=tuple(tuple(g) for g in sorted(groups.values())), facing_readable=facing_readable,
               max_rms=float(max_rms), name=name, info=info)

  # ------------------------------------------------------------------------------------------------ detecting

  def detect(self, frames: np.ndarray, chunk: int = 4096) -> detector_lib.Detections:
    """Reads frames [..., H, W, 3] (uint8, or float in [-1, 1]). A group of look-alike players is reported under
    its first member (`groups`); the others are never detected."""
    tiles = self.grid.tiles(detector_lib.to_uint8_scale(frames))
    *lead, r, c, d = tiles.shape
    flat = tiles.reshape(-1, d).astype(np.float32)
    ex = self.exemplars_KD
    ex_sq = np.sum(ex.astype(np.float64) ** 2, axis=1)
    best = np.empty(len(flat), np.int64)
    best_d2 = np.empty(len(flat), np.float64)
    for start in range(0, len(flat), chunk):
      part = flat[start:start + chunk].astype(np.float64)
      d2 = np.sum(part**2, axis=1)[:, None] + ex_sq[None, :] - 2.0 * part @ ex.T.astype(np.float64)
      best[start:start + chunk] = np.argmin(d2, axis=1)
      best_d2[start:start + chunk] = d2[np.arange(len(part)), best[start:start + chunk]]
    rms = np.sqrt(np.maximum(best_d2, 0.0) / d).astype(np.float32)
    label = self.labels_K[best]
    representative = np.arange(self.num_players)
    for g in self.groups:
      representative[list(g)] = g[0]
    is_player = label != BACKGROUND
    player = np.where(is_player, representative[np.maximum(label, 0) // A.NUM_ORIENTATIONS], -1)
    facing = np.where(is_player, np.maximum(label, 0) % A.NUM_ORIENTATIONS, -1)
    kind = np.where(is_player, detector_lib.KIND_PLAYER, detector_lib.KIND_FLOOR)
    rejected = rms > self.max_rms
    kind = np.where(rejected, detector_lib.KIND_REJECTED, kind)
    player = np.where(rejected, -1, player)
    facing = np.where(rejected, -1, facing)

    m = int(np.prod(lead, dtype=np.int64))
    player_MC, rms_MC = player.reshape(m, r * c), rms.reshape(m, r * c)
    onehot = player_MC[:, :, None] == np.arange(self.num_players)[None, None, :]
    count = onehot.sum(axis=1).astype(np.int32)
    best_cell = np.argmin(np.where(onehot, rms_MC[:, :, None], np.inf), axis=1)
    present = count > 0
    cells = np.where(present[..., None], np.stack([best_cell // c, best_cell % c], axis=-1), -1)
    facing_MP = np.where(present, np.take_along_axis(facing.reshape(m, -1), best_cell, axis=1), -1)
    centres = np.where(present[..., None], self.grid.centres(cells), np.nan).astype(np.float32)
    per_player = (*lead, self.num_players)
    return detector_lib.Detections(
        kind_NYX=kind.reshape(*lead, r, c).astype(np.int32),
        player_NYX=player.reshape(*lead, r, c).astype(np.int32),
        facing_NYX=facing.reshape(*lead, r, c).astype(np.int32),
        rms_NYX=rms.reshape(*lead, r, c),
        count_NP=count.reshape(per_player),
        cells_NP2=cells.reshape(*per_player, 2).astype(np.int32),
        facing_NP=facing_MP.reshape(per_player).astype(np.int32),
        centres_NP2=centres.reshape(*per_player, 2),
        extra_N=np.zeros(lead, np.int32),
    )

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
    np.savez_compressed(tmp, exemplars=np.round(self.exemplars_KD).astype(np.uint8), labels=self.labels_K,
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
      return cls(grid=Grid(**meta["grid"]), exemplars_KD=z["exemplars"].astype(np.float32),
                 labels_K=z["labels"].astype(np.int32), num_players=int(meta["num_players"]),
                 groups=tuple(tuple(g) for g in meta["groups"]), facing_readable=z["facing_readable"].astype(bool),
                 max_rms=float(meta["max_rms"]), name=meta["name"], info=meta["info"])


# ---------------------------------------------------------------------------------------------- Melting Pot


def meltingpot_grid(world_hw: tuple[int, int], canvas_hw: tuple[int, int], sprite_size: int) -> Grid:
  """The grid of a Melting Pot world view of `world_hw` px placed on the canvas as the dataset places it."""
  from ap_jax.data import meltingpot

  k, (top, left) = meltingpot.canvas_layout(tuple(world_hw), tuple(canvas_hw), sprite_size)
  return Grid(cell_size=sprite_size // k, top=int(top), left=int(left), rows=int(world_hw[0]) // sprite_size,
              cols=int(world_hw[1]) // sprite_size)


def _random_rollouts(substrate: str, num_players: int, canvas_hw: tuple[int, int], seeds: Sequence[int],
                     steps: int) -> list[dict[str, Any]]:
  from ap_jax.data import meltingpot
  from ap_jax.eval import replay

  out = []
  for seed in seeds:
    rng = np.random.default_rng(int(seed))
    actions = meltingpot.sample_actions(rng, steps, num_players, "uniform")
    out.append(replay.replay_meltingpot(substrate, int(seed), actions, canvas_hw))
  return out


def _stack(truths: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, ...]:
  return (np.concatenate([t["frames"] for t in truths]), np.concatenate([t["cells"] for t in truths]),
          np.concatenate([t["orientations"] for t in truths]), np.concatenate([t["visible"] for t in truths]))


def detector_cache_dir() -> str:
  from ap_jax.train import trainer

  return os.path.join(trainer.dataset_cache_dir(), "detectors")


@functools.lru_cache(maxsize=32)
def meltingpot_detector(substrate: str, num_players: int, canvas_hw: tuple[int, int], *, fit_episodes: int = 8,
                        check_episodes: int = 4, steps: int = 40, cache: bool = True) -> TemplateDetector:
  """The detector of `substrate` with `num_players` players on a `canvas_hw` canvas: fitted on `fit_episodes`
  uniformly random rollouts of `steps` steps, its accuracy checked on `check_episodes` others (`info['check']`).
  Cached on disk; needs the meltingpot extra on first use."""
  canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))
  name = f"{substrate}-{num_players}p-{canvas_hw[0]}x{canvas_hw[1]}"
  path = os.path.join(detector_cache_dir(), f"{name}-fit{fit_episodes}x{steps}-v{DETECTOR_VERSION}.npz")
  if cache and os.path.exists(path):
    try:
      return TemplateDetector.load(path)
    except (ValueError, OSError, KeyError) as e:
      log.warning("could not read the cached detector %s (%s): fitting it again", path, e)
  fit = _random_rollouts(substrate, num_players, canvas_hw,
                         [FIT_SEED_OFFSET + 1000 * num_players + i for i in range(fit_episodes)], steps)
  det = TemplateDetector.fit(*_stack(fit), fit[0]["colors"], fit[0]["grid"], name=name)
  check = _random_rollouts(substrate, num_players, canvas_hw,
                           [CHECK_SEED_OFFSET + 1000 * num_players + i for i in range(check_episodes)], steps)
  det.info["check"] = det.accuracy(*_stack(check))
  acc = det.info["check"]["player_accuracy"]
  log.info("fitted the %s detector on %d frames: %d exemplars, accuracy %s on %d held-out player instances%s", name,
           det.info["fit_frames"], len(det.labels_K), "n/a" if acc is None else f"{acc:.4f}",
           det.info["check"]["player_instances"],
           f", look-alike players {det.info['check']['groups']}" if det.info["check"]["groups"] else "")
  if cache:
    det.save(path)
  return det


def _main(argv: Sequence[str] | None = None) -> None:
  import argparse
  import json

  parser = argparse.ArgumentParser(description="Fit Melting Pot detectors and print their accuracy on true frames "
                                   "of held-out random rollouts.")
  parser.add_argument("--substrates", required=True, help="comma-separated substrate names")
  parser.add_argument("--players", type=int, default=None, help="players (default: each substrate's smallest "
                      "count of at least 2)")
  parser.add_argument("--canvas", default="64x64", help="HxW canvas in pixels")
  parser.add_argument("--out", default=None, help="write the table as JSON here")
  args = parser.parse_args(argv)
  from ap_jax.data import meltingpot

  canvas = tuple(int(v) for v in args.canvas.split("x"))
  rows = {}
  print("| substrate | players | cell px | accuracy | false detections | instances | look-alike | facing unreadable |")
  print("|---|---|---|---|---|---|---|---|")
  for substrate in [s for s in args.substrates.split(",") if s]:
    counts = meltingpot.player_counts(substrate)
    n = args.players or next((c for c in counts if c >= 2), counts[0])
    det = meltingpot_detector(substrate, n, canvas)
    chk = det.info["check"]
    rows[substrate] = dict(players=n, cell_size=det.grid.cell_size, **chk)
    acc = "-" if chk["player_accuracy"] is None else f"{chk['player_accuracy']:.4f}"
    print(f"| {substrate} | {n} | {det.grid.cell_size} | {acc} | {chk['false_detections']:.4f} | "
          f"{chk['player_instances']} | {chk['groups'] or '-'} | {chk['facing_unreadable'] or '-'} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(canvas=list(canvas), results=rows), f, indent=2)


if __name__ == "__main__":
  _main()
