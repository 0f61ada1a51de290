"""A case's rollout as an annotated video: the generated frames (with the model's predicted positions, the given
actions and a green/red mark per player for whether each step carried its action out) beside the true game's."""

from __future__ import annotations

from typing import Any

import numpy as np

from ap_jax import actions as A
from ap_jax import viz
from ap_jax.eval import cases as cases_lib
from ap_jax.eval import detector, metrics


def _detected_track(det, player: int, fallback: np.ndarray, fallback_facing: np.ndarray):
  """Per-frame (centre, facing) of `player` as detected, holding the last detection where it is missing."""
  centres, facings = [], []
  last_c, last_f = fallback, int(fallback_facing)
  for t in range(det.count_NP.shape[0]):
    if det.count_NP[t, player] >= 1:
      last_c, last_f = det.centres_NP2[t, player], int(det.facing_NP[t, player])
    centres.append(last_c)
    facings.append(last_f)
  return np.stack(centres), np.array(facings)


def render(case: cases_lib.Case, frames: np.ndarray, positions: np.ndarray | None, *, scale: int = 4
           ) -> tuple[list[np.ndarray], dict[str, Any]]:
  """Annotated video frames: generated (left, with the model's predicted positions, the given actions and a
  green/red mark per player for whether the generated step carried the action out) beside the true game (right)
  when there is one. Returns (frames, per-step records for the JSON file)."""
  t_steps, p = case.actions.shape
  ok = None
  orient = np.zeros((t_steps + 1, p), np.int32)
  det = None
  if case.truth is not None and case.truth.get("source") == "builtin":
    score = metrics.score_rollout(frames, case.truth, pred_positions=positions)
    ok = score["movement_accuracy"]  # [T, P]: step t+1 = the action taken from frame t
    det = detector.detect(frames, case.colors, int(case.truth["cell_size"]))
  shown_positions = positions
  if det is not None:
    tracks = [_detected_track(det, q, case.positions[q], case.truth["orientations"][0, q]) for q in range(p)]
    orient = np.stack([f for _, f in tracks], axis=1)
    if shown_positions is None:  # the global baseline predicts no positions: show where the detector sees them
      shown_positions = np.stack([c for c, _ in tracks], axis=1)
  elif case.truth is not None:
    orient = np.asarray(case.truth["orientations"])[:t_steps + 1]
  if shown_positions is None:
    shown_positions = np.broadcast_to(case.positions, (t_steps + 1, p, 2))
  video, records = [], []
  for t in range(t_steps + 1):
    acts = case.actions[t] if t < t_steps else None
    marks = None if (ok is None or t >= t_steps) else [bool(v) for v in ok[t]]
    left = viz.annotate_frame(frames[t], shown_positions[t], orient[t], case.colors, acts, scale=scale,
                              title=f"model t={t}", ok=marks)
    panel = left
    if case.truth is not None:
      right = viz.annotate_frame(case.truth["frames"][t], case.truth["positions"][t], case.truth["orientations"][t],
                                 case.colors, acts, scale=scale, title=f"true game t={t}")
      gap = np.zeros((left.shape[0], 8, 3), np.uint8)
      panel = np.concatenate([left, gap, right], axis=1)
    video.append(panel)
    records.append(dict(
        step=t,
        predicted_positions=None if positions is None else np.round(positions[t], 3).tolist(),
        true_positions=None if case.truth is None else np.asarray(case.truth["positions"][t]).tolist(),
        actions=None if acts is None else [A.ACTION_NAMES[int(a)] for a in acts],
        carried_out=marks))
  return video, records
