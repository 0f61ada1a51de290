"""A trained model against the true game: rollouts from dataset episodes, action files or fresh built-in episodes,
scored with `ap_jax.eval` and drawn as side-by-side videos. The `ap-jax sample` and `ap-jax eval` commands are thin
wrappers over this module.

Dimension letters: B rollouts, T steps (actions) per rollout, P players, H, W pixels.

A `Case` is one rollout to run: the initial frame, each player's initial position, the actions, and the truth (the
true game's replay of the same actions from the same seed: `ap_jax.eval.replay`), when there is one.

Held-out episodes for player counts the dataset lacks (`fresh_builtin_cases`) use seeds
`generation_seed + FRESH_SEED_OFFSET + 1000 n + i` for n players: disjoint from every dataset split
(`tfds_builder.SPLIT_SEED_OFFSETS` 0 / 1e8 / 2e8) and from live training episodes (`pipeline.LIVE_SEED_OFFSET`,
3e8), so the model has never seen them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Sequence

import numpy as np

from ap_jax import actions as A
from ap_jax import sample as sample_lib
from ap_jax.data import frames as frames_lib
from ap_jax.data import locate
from ap_jax.train import restore as restore_lib

log = logging.getLogger("ap_jax.evaluate")

FRESH_SEED_OFFSET = 400_000_000


class EvalError(ValueError):
  """Inputs that cannot be evaluated (wrong source, too many steps, no detector); names the problem."""


@dataclasses.dataclass
class Case:
  """One rollout to generate. frame uint8 [H, W, 3]; positions float32 [P, 2] pixel centres (y, x); actions int32
  [T, P]; colors uint8 [P, 3]; truth: the replay dict (frames [T+1, ...], cells, positions, orientations, ...) or
  None; name: where it came from (for logs and JSON)."""

  frame: np.ndarray
  positions: np.ndarray
  actions: np.ndarray
  colors: np.ndarray
  truth: dict[str, Any] | None
  name: str
  seed: int
  info: dict[str, Any] = dataclasses.field(default_factory=dict)
  orientations: np.ndarray | None = None  # int [P] initial facing (0 N, 1 E, 2 S, 3 W), when known

  def initial_orientations(self) -> np.ndarray:
    """Each player's initial facing: the case's own, or the true game's first frame's."""
    if self.orientations is not None:
      return np.asarray(self.orientations, np.int32)
    if self.truth is not None and "orientations" in self.truth:
      return np.asarray(self.truth["orientations"][0], np.int32)
    raise EvalError(f"{self.name}: no initial orientations, which a model with facing in its subject state needs")

  @property
  def num_players(self) -> int:
    return int(self.actions.shape[1])


# ------------------------------------------------------------------------------------------------- cases


def _check_steps(steps: int | None, available: int, what: str) -> int:
  if steps is None:
    return available
  if not 1 <= steps <= available:
    raise EvalError(f"--steps {steps}, but {what} has {available} steps of actions; expected 1 to {available}")
  return int(steps)


def case_from_episode(episode: dict[str, Any], steps: int | None, name: str) -> Case:
  """A dataset episode's first frame, positions and first `steps` actions; truth replayed in the true game from
  the episode's seed (Melting Pot needs the meltingpot extra; `replay.replay_episode`)."""
  from ap_jax.eval import replay

  actions = np.asarray(episode["actions"], np.int32)
  steps = _check_steps(steps, actions.shape[0], f"episode {name} (seed {episode['seed']})")
  actions = actions[:steps]
  truth = replay.replay_episode(episode, actions)
  return Case(frame=np.asarray(episode["frames"])[0], positions=np.asarray(episode["positions"], np.float32)[0],
              actions=actions, colors=np.asarray(episode["colors"], np.uint8), truth=truth, name=name,
              seed=int(episode["seed"]), info=dict(source=str(episode["source"]), layout=str(episode["substrate"])))


def dataset_cases(config, split: str, indices: Sequence[int], steps: int | None) -> list[Case]:
  """Episodes `indices` of `split` of the training config's dataset (`locate.resolve_dataset`)."""
  if config.data.source == "live":
    raise EvalError("the model was trained on live built-in episodes (data.source = 'live'), which have no stored "
                    "splits: use `--players MIN-MAX` (fresh held-out episodes) or an action file instead")
  return dataset_dir_cases(locate.resolve_dataset(config.data), split, indices, steps)


