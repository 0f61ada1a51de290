"""Runs a trained model on evaluation cases (`ap_jax.eval.cases`) and scores its rollouts against the true game
(`ap_jax.eval.metrics`): `evaluate` generates and scores, `oracle` scores the true frames themselves (the metrics'
ceiling), `hold_initial_frame_baseline` a model that never moves anything (their floor). The `ap-jax sample` and
`ap-jax eval` commands are thin wrappers over this module and `ap_jax.eval.cases`, `render` and `report`.

Dimension letters: B rollouts, T steps (actions) per rollout, P players, H, W pixels.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from ap_jax import actions as A
from ap_jax import sample as sample_lib
from ap_jax.data import frames as frames_lib
from ap_jax.eval import cases as cases_lib
from ap_jax.eval import detector, metrics
from ap_jax.model import vae as vae_lib
from ap_jax.train import checkpoint as checkpoint_lib
from ap_jax.train import mesh as mesh_lib
from ap_jax.train import restore as restore_lib

log = logging.getLogger("ap_jax.eval.run")


def run_cases(sampler: sample_lib.Sampler, cases: Sequence[cases_lib.Case], *, seed: int, batch_size: int
              ) -> tuple[list[np.ndarray], list[np.ndarray | None], dict[str, Any]]:
  """Generates every case, `batch_size` at a time (player slots padded within a batch; same number of steps per
  batch). Each rollout's noise is named by its episode seed, so results do not depend on batching.
  Returns (frames uint8 [T+1, H, W, 3] per case, predicted positions [T+1, P, 2] or None per case, timing)."""
  if batch_size < 1:
    raise cases_lib.EvalError(f"--batch-size {batch_size}, expected at least 1")
  frames_out: list[Any] = [None] * len(cases)
  positions_out: list[Any] = [None] * len(cases)
  by_steps: dict[int, list[int]] = {}
  for i, case in enumerate(cases):
    by_steps.setdefault(case.actions.shape[0], []).append(i)
  seconds, generated, steady = 0.0, 0, []
  for steps, members in sorted(by_steps.items()):
    for start in range(0, len(members), batch_size):
      idx = members[start:start + batch_size]
      p = max(cases[i].num_players for i in idx)
      acts = np.full((len(idx), steps, p), A.NOOP, np.int32)
      pos = np.zeros((len(idx), p, 2), np.float32)
      mask = np.zeros((len(idx), p), bool)
      facing = np.zeros((len(idx), p), np.int32)
      for row, i in enumerate(idx):
        n = cases[i].num_players
        acts[row, :, :n], pos[row, :n], mask[row, :n] = cases[i].actions, cases[i].positions, True
        if sampler.state_dims > 2:
          facing[row, :n] = cases[i].initial_orientations()
      out = sampler.rollout(np.stack([cases[i].frame for i in idx]), pos, acts, player_mask=mask, seed=seed,
                            rollout_ids=[cases[i].seed for i in idx], initial_orientations=facing)
      for row, i in enumerate(idx):
        frames_out[i] = out.frames[row]
        if out.positions is not None:
          positions_out[i] = out.positions[row, :, :cases[i].num_players]
      seconds += out.timing["seconds_total"]
      generated += out.timing["frames_generated"]
      if out.timing["steady_frames_per_s"]:
        steady.append(out.timing["steady_frames_per_s"])
      log.info("generated %d rollouts of %d steps in %.1fs", len(idx), steps, out.timing["seconds_total"])
  timing = dict(seconds_sampling=seconds, frames_generated=generated,
                frames_per_s_including_compilation=generated / seconds if seconds else None,
                steady_frames_per_s=float(np.mean(steady)) if steady else None)
  return frames_out, positions_out, timing


def check_scorable(cases: Sequence[cases_lib.Case]) -> None:
  for case in cases:
    if case.truth is None or case.truth.get("source") not in ("builtin", "meltingpot"):
      raise cases_lib.EvalError(f"{case.name}: no true game to score against (source "
                                f"{case.info.get('source')!r}); scoring needs the built-in game or Melting Pot")


def detector_accuracy(cases: Sequence[cases_lib.Case]) -> dict[str, Any]:
  """The detectors' accuracy on the cases' own true frames, pooled, and per substrate (`by_substrate`): the ceiling
  of the metrics. Melting Pot instances of removed or look-alike players are not scored (`skipped_instances`)."""
  sums: dict[str, dict[str, float]] = {}
  for c in cases:
    t = c.truth
    reader = metrics.truth_detector(t)
    if reader is None:
      acc = detector.detector_accuracy(t["frames"], t["cells"], t["orientations"], t["colors"], int(t["cell_size"]))
      acc["skipped_instances"] = 0
    else:
      acc = reader.accuracy(t["frames"], t["cells"], t["orientations"], t["visible"])
    row = sums.setdefault(str(t.get("substrate", "")), dict(correct=0.0, instances=0, false=0.0, frames=0,
                                                            skipped=0))
    row["correct"] += (acc["player_accuracy"] or 0.0) * acc["player_instances"]
    row["instances"] += acc["player_instances"]
    row["false"] += acc["false_detections"] * len(t["frames"])
    row["frames"] += len(t["frames"])
    row["skipped"] += acc["skipped_instances"]
    if reader is not None:
      row["groups"], row["facing_unreadable"] = acc["groups"], acc["facing_unreadable"]

  def summary(rows):
    instances = sum(r["instances"] for r in rows)
    frames = sum(r["frames"] for r in rows)
    return dict(player_accuracy=(sum(r["correct"] for r in rows) / instances) if instances else None,
                false_detections=sum(r["false"] for r in rows) / max(1, frames), player_instances=int(instances),
                skipped_instances=int(sum(r["skipped"] for r in rows)))

  out = summary(list(sums.values()))
  out["by_substrate"] = {
      name: dict(summary([r]), **{k: r[k] for k in ("groups", "facing_unreadable") if k in r})
      for name, r in sorted(sums.items())}
  return out


def score_cases(cases: Sequence[cases_lib.Case], frames: Sequence[np.ndarray], positions: Sequence[np.ndarray | None]
                ) -> tuple[list[dict], dict[str, Any]]:
  """Per-case scores (`metrics.score_rollout`) and the detectors' accuracy on the cases' true frames."""
  check_scorable(cases)
  scores = [metrics.score_rollout(f, c.truth, pred_positions=p) for c, f, p in zip(cases, frames, positions)]
  det = detector_accuracy(cases)
  for name, row in det["by_substrate"].items():
    if row["player_accuracy"] is not None and row["player_accuracy"] < 0.99:
      log.warning("the detector reads only %.4f of real player instances of %s correctly (< 0.99): its metrics "
                  "are not trustworthy", row["player_accuracy"], name or "these episodes")
  return scores, det


def autoencoder_reconstructor(workdir: str):
  """frames uint8 [N, H, W, 3] -> the trained autoencoder's reconstructions (decode(encode(x)), EMA weights) of
  the autoencoder workdir `workdir`, uint8."""
  with checkpoint_lib.Checkpointer(workdir, read_only=True) as ckpt:
    found = ckpt.latest_meta()
  if found is None or found[1].get("stage") != "autoencoder":
    raise cases_lib.EvalError(f"--autoencoder {workdir}: expected the workdir of a trained autoencoder (`ap-jax "
                              "train` with an autoencoder config)")
  config = ml_collections.ConfigDict(found[1]["config"])
  config.autoencoder_workdir = workdir
  params, _ = restore_lib.load_autoencoder(config, mesh_lib.single_device_mesh(), mesh_lib.rules_from_config(config))
  model = config.model
  code = jax.jit(lambda x: vae_lib.vae_decode(params, model, vae_lib.vae_encode(params, model, x)))

  def reconstruct(frames_NHWC: np.ndarray) -> np.ndarray:
    out = [frames_lib.to_uint8(np.asarray(code(frames_lib.to_model_range(frames_NHWC[i:i + 64][None]))[0]))
           for i in range(0, len(frames_NHWC), 64)]
    return np.concatenate(out)

  return reconstruct


def oracle(cases: Sequence[cases_lib.Case], reconstruct=None) -> dict[str, Any]:
  """Scores each case's true frames as if they were a generated rollout: the ceiling of the metric pipeline
  (movement and subject scores of 1.0 wherever players can be told apart), with the detectors' accuracy. The
  results dict has the keys `evaluate` writes (no model, no sampling). `reconstruct` (`autoencoder_reconstructor`):
  score the autoencoder's reconstructions of the true frames instead, the ceiling of a model that renders through
  that autoencoder."""
  start = time.perf_counter()
  frames = [np.asarray(c.truth["frames"]) for c in cases]
  if reconstruct is not None:
    frames = [reconstruct(f) for f in frames]
  positions = [np.asarray(c.truth["positions"], np.float32) for c in cases]
  scores, det = score_cases(cases, frames, positions)
  results = metrics.aggregate(scores, detector=det)
  results["model"] = None
  results["oracle"] = True
  results["timing"] = dict(seconds_scoring=time.perf_counter() - start)
  results["baselines"] = {"hold_initial_frame": hold_initial_frame_baseline(cases)}
  results["episodes"] = _episode_rows(cases, scores)
  return results


def _episode_rows(cases: Sequence[cases_lib.Case], scores: Sequence[dict]) -> list[dict]:
  return [dict(name=c.name, seed=c.seed, players=c.num_players, steps=int(c.actions.shape[0]), **c.info,
               movement_accuracy=_nanmean(s["movement_accuracy"]),
               subject_preservation=_nanmean(s["subject_preservation"]))
          for c, s in zip(cases, scores)]


def _nanmean(x) -> float | None:
  x = np.asarray(x, np.float64)
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else None


def evaluate(trained, cases: Sequence[cases_lib.Case], *, seed: int = 0, batch_size: int = 8,
             **sampler_kwargs) -> dict[str, Any]:
  """Generates and scores `cases`; returns the results dict (`metrics.aggregate`: metric keys at the top level,
  `by_players`, `by_step`, `detector`) plus `model`, `sampling`, `timing` and per-episode `episodes`."""
  check_scorable(cases)
  sampler = sample_lib.Sampler.from_trained(trained, **sampler_kwargs)
  frames, positions, timing = run_cases(sampler, cases, seed=seed, batch_size=batch_size)
  start = time.perf_counter()
  scores, det = score_cases(cases, frames, positions)
  results = metrics.aggregate(scores, detector=det)
  timing["seconds_scoring"] = time.perf_counter() - start
  results["model"] = dict(step=int(trained.step), model=trained.config.get("model_name"),
                          subject_tokens=bool(trained.model_config.dit.subject_tokens))
  results["sampling"] = sampler_settings(sampler, seed)
  results["timing"] = timing
  results["baselines"] = {"hold_initial_frame": hold_initial_frame_baseline(cases)}
  results["episodes"] = _episode_rows(cases, scores)
  return results


def hold_initial_frame_baseline(cases: Sequence[cases_lib.Case]) -> dict[str, Any]:
  """The metrics of a "model" that shows the initial frame at every step (no one ever moves or turns), on the same
  cases: the floor a world model must beat. Its movement accuracy is the share of (player, step) instances whose
  true effect is "stayed, same facing" (NOOP, INTERACT, blocked moves); its PSNR is that of a static scene."""
  scores = [metrics.score_rollout(np.repeat(np.asarray(c.frame)[None], c.actions.shape[0] + 1, axis=0), c.truth)
            for c in cases]
  pooled = metrics.aggregate(scores)
  return {k: pooled[k] for k in ("movement_accuracy", "state_accuracy", "subject_preservation", "psnr", "ssim")}


def sampler_settings(sampler: sample_lib.Sampler, seed: int) -> dict[str, Any]:
  """The sampler's settings and seed, as the results files record them."""
  return dict(sampler=sampler.sampler, denoise_steps=sampler.denoise_steps, chunk=sampler.chunk,
              window=sampler.window, guidance=sampler.guidance, context_noise=sampler.context_noise,
              use_cache=sampler.use_cache, reencode=sampler.reencode, snap_px=sampler.snap_px, seed=seed)
