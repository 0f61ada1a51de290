"""Metrics of a generated rollout against the true game, and their aggregation into a results dict (drawn as a
table by `ap_jax.eval.report.markdown_table`).

A rollout of T steps is T+1 generated frames `gen_frames_THWC` (index 0 is the conditioning frame the model was
given, indices 1..T are generated) and the true game's replay of the same actions from the same seed (`truth`, as
`ap_jax.eval.replay` returns it). Every metric is scored per rollout step t = 1..T (and per player p where it is a
per-player metric); arrays of scores have shape [T, P] or [T], row t-1 holding step t. Aggregates pool all
(player, step) instances (micro average), so an episode with more players weighs more, as in the paper's
per-player accounting.

Players in generated frames are found by `ap_jax.eval.detector.detect` (built-in game) or by a detector learned from
the substrate's true frames (`ap_jax.eval.learned_detector`, Melting Pot), which also says which players cannot be
told apart; Melting Pot players that cannot be judged (removed from the board, look-alikes) are left out (NaN).

Metric definitions (these are the README's):
- movement_accuracy: the fraction of (player, step) instances in which the generated frames show the effect that
  the true game shows. For player p at step t the generated effect is read from frames t-1 and t: the change in
  the detected cell and the change in the detected facing (mod 4). It is correct iff p is detected exactly once in
  both generated frames and both changes equal the true game's (so: moved to the same neighbouring cell, turned to
  the same facing, or stayed, including staying when the true game blocked the move). The effect is relative, so
  one early mistake does not fail every later step.
- state_accuracy: the fraction of (player, step) instances in which p is detected exactly once in generated frame
  t, in its true cell, with its true facing (absolute; drift accumulates). Reported beside movement accuracy.
- subject_preservation: the fraction of (player, step) instances in which p is detected exactly once in generated
  frame t (by its colour, which is its identity): not lost, not duplicated, not turned into another colour. Two
  players that swap sprites are each still detected once; that failure shows in movement accuracy instead.
- interact_accuracy: over the (player, step) instances in which the player's action is INTERACT and the true game
  collects an item by it (true frame t-1 shows an item, with no player over it, in the cell the player faces), the
  fraction in which the generated frames show an item in that cell at t-1 and none at t. None when no rollout
  has such an instance.
- extra_players: the fraction of generated frames (steps) that show a player in a colour of no player of the
  episode.
- tracking_error_px: the Euclidean distance in pixels between the model's predicted coordinates of player p after
  step t and p's true pixel centre, averaged over (player, step) instances.
- psnr: per generated frame t, 10 log10(255^2 / MSE) over all pixels and channels on the 0-255 scale, capped at
  `PSNR_CAP_DB` (identical frames), averaged over frames.
- ssim: per generated frame t, the SSIM of Wang et al. (2004) with an 11 x 11 Gaussian window (sigma 1.5),
  K1 = 0.01, K2 = 0.03, L = 255, computed on each RGB channel over the window positions that lie fully inside the
  frame ('valid', as the reference MATLAB code), averaged over positions and channels, then over frames.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from ap_jax import actions as A
from ap_jax.eval import detector as detector_lib

PSNR_CAP_DB = 100.0
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, SSIM_L = 11, 1.5, 0.01, 0.03, 255.0

PER_PLAYER_METRICS = ("movement_accuracy", "state_accuracy", "subject_preservation", "tracking_error_px",
                      "interact_accuracy")
PER_FRAME_METRICS = ("extra_players", "psnr", "ssim")
METRICS = PER_PLAYER_METRICS + PER_FRAME_METRICS


# ------------------------------------------------------------------------------------------------------------
# Per-rollout scores.


def movement_accuracy(det: detector_lib.Detections, true_cells_TP2: np.ndarray, true_orientations_TP: np.ndarray
                      ) -> np.ndarray:
  """bool [T, P]: did generated step t (frames t-1 -> t) show player p's true effect? See the module docstring.

  `det` holds detections of the T+1 generated frames; true_cells [T+1, P, 2] and true_orientations [T+1, P].
  """
  once = det.count_NP == 1
  moved_gen = det.cells_NP2[1:] - det.cells_NP2[:-1]
  moved_true = true_cells_TP2[1:] - true_cells_TP2[:-1]
  turned_gen = (det.facing_NP[1:] - det.facing_NP[:-1]) % A.NUM_ORIENTATIONS
  turned_true = (true_orientations_TP[1:] - true_orientations_TP[:-1]) % A.NUM_ORIENTATIONS
  return once[1:] & once[:-1] & np.all(moved_gen == moved_true, axis=-1) & (turned_gen == turned_true)


def state_accuracy(det: detector_lib.Detections, true_cells_TP2: np.ndarray, true_orientations_TP: np.ndarray
                   ) -> np.ndarray:
  """bool [T, P]: is player p detected exactly once in generated frame t, in its true cell with its true facing?"""
  return ((det.count_NP[1:] == 1) & np.all(det.cells_NP2[1:] == true_cells_TP2[1:], axis=-1)
          & (det.facing_NP[1:] == true_orientations_TP[1:]))


def subject_preservation(det: detector_lib.Detections) -> np.ndarray:
  """bool [T, P]: is player p detected exactly once (by its own colour) in generated frame t, t = 1..T?"""
  return det.count_NP[1:] == 1


def interact_accuracy(det: detector_lib.Detections, truth: Mapping[str, Any]) -> np.ndarray:
  """float32 [T, P]: 1.0 / 0.0 where player p collects an item with INTERACT at step t in the true game and the
  generated frames show (1.0) or do not show (0.0) that item vanish; NaN where that is not the case (not scored)."""
  actions_TP = np.asarray(truth["actions"])
  cells, facing, items = np.asarray(truth["cells"]), np.asarray(truth["orientations"]), np.asarray(truth["items"])
  ny, nx = items.shape[1:]
  front = cells[:-1] + A.ORIENTATION_DELTAS[facing[:-1]]  # [T, P, 2]
  inside = np.all((front >= 0) & (front < np.array([ny, nx])), axis=-1)
  fy, fx = np.clip(front[..., 0], 0, ny - 1), np.clip(front[..., 1], 0, nx - 1)
  steps = np.arange(actions_TP.shape[0])[:, None]
  # Scored only where true frame t-1 shows the item: a player standing on an item hides it.
  covered = np.any(np.all(front[:, :, None, :] == cells[:-1, None, :, :], axis=-1), axis=-1)
  collects = (actions_TP == A.INTERACT) & inside & items[steps, fy, fx] & ~covered
  shown_before = det.kind_NYX[steps, fy, fx] == detector_lib.KIND_ITEM
  shown_after = det.kind_NYX[steps + 1, fy, fx] == detector_lib.KIND_ITEM
  return np.where(collects, (shown_before & ~shown_after).astype(np.float32), np.nan).astype(np.float32)


def tracking_error_px(pred_positions: np.ndarray, true_positions_TP2: np.ndarray) -> np.ndarray:
  """float32 [T, P]: Euclidean pixel distance between predicted and true (y, x) pixel centres after step t.

  `pred_positions` is [T+1, P, 2] (index 0, the given initial position, is dropped) or [T, P, 2] (steps 1..T);
  `true_positions_TP2` is [T+1, P, 2].
  """
  pred = np.asarray(pred_positions, np.float32)
  true = np.asarray(true_positions_TP2, np.float32)[1:]
  if pred.shape[0] == true.shape[0] + 1:
    pred = pred[1:]
  if pred.shape != true.shape:
    raise ValueError(f"predicted positions have shape {pred.shape}, expected {true.shape} (steps 1..T) or "
                     f"{(true.shape[0] + 1, *true.shape[1:])} (with the initial positions)")
  return np.linalg.norm(pred - true, axis=-1).astype(np.float32)


def psnr(gen_frames: np.ndarray, true_frames: np.ndarray) -> np.ndarray:
  """float32 [...]: PSNR in dB of each frame [..., H, W, 3] on the 0-255 scale, capped at PSNR_CAP_DB."""
  gen, true = _pair(gen_frames, true_frames)
  mse = np.mean((gen.astype(np.float64) - true) ** 2, axis=(-3, -2, -1))
  with np.errstate(divide="ignore"):
    db = 10.0 * np.log10(SSIM_L**2 / mse)
  return np.minimum(db, PSNR_CAP_DB).astype(np.float32)


def _gaussian_window() -> np.ndarray:
  r = SSIM_WINDOW // 2
  g = np.exp(-0.5 * (np.arange(-r, r + 1) / SSIM_SIGMA) ** 2)
  return g / g.sum()


def _filter_valid(x_NHWC: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Separable Gaussian filter over H and W, keeping only positions where the window lies inside the frame."""
  k = len(g)
  x = np.lib.stride_tricks.sliding_window_view(x_NHWC, k, axis=1) @ g  # [N, H-k+1, W, C]
  return np.lib.stride_tricks.sliding_window_view(x, k, axis=2) @ g  # [N, H-k+1, W-k+1, C]