def dataset_dir_cases(path: str, split: str, indices: Sequence[int], steps: int | None) -> list[Case]:
  """Episodes `indices` of `split` of the dataset at `path` (`ap-jax data`), each with its true game's replay."""
  from ap_jax.data import dataset

  source = dataset.open_split(path, split)
  cases = []
  for k in indices:
    if not 0 <= k < len(source):
      raise EvalError(f"episode {k}: split {split!r} of {path} has episodes 0 to {len(source) - 1}")
    cases.append(case_from_episode(source[k], steps, f"{split}:{k}"))
  return cases


def check_frame_size(config, cases: Sequence[Case]) -> None:
  """Cases from another dataset must have the frame size the model was trained on."""
  hw = tuple(locate.frame_hw(config))
  for case in cases:
    if tuple(case.frame.shape[:2]) != hw:
      raise EvalError(f"{case.name}: frames are {case.frame.shape[0]} x {case.frame.shape[1]} px, but the model was "
                      f"trained on {hw[0]} x {hw[1]} px frames; expected a dataset of that canvas")


def game_config(config):
  """The built-in game's GameConfig for frames of the size the model was trained on."""
  from ap_jax.eval import replay

  return replay.builtin_config(locate.frame_hw(config), int(config.data.cell_size))


def case_from_action_file(config, path: str, steps: int | None) -> Case:
  """An action file (ap_jax.eval.action_files) with a `seed`: the initial frame is the true game's reset for that
  seed (built-in: `layout`, default the layout the dataset would draw for that seed; Melting Pot: `substrate`)."""
  from ap_jax.eval import action_files, replay
  from ap_jax.games import gridgame

  actions, meta = action_files.load_action_file(path)
  if "seed" not in meta:
    raise action_files.ActionFileError(
        f"{path}: no 'seed': the initial frame comes from the true game's reset for a seed, so the file needs "
        "\"seed\": <non-negative integer> (and optionally \"layout\")")
  steps = _check_steps(steps, actions.shape[0], f"action file {path}")
  actions = actions[:steps]
  seed, num_players = int(meta["seed"]), actions.shape[1]
  source = meta.get("source", "builtin")
  if source == "meltingpot":
    if "substrate" not in meta:
      raise action_files.ActionFileError(f"{path}: source 'meltingpot' needs a 'substrate'")

    try:
      truth = replay.replay_meltingpot(str(meta["substrate"]), seed, actions, locate.frame_hw(config))
    except ImportError as e:
      raise EvalError(f"{path} asks for Melting Pot, which is not installed ({e}); install the meltingpot extra") \
          from e
    layout = str(meta["substrate"])
  else:
    if "substrate" in meta:
      raise action_files.ActionFileError(f"{path}: 'substrate' is for source 'meltingpot'; the built-in game takes "
                                         f"'layout' ({', '.join(gridgame.LAYOUTS)})")
    layout = meta.get("layout")
    if layout is None:
      layout = gridgame.LAYOUTS[gridgame.episode_spec(seed, (num_players, num_players))[1]]
    truth = replay.replay_builtin(seed, layout, actions, game_config(config))
  return Case(frame=truth["frames"][0], positions=truth["positions"][0], actions=actions, colors=truth["colors"],
              truth=truth, name=os.path.basename(path), seed=seed, info=dict(source=source, layout=layout))


def fresh_builtin_cases(config, players: tuple[int, int], episodes_per_count: int, steps: int) -> list[Case]:
  """`episodes_per_count` new built-in episodes for each player count in [MIN, MAX], from held-out seeds (module
  docstring), played with the dataset's policy; layouts drawn from each seed as the dataset draws them."""
  from ap_jax.eval import replay
  from ap_jax.games import gridgame

  if config.data.source == "dir":
    from ap_jax.data import dataset

    generation = dataset.read_info(config.data.dir).generation
    if generation.get("source", "builtin") != "builtin":
      raise EvalError(f"--players makes fresh built-in-game episodes, but the model was trained on "
                      f"{generation.get('source')!r} data ({config.data.dir}): they would be another game")
  lo, hi = players
  if not 1 <= lo <= hi <= A.MAX_PLAYERS:
    raise EvalError(f"--players {lo}-{hi}, expected 1 <= MIN <= MAX <= {A.MAX_PLAYERS}")
  if steps < 1:
    raise EvalError(f"--steps {steps}, expected at least 1")
  game = game_config(config)
  cases = []
  for n in range(lo, hi + 1):
    seeds = [int(config.data.generation_seed) + FRESH_SEED_OFFSET + 1000 * n + i for i in range(episodes_per_count)]
    for ep in gridgame.generate_episodes(seeds, config=game, steps=steps, players=(n, n),
                                         policy=str(config.data.policy), sticky_p=float(config.data.sticky_p)):
      truth = replay.replay_episode(ep)
      cases.append(Case(frame=ep["frames"][0], positions=ep["positions"][0], actions=ep["actions"],
                        colors=ep["colors"], truth=truth, name=f"fresh:{n}p:{ep['seed']}", seed=int(ep["seed"]),
                        info=dict(source="builtin", layout=ep["substrate"])))
  return cases


