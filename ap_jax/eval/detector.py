"""A sprite detector for the built-in game: finds each player (identity, cell, facing) in a frame.

Why template matching per cell: generated frames are blurry and approximately coloured, so exact pixel equality
would miss most players. The built-in game draws every cell as one of a small set of known sprites (floor, wall,
item, and each player colour in each of the four facings; `gridgame.sprite_atlas`). The detector compares each
cell's S x S tile with every sprite and takes the nearest by root-mean-square difference over its S*S*3 values,
rejecting the cell (nothing recognisable) if even the nearest is farther than `max_rms`. Averaging over the tile
makes the decision robust to pixel noise and mild blur; identity comes from the body colour, facing from the
side of the white bar, and both are decided jointly because each (colour, facing) pair is its own template.

Identity is by colour. The templates are built for the episode's player colours (`colors`, [P, 3]), plus every
built-in player colour that is not among them, so a generated player in a colour that belongs to no player of the
episode is counted as `extra` rather than forced onto the nearest real player.

Scope: frames whose cells are aligned to the grid (top-left cell at pixel (0, 0), as the built-in game renders
them). Melting Pot frames use other sprites and a canvas offset: they are read by a detector learned from each
substrate's true frames (`ap_jax.eval.learned_detector`).

Dimension letters: N frames (any leading shape, flattened), Y, X grid cells, S cell size in pixels, K templates,
P players, D = S*S*3 values per tile.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ap_jax import actions as A
from ap_jax.games import gridgame

# Labels of non-player cells in `Detections.kind_NYX`.
KIND_REJECTED, KIND_FLOOR, KIND_WALL, KIND_ITEM, KIND_PLAYER, KIND_EXTRA_PLAYER = -1, 0, 1, 2, 3, 4

# Blur levels (Gaussian sigma, px) at which every sprite is also a template: generated frames are often smoother
# than the game's, and at 8 px cells a Gaussian blur of 1 px made sharp-only templates lose or duplicate 13% of
# players (measured). Matching the blurred variants as the same class keeps such frames readable (100% up to a
# 1.5 px blur; `python -m ap_jax.eval` prints the table).
DEFAULT_BLUR_SIGMAS = (0.0, 0.7, 1.0, 1.4)

# Default rejection threshold: RMS difference (0-255 scale) to the nearest template. The nearest template decides
# what a cell shows; the threshold only refuses tiles that look like no sprite at all (a smear, a half-drawn or
# off-grid player), so that they are not forced onto some player. Pixel noise of standard deviation sigma adds
# about sigma to the RMS; sharp sprites of a player and the floor, wall or item are at least 85 apart, two player
# colours (orange and brown) at least 39, two facings of one colour at least 51.
DEFAULT_MAX_RMS = 48.0


@dataclasses.dataclass
class Detections:
  """What the detector found in a batch of frames (leading dimensions ... as given, here written N).

  kind_NYX      int32 [..., Y, X]   per cell: -1 rejected, 0 floor, 1 wall, 2 item, 3 an episode player,
                                    4 a player colour that is not in the episode
  player_NYX    int32 [..., Y, X]   the player index (into `colors`) shown in the cell, -1 if none
  facing_NYX    int32 [..., Y, X]   that player's facing (0=N, 1=E, 2=S, 3=W), -1 if none
  rms_NYX       float32 [..., Y, X] RMS difference to the nearest sprite (0-255 scale)
  count_NP      int32 [..., P]      cells showing player p: subject preservation asks for exactly 1
  cells_NP2     int32 [..., P, 2]   (y, x) of player p's best-matching cell, -1 if absent
  facing_NP     int32 [..., P]      facing of player p in that cell, -1 if absent
  centres_NP2   float32 [..., P, 2] pixel centre (y, x) of that cell, (cell + 0.5) * S, NaN if absent
  extra_N       int32 [...]         cells showing a player colour that belongs to no player of the episode
  """

  kind_NYX: np.ndarray
  player_NYX: np.ndarray
  facing_NYX: np.ndarray
  rms_NYX: np.ndarray
  count_NP: np.ndarray
  cells_NP2: np.ndarray
  facing_NP: np.ndarray
  centres_NP2: np.ndarray
  extra_N: np.ndarray


def to_uint8_scale(frames: np.ndarray) -> np.ndarray:
  """float32 frames on the 0-255 scale, from uint8 [0, 255] or floating point in [-1, 1] (the model's range)."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    return frames.astype(np.float32)
  if not np.issubdtype(frames.dtype, np.floating):
    raise ValueError(f"frames have dtype {frames.dtype}, expected uint8 in [0, 255] or floating point in [-1, 1]")
  return ((frames.astype(np.float32) + 1.0) * 127.5).clip(0.0, 255.0)


def _sprite_masks(cell_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(body_FSS, bar_FSS) bool: which pixels of a player sprite facing f are body colour and which the white bar."""
  atlas = gridgame.sprite_atlas(cell_size, 1)
  sprites = atlas[gridgame.SPRITE_PLAYER0:gridgame.SPRITE_PLAYER0 + A.NUM_ORIENTATIONS]
  body = np.all(sprites == gridgame.PLAYER_COLORS[0], axis=-1)
  bar = np.all(sprites == np.asarray(gridgame.FACING_COLOR, np.uint8), axis=-1)
  return body, bar


def _blurred(sprites_KSS3: np.ndarray, sigma: float) -> np.ndarray:
  """Each sprite blurred by a Gaussian of `sigma` px as if drawn among floor cells, cropped back to S x S."""
  if sigma == 0:
    return sprites_KSS3
  from scipy import ndimage

  k, s = sprites_KSS3.shape[:2]
  canvas = np.broadcast_to(np.asarray(gridgame.FLOOR_COLOR, np.float32), (k, 3 * s, 3 * s, 3)).copy()
  canvas[:, s:2 * s, s:2 * s] = sprites_KSS3
  return ndimage.gaussian_filter(canvas, (0, sigma, sigma, 0), mode="nearest")[:, s:2 * s, s:2 * s]


@functools.lru_cache(maxsize=64)
def _templates_cached(cell_size: int, colors_key: bytes, blur_sigmas: tuple[float, ...]
                      ) -> tuple[np.ndarray, np.ndarray, int]:
  colors = np.frombuffer(colors_key, np.uint8).reshape(-1, 3)
  atlas = gridgame.sprite_atlas(cell_size, 1)
  background = atlas[:gridgame.SPRITE_PLAYER0].astype(np.float32)  # floor, wall, item
  extras = [c for c in gridgame.PLAYER_COLORS if not np.any(np.all(colors == c, axis=-1))]
  all_colors = np.concatenate([colors, np.asarray(extras, np.uint8).reshape(-1, 3)]).astype(np.float32)
  body, bar = _sprite_masks(cell_size)
  floor = np.asarray(gridgame.FLOOR_COLOR, np.float32)
  facing_color = np.asarray(gridgame.FACING_COLOR, np.float32)
  # [colours, facings, S, S, 3]: floor everywhere, then the body colour, then the bar.
  players = np.broadcast_to(floor, (len(all_colors), A.NUM_ORIENTATIONS, cell_size, cell_size, 3)).copy()
  players = np.where(body[None, :, :, :, None], all_colors[:, None, None, None, :], players)
  players = np.where(bar[None, :, :, :, None], facing_color, players)
  sprites = np.concatenate([background, players.reshape(-1, cell_size, cell_size, 3)])
  variants = np.stack([_blurred(sprites, sigma) for sigma in blur_sigmas], axis=1)  # [K, V, S, S, 3]
  return variants.reshape(len(sprites), len(blur_sigmas), -1).astype(np.float32), all_colors, len(colors)


def templates(colors: np.ndarray, cell_size: int, blur_sigmas: tuple[float, ...] = DEFAULT_BLUR_SIGMAS
              ) -> tuple[np.ndarray, np.ndarray, int]:
  """(templates_KVD float32, colours of all player templates [C, 3], number of episode players P).

  Template k: 0 floor, 1 wall, 2 item, then 3 + 4 * c + f for player colour c (the episode's P colours first,
  then the built-in colours not among them) facing f. Variant v is the sprite blurred by blur_sigmas[v] (0: sharp).
  Built from the game's own sprite masks, so for the built-in colours the sharp variants equal
  `gridgame.sprite_atlas` exactly.
  """
  colors = np.asarray(colors)
  if colors.ndim != 2 or colors.shape[1] != 3 or not 1 <= len(colors) <= A.MAX_PLAYERS:
    raise ValueError(f"colors has shape {colors.shape}, expected [P, 3] with 1 <= P <= {A.MAX_PLAYERS}")
  if len({tuple(c) for c in colors.tolist()}) != len(colors):
    raise ValueError(f"colors {colors.tolist()} repeat a colour: identity is by colour, so each must differ")
  return _templates_cached(int(cell_size), np.ascontiguousarray(colors, np.uint8).tobytes(),
                           tuple(float(b) for b in blur_sigmas))


def detect(frames: np.ndarray, colors: np.ndarray, cell_size: int, *, max_rms: float = DEFAULT_MAX_RMS,
           blur_sigmas: tuple[float, ...] = DEFAULT_BLUR_SIGMAS) -> Detections:
  """Detects the players in built-in-game frames [..., H, W, 3] (uint8, or float in [-1, 1]).

  Each S x S cell is matched to its nearest sprite template (see the module docstring). Player p is "detected"
  in every cell whose nearest template is one of p's four facings; `count_NP` counts those cells, and `cells_NP2`
  / `facing_NP` describe the best-matching one (the cell with the smallest RMS difference).
  """
  frames_f = to_uint8_scale(frames)
  if frames_f.ndim < 3 or frames_f.shape[-1] != 3:
    raise ValueError(f"frames have shape {frames_f.shape}, expected [..., H, W, 3]")
  s = int(cell_size)
  *lead, h, w, _ = frames_f.shape
  if h % s or w % s:
    raise ValueError(f"frames are {h} x {w} px, expected multiples of cell_size = {s}")
  ny, nx = h // s, w // s
  templates_KVD, _, num_players = templates(colors, s, blur_sigmas)
  num_variants = templates_KVD.shape[1]
  n = int(np.prod(lead, dtype=np.int64))
  tiles = frames_f.reshape(n, ny, s, nx, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n * ny * nx, -1)
  # Squared distances ||a||^2 + ||b||^2 - 2 a.b, in float64 so that exact matches come out as exactly 0.
  tiles64 = tiles.astype(np.float64)
  templ64 = templates_KVD.reshape(-1, tiles.shape[1]).astype(np.float64)
  dist2 = (np.sum(tiles64**2, axis=1)[:, None] + np.sum(templ64**2, axis=1)[None, :] - 2.0 * tiles64 @ templ64.T)
  best_variant = np.argmin(dist2, axis=1)
  best = best_variant // num_variants  # the sprite, whichever blur matched best
  rms = np.sqrt(np.maximum(dist2[np.arange(len(best)), best_variant], 0.0) / tiles.shape[1]).astype(np.float32)

  is_player = best >= gridgame.SPRITE_PLAYER0
  colour_idx = np.where(is_player, (best - gridgame.SPRITE_PLAYER0) // A.NUM_ORIENTATIONS, -1)
  facing = np.where(is_player, (best - gridgame.SPRITE_PLAYER0) % A.NUM_ORIENTATIONS, -1)
  kind = np.where(is_player, np.where(colour_idx < num_players, KIND_PLAYER, KIND_EXTRA_PLAYER), best)
  rejected = rms > max_rms
  kind = np.where(rejected, KIND_REJECTED, kind)
  player = np.where(kind == KIND_PLAYER, colour_idx, -1)
  facing = np.where(kind == KIND_PLAYER, facing, -1)

  extra_N = np.sum(kind.reshape(n, -1) == KIND_EXTRA_PLAYER, axis=1).astype(np.int32)
  return from_cells(kind, player, facing, rms, tuple(lead), (ny, nx), num_players,
                    lambda cells: (cells + 0.5) * s, extra_N.reshape(lead))


def from_cells(kind: np.ndarray, player: np.ndarray, facing: np.ndarray, rms: np.ndarray, lead: tuple[int, ...],
               grid_yx: tuple[int, int], num_players: int, centres, extra_N: np.ndarray) -> Detections:
  """`Detections` from per-cell readings (kind, player, facing, rms; any shape holding lead x Y x X values): the
  per-player counts, best-matching cell (smallest rms), its facing and pixel centre (`centres(cells [..., 2])`)."""
  ny, nx = grid_yx
  n = int(np.prod(lead, dtype=np.int64))
  player_NC = player.reshape(n, ny * nx)
  rms_NC = rms.reshape(n, ny * nx)
  onehot_NCP = player_NC[:, :, None] == np.arange(num_players)[None, None, :]
  count_NP = onehot_NCP.sum(axis=1).astype(np.int32)
  best_cell_NP = np.argmin(np.where(onehot_NCP, rms_NC[:, :, None], np.inf), axis=1)
  present = count_NP > 0
  cells_NP2 = np.where(present[..., None], np.stack([best_cell_NP // nx, best_cell_NP % nx], axis=-1), -1)
  facing_NP = np.where(present, np.take_along_axis(facing.reshape(n, -1), best_cell_NP, axis=1), -1)
  centres_NP2 = np.where(present[..., None], centres(cells_NP2), np.nan).astype(np.float32)
  grid = (*lead, ny, nx)
  per_player = (*lead, num_players)
  return Detections(
      kind_NYX=kind.reshape(grid).astype(np.int32),
      player_NYX=player.reshape(grid).astype(np.int32),
      facing_NYX=facing.reshape(grid).astype(np.int32),
      rms_NYX=rms.reshape(grid),
      count_NP=count_NP.reshape(per_player),
      cells_NP2=cells_NP2.reshape(*per_player, 2).astype(np.int32),
      facing_NP=facing_NP.reshape(per_player).astype(np.int32),
      centres_NP2=centres_NP2.reshape(*per_player, 2),
      extra_N=np.asarray(extra_N, np.int32).reshape(lead),
  )


def detector_accuracy(frames: np.ndarray, cells: np.ndarray, orientations: np.ndarray, colors: np.ndarray,
                      cell_size: int, *, max_rms: float = DEFAULT_MAX_RMS,
                      blur_sigmas: tuple[float, ...] = DEFAULT_BLUR_SIGMAS) -> dict[str, float]:
  """How well the detector reads frames whose true state is known: frames [..., H, W, 3], cells [..., P, 2]
  (y, x), orientations [..., P].

  Returns {'player_accuracy': fraction of (frame, player) detected exactly once, in its true cell, with its true
  facing; 'false_detections': fraction of frames with a player detected in a cell where no player is (including
  colours of no episode player); 'player_instances': how many (frame, player) pairs were checked}. On true-game
  frames the first must be 1.0 and the second 0.0; below 0.99 the detector is not good enough to judge a model.
  """
  det = detect(frames, colors, cell_size, max_rms=max_rms, blur_sigmas=blur_sigmas)
  cells = np.asarray(cells)
  orientations = np.asarray(orientations)
  if det.cells_NP2.shape != cells.shape or det.facing_NP.shape != orientations.shape:
    raise ValueError(f"cells {cells.shape} / orientations {orientations.shape} do not match the frames and colours: "
                     f"expected {det.cells_NP2.shape} / {det.facing_NP.shape}")
  correct = ((det.count_NP == 1) & np.all(det.cells_NP2 == cells, axis=-1) & (det.facing_NP == orientations))
  # Cells where a player is detected but none is: the detected-player mask minus the true-player cells.
  ny, nx = det.player_NYX.shape[-2:]
  flat = (cells[..., 0] * nx + cells[..., 1]).reshape(-1, cells.shape[-2])
  occupied = np.zeros((flat.shape[0], ny * nx), bool)
  np.put_along_axis(occupied, flat, True, axis=1)
  detected = (det.kind_NYX >= KIND_PLAYER).reshape(flat.shape[0], -1)
  false_frames = np.any(detected & ~occupied, axis=1)
  return {
      "player_accuracy": float(correct.mean()),
      "false_detections": float(false_frames.mean()),
      "player_instances": int(correct.size),
  }


# ------------------------------------------------------------------------------------------------------------
# Benchmark: accuracy on real frames, clean and perturbed.

PERTURBATIONS = ("clean", "noise16", "noise32", "noise48", "blur0.7", "blur1.0", "blur1.5", "blur1.0+noise16")


def perturb(frames: np.ndarray, name: str, rng: np.random.Generator) -> np.ndarray:
  """uint8 frames [..., H, W, 3] with a named perturbation: 'noiseS' adds Gaussian pixel noise of standard deviation
  S (0-255 scale), 'blurB' a Gaussian blur of B px over H and W, 'blurB+noiseS' both; rounded and clipped."""
  from scipy import ndimage

  x = np.asarray(frames, np.float32)
  for part in name.split("+"):
    if part == "clean":
      continue
    if part.startswith("noise"):
      x = x + rng.normal(0.0, float(part[len("noise"):]), x.shape)
    elif part.startswith("blur"):
      sigma = float(part[len("blur"):])
      x = ndimage.gaussian_filter(x, (0,) * (x.ndim - 3) + (sigma, sigma, 0))
    else:
      raise ValueError(f"perturbation {name!r}: unknown part {part!r}, expected clean, noiseS or blurB joined by '+'")
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _main(argv=None) -> None:
  import argparse
  import json

  parser = argparse.ArgumentParser(description="Detector accuracy on real built-in-game frames, clean and perturbed.")
  parser.add_argument("--episodes", type=int, default=64)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--players", default="1-8", help="MIN-MAX players per episode")
  parser.add_argument("--seed", type=int, default=10_000, help="first episode seed")
  parser.add_argument("--out", default=None, help="write the table as JSON here")
  args = parser.parse_args(argv)
  lo, hi = (int(v) for v in args.players.split("-"))
  config = gridgame.GameConfig()
  episodes = gridgame.generate_episodes(list(range(args.seed, args.seed + args.episodes)), config=config,
                                        steps=args.steps, players=(lo, hi))
  rng = np.random.default_rng(0)
  rows = {}
  print("| frames | player accuracy | frames with false detections | player instances |\n|---|---|---|---|")
  for name in PERTURBATIONS:
    correct = instances = false = 0.0
    for ep in episodes:
      cells = (ep["positions"] // config.cell_size).astype(np.int32)
      acc = detector_accuracy(perturb(ep["frames"], name, rng), cells, ep["orientations"], ep["colors"],
                              config.cell_size)
      correct += acc["player_accuracy"] * acc["player_instances"]
      instances += acc["player_instances"]
      false += acc["false_detections"] * len(ep["frames"])
    rows[name] = {"player_accuracy": correct / instances, "false_detections": false / sum(len(e["frames"]) for e in
                                                                                          episodes),
                  "player_instances": int(instances)}
    print(f"| {name} | {rows[name]['player_accuracy']:.4f} | {rows[name]['false_detections']:.4f} | {int(instances)} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(vars(args), results=rows), f, indent=2)