def ssim(gen_frames: np.ndarray, true_frames: np.ndarray) -> np.ndarray:
  """float32 [...]: SSIM of each frame [..., H, W, 3] (definition in the module docstring); 1.0 iff identical."""
  gen, true = _pair(gen_frames, true_frames)
  *lead, h, w, c = gen.shape
  if h < SSIM_WINDOW or w < SSIM_WINDOW:
    raise ValueError(f"frames are {h} x {w} px, expected at least {SSIM_WINDOW} x {SSIM_WINDOW} for SSIM's window")
  x = gen.reshape(-1, h, w, c).astype(np.float64)
  y = true.reshape(-1, h, w, c).astype(np.float64)
  g = _gaussian_window()
  mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
  var_x = _filter_valid(x * x, g) - mu_x**2
  var_y = _filter_valid(y * y, g) - mu_y**2
  cov = _filter_valid(x * y, g) - mu_x * mu_y
  c1, c2 = (SSIM_K1 * SSIM_L) ** 2, (SSIM_K2 * SSIM_L) ** 2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
  return ssim_map.mean(axis=(1, 2, 3)).reshape(lead).astype(np.float32)


def _pair(gen_frames: np.ndarray, true_frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  gen, true = detector_lib.to_uint8_scale(gen_frames), detector_lib.to_uint8_scale(true_frames)
  if gen.shape != true.shape or gen.shape[-1:] != (3,):
    raise ValueError(f"generated frames {gen.shape} and true frames {true.shape} differ, expected both [..., H, W, 3]")
  return gen, true


def truth_detector(truth: Mapping[str, Any]):
  """The learned detector (`learned_detector.meltingpot_detector`) that reads frames of this Melting Pot truth, or
  None for the built-in game (whose detector is `detector.detect`)."""
  source = truth.get("source")
  if source == "builtin":
    return None
  if source == "meltingpot":
    from ap_jax.eval import learned_detector

    frames = np.asarray(truth["frames"])
    return learned_detector.meltingpot_detector(str(truth["substrate"]), int(np.asarray(truth["cells"]).shape[1]),
                                                tuple(int(v) for v in frames.shape[1:3]))
  raise ValueError(f"truth comes from source {source!r}, expected 'builtin' or 'meltingpot'")


def _masked(values: np.ndarray, scored: np.ndarray) -> np.ndarray:
  """float32 copy of `values` with NaN (not scored) where `scored` is False."""
  return np.where(scored, np.asarray(values, np.float32), np.nan).astype(np.float32)


def score_rollout(gen_frames_THWC: np.ndarray, truth: Mapping[str, Any], *,
                  pred_positions: np.ndarray | None = None,
                  max_rms: float = detector_lib.DEFAULT_MAX_RMS, reader=None) -> dict[str, Any]:
  """Scores one generated rollout against the true game's replay of its actions.

  gen_frames_THWC: [T+1, H, W, 3], uint8 or float in [-1, 1]; index 0 is the conditioning frame. `truth`: the
  dict of `replay.replay_builtin` or `replay.replay_meltingpot` for the same T actions. `pred_positions`: the
  model's predicted pixel centres [T+1 or T, P, 2], if it predicts them. `reader`: the Melting Pot detector to use
  (default `truth_detector(truth)`).
  Returns per-step scores: num_players, source, substrate, and movement_accuracy / state_accuracy /
  subject_preservation ([T, P]), tracking_error_px (float [T, P] or None), interact_accuracy (float [T, P], NaN
  where not scored; None for Melting Pot), extra_players (bool [T]; None for Melting Pot), psnr and ssim
  (float [T]). Built-in game: every (player, step) is scored (bool arrays). Melting Pot: float arrays with NaN
  where a player is not scored: removed from the board (truth `visible`) at either frame of the step, or drawn like
  another player (the detector's `groups`), or not read in the true frame itself (`unreadable_in_truth` counts
  these instances: e.g. an avatar under another player's beam); a player whose facings look alike is scored on
  its change of cell.
  """
  source = truth.get("source")
  true_frames = np.asarray(truth["frames"])
  gen = np.asarray(gen_frames_THWC)
  if gen.shape != true_frames.shape:
    raise ValueError(f"generated frames have shape {gen.shape}, expected the true frames' {true_frames.shape} "
                     "([T+1, H, W, 3] with the conditioning frame first)")
  cells = np.asarray(truth["cells"])
  orientations = np.asarray(truth["orientations"])
  base = {"num_players": int(cells.shape[1]), "source": str(source), "substrate": str(truth.get("substrate", "")),
          "psnr": psnr(gen[1:], true_frames[1:]), "ssim": ssim(gen[1:], true_frames[1:])}
  tracking = (None if pred_positions is None else tracking_error_px(pred_positions, np.asarray(truth["positions"])))
  if source == "builtin":
    det = detector_lib.detect(gen, truth["colors"], int(truth["cell_size"]), max_rms=max_rms)
    return dict(base,
                movement_accuracy=movement_accuracy(det, cells, orientations),
                state_accuracy=state_accuracy(det, cells, orientations),
                subject_preservation=subject_preservation(det),
                tracking_error_px=tracking,
                interact_accuracy=interact_accuracy(det, truth),
                extra_players=det.extra_N[1:] > 0)
  reader = reader if reader is not None else truth_detector(truth)
  det = reader.detect(gen)
  # A player is judged only where the true frame shows it readably: drawn (not removed), and read by the detector
  # in its true cell (not hidden under another player's beam, say). Players of other colours than the detector
  # was fitted on (substrates that colour players per episode) cannot be read at all.
  true_det = reader.detect(true_frames)
  readable = (np.asarray(truth["visible"], bool) & (true_det.count_NP == 1)
              & np.all(true_det.cells_NP2 == cells, axis=-1))
  same_colours = np.array_equal(np.asarray(truth["colors"], np.uint8), reader.colors)
  identifiable = reader.identifiable[None, :] & same_colours
  # Facing that cannot be read counts as read correctly: such a player is judged on its change of cell alone.
  unreadable = ~reader.facing_readable[None, :]
  facing_det = np.where(unreadable, orientations, det.facing_NP)
  det_read = dataclasses.replace(det, facing_NP=facing_det)
  step_scored = readable[1:] & readable[:-1] & identifiable
  frame_scored = readable[1:] & identifiable
  return dict(base,
              unreadable_in_truth=int(np.sum(np.asarray(truth["visible"], bool) & ~readable)),
              movement_accuracy=_masked(movement_accuracy(det_read, cells, orientations), step_scored),
              state_accuracy=_masked(state_accuracy(det_read, cells, orientations), frame_scored),
              subject_preservation=_masked(subject_preservation(det), frame_scored),
              tracking_error_px=None if tracking is None else _masked(tracking, readable[1:]),
              interact_accuracy=None,
              extra_players=None)


# ------------------------------------------------------------------------------------------------------------
# Aggregation and reporting.


def _pool(scores: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
  """Micro averages over every scored (player, step) or frame instance in `scores` (None where nothing was
  measured; NaN marks an instance a metric does not score)."""
  out: dict[str, float | None] = {}
  for name in METRICS:
    parts = [np.asarray(s[name], np.float64).ravel() for s in scores if s.get(name) is not None]
    values = np.concatenate(parts) if parts else np.zeros((0,))
    values = values[~np.isnan(values)]
    out[name] = float(values.mean()) if values.size else None
  out["player_steps"] = int(sum(np.sum(~np.isnan(np.asarray(s["subject_preservation"], np.float64)))
                                for s in scores))
  out["interact_instances"] = int(sum(np.sum(~np.isnan(s["interact_accuracy"])) for s in scores
                                      if s.get("interact_accuracy") is not None))
  return out


def _steps_slice(score: Mapping[str, Any], t: int) -> dict[str, Any]:
  return {k: (v[t - 1:t] if isinstance(v, np.ndarray) and v.ndim >= 1 else v) for k, v in score.items()}


def aggregate(scores: Sequence[Mapping[str, Any]], *, detector: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
  """Aggregates `score_rollout` outputs into the results dict that `results.json` holds.

  Top level: each metric pooled over every rollout, `episodes`, `player_steps` (scored instances), and `detector`
  (its accuracy on real frames, if given). `by_substrate[name]`: the same over rollouts of one Melting Pot
  substrate or built-in layout. `by_players[n]`: over rollouts with n players. `by_step[t]`: over rollout step t
  of every rollout that has one. Keys of the breakdowns are strings (JSON object keys).
  """
  if not scores:
    raise ValueError("no rollouts to aggregate, expected at least one score_rollout result")
  results: dict[str, Any] = dict(_pool(scores), episodes=len(scores),
                                 sources=sorted({str(s.get("source")) for s in scores}))
  if detector is not None:
    results["detector"] = dict(detector)
  substrates = sorted({s.get("substrate", "") for s in scores} - {""})
  if substrates:
    results["by_substrate"] = {
        name: dict(_pool([s for s in scores if s.get("substrate") == name]),
                   episodes=sum(s.get("substrate") == name for s in scores))
        for name in substrates
    }
  results["by_players"] = {
      str(n): dict(_pool([s for s in scores if s["num_players"] == n]),
                   episodes=sum(s["num_players"] == n for s in scores))
      for n in sorted({s["num_players"] for s in scores})
  }
  max_steps = max(len(s["psnr"]) for s in scores)
  results["by_step"] = {
      str(t): _pool([_steps_slice(s, t) for s in scores if len(s["psnr"]) >= t]) for t in range(1, max_steps + 1)
  }
  return results