def fresh_meltingpot_cases(config, players: tuple[int, int], episodes_per_count: int, steps: int) -> list[Case]:
  """`episodes_per_count` new Melting Pot episodes of the config's training substrates for each player count in
  [MIN, MAX] that at least one of them allows (counts none allows are skipped, and logged), `steps` actions long,
  from seeds `generation_seed + FRESH_SEED_OFFSET + ...`: a dataset per count, generated into the cache once."""
  from ap_jax.data import meltingpot_substrates

  if config.data.source != "meltingpot":
    raise EvalError(f"fresh Melting Pot episodes need a model trained on data.source = 'meltingpot', not "
                    f"{config.data.source!r}")
  lo, hi = players
  if not 1 <= lo <= hi <= A.MAX_PLAYERS:
    raise EvalError(f"--players {lo}-{hi}, expected 1 <= MIN <= MAX <= {A.MAX_PLAYERS}")
  if steps < 1 or episodes_per_count < 1:
    raise EvalError(f"steps {steps}, episodes per count {episodes_per_count}: expected at least 1 of each")
  spec = locate.generation_spec(config.data)
  cases = []
  for n in range(lo, hi + 1):
    substrates = tuple(s for s in spec.substrates if n in meltingpot_substrates.player_counts(s))
    if not substrates:
      log.info("no training substrate takes %d players (%s): skipped", n, ", ".join(spec.substrates))
      continue
    total = max(episodes_per_count, 3)  # a dataset has at least one episode per split
    while dataclasses.replace(spec, episodes=total).split_sizes()["train"] < episodes_per_count:
      total += 1
    fresh = dataclasses.replace(spec, substrates=substrates, players=(n, n), steps=steps, episodes=total,
                                seed=spec.seed + FRESH_SEED_OFFSET + 1000 * n)
    path = locate.cached_dataset(fresh)
    cases += [dataclasses.replace(c, name=f"fresh:{n}p:{c.seed}")
              for c in dataset_dir_cases(path, "train", range(episodes_per_count), steps)]
  if not cases:
    raise EvalError(f"no training substrate ({', '.join(spec.substrates)}) takes {lo}-{hi} players")
  return cases


def fresh_cases(config, players: tuple[int, int], episodes_per_count: int, steps: int) -> list[Case]:
  """Fresh held-out episodes of each player count: of the built-in game, or of the config's Melting Pot
  substrates."""
  if config.data.source == "meltingpot":
    return fresh_meltingpot_cases(config, players, episodes_per_count, steps)
  return fresh_builtin_cases(config, players, episodes_per_count, steps)


# ------------------------------------------------------------------------------------------------ running


def run_cases(sampler: sample_lib.Sampler, cases: Sequence[Case], *, seed: int, batch_size: int
              ) -> tuple[list[np.ndarray], list[np.ndarray | None], dict[str, Any]]:
  """Generates every case, `batch_size` at a time (player slots padded within a batch; same number of steps per
  batch). Each rollout's noise is named by its episode seed, so results do not depend on batching.
  Returns (frames uint8 [T+1, H, W, 3] per case, predicted positions [T+1, P, 2] or None per case, timing)."""
  if batch_size < 1:
    raise EvalError(f"--batch-size {batch_size}, expected at least 1")
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


def check_scorable(cases: Sequence[Case]) -> None:
  for case in cases:
    if case.truth is None or case.truth.get("source") not in ("builtin", "meltingpot"):
      raise EvalError(f"{case.name}: no true game to score against (source {case.info.get('source')!r}); scoring "
                      "needs the built-in game or Melting Pot")


def detector_accuracy(cases: Sequence[Case]) -> dict[str, Any]:
  """The detectors' accuracy on the cases' own true frames, pooled, and per substrate (`by_substrate`): the ceiling
  of the metrics. Melting Pot instances of removed or look-alike players are not scored (`skipped_instances`)."""
  from ap_jax.eval import detector, metrics

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


def score_cases(cases: Sequence[Case], frames: Sequence[np.ndarray], positions: Sequence[np.ndarray | None]
                ) -> tuple[list[dict], dict[str, Any]]:
  """Per-case scores (`metrics.score_rollout`) and the detectors' accuracy on the cases' true frames."""
  from ap_jax.eval import metrics

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
  import jax
  import ml_collections

  from ap_jax.model import vae as vae_lib
  from ap_jax.train import checkpoint as checkpoint_lib
  from ap_jax.train import mesh as mesh_lib

  with checkpoint_lib.Checkpointer(workdir, read_only=True) as ckpt:
    found = ckpt.latest_meta()
  if found is None or found[1].get("stage") != "autoencoder":
    raise EvalError(f"--autoencoder {workdir}: expected the workdir of a trained autoencoder (`ap-jax train` with "
                    "an autoencoder config)")
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


def oracle(cases: Sequence[Case], reconstruct=None) -> dict[str, Any]:
  """Scores each case's true frames as if they were a generated rollout: the ceiling of the metric pipeline
  (movement and subject scores of 1.0 wherever players can be told apart), with the detectors' accuracy. The
  results dict has the keys `evaluate` writes (no model, no sampling). `reconstruct` (`autoencoder_reconstructor`):
  score the autoencoder's reconstructions of the true frames instead, the ceiling of a model that renders through
  that autoencoder."""
  from ap_jax.eval import metrics

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


def _episode_rows(cases: Sequence[Case], scores: Sequence[dict]) -> list[dict]:
  return [dict(name=c.name, seed=c.seed, players=c.num_players, steps=int(c.actions.shape[0]), **c.info,
               movement_accuracy=_nanmean(s["movement_accuracy"]),
               subject_preservation=_nanmean(s["subject_preservation"]))
          for c, s in zip(cases, scores)]


def _nanmean(x) -> float | None:
  x = np.asarray(x, np.float64)
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else None


def evaluate(trained, cases: Sequence[Case], *, seed: int = 0, batch_size: int = 8,
             **sampler_kwargs) -> dict[str, Any]:
  """Generates and scores `cases`; returns the results dict (`metrics.aggregate`: metric keys at the top level,
  `by_players`, `by_step`, `detector`) plus `model`, `sampling`, `timing` and per-episode `episodes`."""
  from ap_jax.eval import metrics

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


def hold_initial_frame_baseline(cases: Sequence[Case]) -> dict[str, Any]:
  """The metrics of a "model" that shows the initial frame at every step (no one ever moves or turns), on the same
  cases: the floor a world model must beat. Its movement accuracy is the share of (player, step) instances whose
  true effect is "stayed, same facing" (NOOP, INTERACT, blocked moves); its PSNR is that of a static scene."""
  from ap_jax.eval import metrics

  scores = [metrics.score_rollout(np.repeat(np.asarray(c.frame)[None], c.actions.shape[0] + 1, axis=0), c.truth)
            for c in cases]
  pooled = metrics.aggregate(scores)
  return {k: pooled[k] for k in ("movement_accuracy", "state_accuracy", "subject_preservation", "psnr", "ssim")}


def sampler_settings(sampler: sample_lib.Sampler, seed: int) -> dict[str, Any]:
  return dict(sampler=sampler.sampler, denoise_steps=sampler.denoise_steps, chunk=sampler.chunk,
              window=sampler.window, guidance=sampler.guidance, context_noise=sampler.context_noise,
              use_cache=sampler.use_cache, reencode=sampler.reencode, snap_px=sampler.snap_px, seed=seed)


# ------------------------------------------------------------------------------------------------- video


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


def render(case: Case, frames: np.ndarray, positions: np.ndarray | None, *, scale: int = 4
           ) -> tuple[list[np.ndarray], dict[str, Any]]:
  """Annotated video frames: generated (left, with the model's predicted positions, the given actions and a
  green/red mark per player for whether the generated step carried the action out) beside the true game (right)
  when there is one. Returns (frames, per-step records for the JSON file)."""
  from ap_jax import viz
  from ap_jax.eval import detector, metrics

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


def to_json(obj: Any) -> Any:
  """numpy scalars and arrays -> plain JSON values (NaN -> null)."""
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_json(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    return None if not np.isfinite(obj) else float(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def write_json(obj: Any, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(to_json(obj), f, indent=2)
  os.replace(tmp, path)
  return path
