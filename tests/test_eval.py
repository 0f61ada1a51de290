"""Evaluation against the true game: detector, replay, metrics and action files (ap_jax.eval).

The metric tests feed the true game's own frames in as if generated (every metric must then be perfect), then
damage them in known ways (two players' sprites swapped, a player erased or duplicated in one frame) and check
that each metric falls by exactly the amount its definition implies.
"""

import json

import numpy as np
import pytest

from ap_jax import actions as A
from ap_jax.eval import action_files, detector, metrics, replay, report
from ap_jax.eval import cases as cases_lib
from ap_jax.eval import run as run_lib
from ap_jax.games import gridgame

CONFIG = gridgame.GameConfig()
S = CONFIG.cell_size
STEPS = 8


@pytest.fixture(scope="module")
def episodes():
  """Dataset episodes with 1 to 8 players over every layout (as the dataset generator makes them)."""
  return gridgame.generate_episodes(list(range(500, 516)), config=CONFIG, steps=STEPS, players=(1, 8))


@pytest.fixture(scope="module")
def truth3(episodes):
  """The true-game replay of an episode with at least 3 players."""
  ep = next(e for e in episodes if len(e["colors"]) >= 3)
  return replay.replay_episode(ep)


def _tile(frame, cell):
  y, x = (int(v) for v in cell)
  return frame[y * S:(y + 1) * S, x * S:(x + 1) * S]


# ------------------------------------------------------------------------------------------------------------
# Replay


def test_replay_reproduces_dataset_episodes(episodes):
  for ep in episodes[:6]:
    truth = replay.replay_episode(ep)
    np.testing.assert_array_equal(truth["frames"], ep["frames"])
    np.testing.assert_array_equal(truth["positions"], ep["positions"])
    np.testing.assert_array_equal(truth["orientations"], ep["orientations"])
    np.testing.assert_array_equal(truth["colors"], ep["colors"])
    np.testing.assert_array_equal((truth["cells"] + 0.5) * S, ep["positions"])


def test_replay_with_other_actions_starts_from_the_episode(episodes):
  ep = episodes[0]
  num_players = len(ep["colors"])
  # STEPS actions, as the stored episodes have, so the replay reuses their compiled rollout.
  stay = np.full((STEPS, num_players), A.NOOP, np.int32)
  truth = replay.replay_episode(ep, stay)
  assert truth["frames"].shape[0] == STEPS + 1
  for t in range(STEPS + 1):
    np.testing.assert_array_equal(truth["frames"][t], ep["frames"][0])
  turn = np.full((STEPS, num_players), A.TURN_RIGHT, np.int32)
  turned = replay.replay_episode(ep, turn)
  np.testing.assert_array_equal(turned["orientations"][2], (ep["orientations"][0] + 2) % 4)
  np.testing.assert_array_equal(turned["cells"][STEPS], truth["cells"][0])
  with pytest.raises(ValueError, match=rf"expected \[T, {num_players}\]"):
    replay.replay_episode(ep, np.zeros((3, num_players + 1), np.int32))


def test_replay_meltingpot_matches_generated_episode():
  mp = pytest.importorskip("ap_jax.data.meltingpot")
  from ap_jax.data import meltingpot_substrates
  try:
    meltingpot_substrates.import_meltingpot()
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"Melting Pot is not installed: {e}")
  ep = mp.generate_episode("coins", 2, 2, seed=7)
  truth = replay.replay_episode(ep)
  np.testing.assert_array_equal(truth["frames"], ep["frames"])
  np.testing.assert_array_equal(truth["positions"], ep["positions"])
  np.testing.assert_array_equal(truth["orientations"], ep["orientations"])
  assert truth["visible"].shape == truth["orientations"].shape and truth["substrate"] == "coins"
  np.testing.assert_array_equal(truth["grid"].centres(truth["cells"]), ep["positions"])


# ------------------------------------------------------------------------------------------------------------
# Detector


def test_sharp_templates_are_the_game_sprites():
  templates_KVD, _, num_players = detector.templates(gridgame.PLAYER_COLORS, S)
  atlas = gridgame.sprite_atlas(S).reshape(len(templates_KVD), -1).astype(np.float32)
  np.testing.assert_array_equal(templates_KVD[:, 0], atlas)
  assert num_players == 8


def test_detector_is_exact_on_real_frames(episodes):
  for ep in episodes:
    truth = replay.replay_episode(ep)
    acc = detector.detector_accuracy(truth["frames"], truth["cells"], truth["orientations"], truth["colors"], S)
    assert acc == {"player_accuracy": 1.0, "false_detections": 0.0, "player_instances": truth["cells"].shape[0] *
                   truth["cells"].shape[1]}
    det = detector.detect(truth["frames"], truth["colors"], S)
    np.testing.assert_array_equal(det.count_NP, 1)
    np.testing.assert_array_equal(det.centres_NP2, truth["positions"])
    assert det.rms_NYX.max() == 0.0  # exact sprites match exactly
    assert np.all(det.extra_N == 0)


@pytest.mark.parametrize("perturbation", ["noise32", "blur1.0", "blur1.0+noise16"])
def test_detector_is_robust_to_noise_and_blur(episodes, perturbation):
  rng = np.random.default_rng(0)
  for ep in episodes[::2]:
    truth = replay.replay_episode(ep)
    frames = detector.perturb(truth["frames"], perturbation, rng)
    assert np.abs(frames.astype(int) - truth["frames"]).mean() > 3  # the perturbation really changed the frames
    acc = detector.detector_accuracy(frames, truth["cells"], truth["orientations"], truth["colors"], S)
    assert acc["player_accuracy"] == 1.0 and acc["false_detections"] == 0.0, (perturbation, acc)


def test_detector_reads_model_range_floats(truth3):
  frames = truth3["frames"].astype(np.float32) / 127.5 - 1.0
  det = detector.detect(frames, truth3["colors"], S)
  np.testing.assert_array_equal(det.cells_NP2, truth3["cells"])
  np.testing.assert_array_equal(det.facing_NP, truth3["orientations"])


def test_detector_rejects_garbage_and_counts_foreign_and_duplicate_players(truth3):
  frame = truth3["frames"][0].copy()
  colors = truth3["colors"][:2]  # players 2.. are now colours of no episode player
  cells = truth3["cells"][0]
  free = next((y, x) for y in range(CONFIG.grid_height) for x in range(CONFIG.grid_width)
              if not np.any(np.all(cells == (y, x), axis=-1)))
  _tile(frame, free)[:] = 0
  _tile(frame, free)[::2, ::2] = 255  # a speckle of white on black: like no sprite
  det = detector.detect(frame, colors, S)
  assert det.kind_NYX[free] == detector.KIND_REJECTED
  assert det.extra_N == len(truth3["colors"]) - 2
  assert det.kind_NYX[tuple(cells[2])] == detector.KIND_EXTRA_PLAYER
  _tile(frame, free)[:] = _tile(frame, cells[0])
  det = detector.detect(frame, colors, S)
  assert det.count_NP.tolist() == [2, 1]
  with pytest.raises(ValueError, match="repeat a colour"):
    detector.detect(frame, np.stack([colors[0], colors[0]]), S)
  with pytest.raises(ValueError, match="multiples of cell_size = 8"):
    detector.detect(frame[:60], colors, S)


# ------------------------------------------------------------------------------------------------------------
# Metrics


def _mean(scores, name):
  return float(np.mean(scores[name]))


def test_true_frames_score_perfectly(truth3):
  for frames in (truth3["frames"], truth3["frames"].astype(np.float32) / 127.5 - 1.0):
    scores = metrics.score_rollout(frames, truth3, pred_positions=truth3["positions"])
    for name in ("movement_accuracy", "state_accuracy", "subject_preservation"):
      assert scores[name].shape == (STEPS, truth3["cells"].shape[1])
      assert _mean(scores, name) == 1.0, name
    assert _mean(scores, "tracking_error_px") == 0.0
    assert _mean(scores, "extra_players") == 0.0
    np.testing.assert_allclose(scores["ssim"], 1.0, atol=1e-6)
  assert np.all(metrics.score_rollout(truth3["frames"], truth3)["psnr"] == metrics.PSNR_CAP_DB)


@pytest.mark.parametrize("step", [3, STEPS])
def test_swapped_sprites_fail_movement_but_not_preservation(truth3, step):
  frames = truth3["frames"].copy()
  a, b = 0, 2
  cell_a, cell_b = truth3["cells"][step, a], truth3["cells"][step, b]
  tile_a = _tile(frames[step], cell_a).copy()
  _tile(frames[step], cell_a)[:] = _tile(frames[step], cell_b)
  _tile(frames[step], cell_b)[:] = tile_a
  scores = metrics.score_rollout(frames, truth3)
  num_players = truth3["cells"].shape[1]
  # Step `step` shows a and b jumping into each other's cells; step `step` + 1 (if any) jumping back.
  expected = np.ones((STEPS, num_players), bool)
  expected[step - 1, [a, b]] = False
  if step < STEPS:
    expected[step, [a, b]] = False
  np.testing.assert_array_equal(scores["movement_accuracy"], expected)
  failures = 4 if step < STEPS else 2
  assert _mean(scores, "movement_accuracy") == pytest.approx(1 - failures / (STEPS * num_players))
  assert _mean(scores, "state_accuracy") == pytest.approx(1 - 2 / (STEPS * num_players))
  assert _mean(scores, "subject_preservation") == 1.0  # each is still there once, with its own colour


def test_erased_player_fails_preservation_once_and_movement_twice(truth3):
  frames = truth3["frames"].copy()
  step, p = 4, 1
  _tile(frames[step], truth3["cells"][step, p])[:] = gridgame.FLOOR_COLOR
  scores = metrics.score_rollout(frames, truth3)
  num_players = truth3["cells"].shape[1]
  instances = STEPS * num_players
  assert _mean(scores, "subject_preservation") == pytest.approx(1 - 1 / instances)
  assert not scores["subject_preservation"][step - 1, p]
  assert _mean(scores, "movement_accuracy") == pytest.approx(1 - 2 / instances)
  assert not scores["movement_accuracy"][step - 1, p] and not scores["movement_accuracy"][step, p]
  assert _mean(scores, "state_accuracy") == pytest.approx(1 - 1 / instances)


def test_wrong_facing_fails_movement_but_not_preservation(truth3):
  frames = truth3["frames"].copy()
  step, p = 3, 1
  wrong = (truth3["orientations"][step, p] + 2) % 4
  _tile(frames[step], truth3["cells"][step, p])[:] = gridgame.sprite_atlas(S)[gridgame.SPRITE_PLAYER0 + 4 * p + wrong]
  scores = metrics.score_rollout(frames, truth3)
  expected = np.ones_like(scores["movement_accuracy"])
  expected[[step - 1, step], p] = False  # turned the wrong way at `step`, and back at `step` + 1
  np.testing.assert_array_equal(scores["movement_accuracy"], expected)
  assert _mean(scores, "state_accuracy") == pytest.approx(1 - 1 / expected.size)
  assert _mean(scores, "subject_preservation") == 1.0


def test_duplicated_player_fails_preservation(truth3):
  frames = truth3["frames"].copy()
  step, p = 2, 0
  cells = truth3["cells"][step]
  free = next((y, x) for y in range(CONFIG.grid_height) for x in range(CONFIG.grid_width)
              if not np.any(np.all(cells == (y, x), axis=-1)))
  _tile(frames[step], free)[:] = _tile(frames[step], cells[p])
  scores = metrics.score_rollout(frames, truth3)
  assert not scores["subject_preservation"][step - 1, p]
  assert _mean(scores, "subject_preservation") == pytest.approx(1 - 1 / scores["subject_preservation"].size)


def test_interact_accuracy_sees_an_item_that_does_not_vanish(episodes):
  truths = [replay.replay_episode(ep) for ep in episodes]
  scores = [metrics.score_rollout(t["frames"], t) for t in truths]
  scored = [np.argwhere(~np.isnan(s["interact_accuracy"])) for s in scores]
  total = sum(len(w) for w in scored)
  assert total >= 2, "the fixture episodes should hold items collected by INTERACT"
  assert metrics.aggregate(scores)["interact_accuracy"] == 1.0
  # Paint the first collected item back into the frame after its collection: that instance must fail.
  i = next(i for i, w in enumerate(scored) if len(w))
  t, p = scored[i][0]
  truth = truths[i]
  front = truth["cells"][t, p] + A.ORIENTATION_DELTAS[truth["orientations"][t, p]]
  frames = truth["frames"].copy()
  _tile(frames[t + 1], front)[:] = gridgame.sprite_atlas(S)[gridgame.SPRITE_ITEM]
  scores[i] = metrics.score_rollout(frames, truth)
  results = metrics.aggregate(scores)
  assert results["interact_instances"] == total
  assert results["interact_accuracy"] == pytest.approx(1 - 1 / total)


def test_tracking_error_is_euclidean_pixels(truth3):
  pred = truth3["positions"] + np.array([3.0, 4.0], np.float32)
  np.testing.assert_allclose(metrics.score_rollout(truth3["frames"], truth3, pred_positions=pred)
                             ["tracking_error_px"], 5.0)
  np.testing.assert_allclose(metrics.tracking_error_px(pred[1:], truth3["positions"]), 5.0)
  with pytest.raises(ValueError, match="predicted positions have shape"):
    metrics.tracking_error_px(pred[2:], truth3["positions"])


def test_psnr_and_ssim():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (2, 32, 40, 3), dtype=np.uint8)
  assert np.all(metrics.psnr(x, x) == metrics.PSNR_CAP_DB)
  np.testing.assert_allclose(metrics.ssim(x, x), 1.0, atol=1e-6)
  y = (x.astype(int) + 5).clip(0, 255).astype(np.uint8)
  x5 = (y.astype(int) - 5).astype(np.uint8)  # x where no clipping happened, so y - x5 == 5 everywhere
  np.testing.assert_allclose(metrics.psnr(y, x5), 10 * np.log10(255**2 / 25), rtol=1e-6)
  noisy = (x + rng.normal(0, 20, x.shape)).clip(0, 255).astype(np.uint8)
  s = metrics.ssim(noisy, x)
  np.testing.assert_allclose(s, metrics.ssim(x, noisy), rtol=1e-6)  # symmetric
  np.testing.assert_allclose(s, _reference_ssim(noisy, x), rtol=1e-5)
  assert np.all(s < 0.99) and np.all(metrics.ssim(x, (x * 0.5).astype(np.uint8)) < s)
  with pytest.raises(ValueError, match="differ"):
    metrics.ssim(x, x[:, :20])


def _reference_ssim(x, y):
  """SSIM per frame via scipy's Gaussian filter, cropping the 5-px border (skimage's gaussian_weights=True recipe)."""
  from scipy import ndimage

  c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
  out = []
  for a, b in zip(x.astype(np.float64), y.astype(np.float64)):
    f = lambda z: ndimage.gaussian_filter(z, (1.5, 1.5, 0), truncate=3.5)  # radius int(3.5 * 1.5 + 0.5) = 5
    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    out.append(m[5:-5, 5:-5].mean())
  return np.array(out)


def test_aggregate_pools_by_players_and_steps(episodes):
  two = next(replay.replay_episode(e) for e in episodes if len(e["colors"]) == 2)
  three = next(replay.replay_episode(e) for e in episodes if len(e["colors"]) == 3)
  frames = three["frames"].copy()
  step = 5
  _tile(frames[step], three["cells"][step, 0])[:] = gridgame.FLOOR_COLOR  # erase player 0 of three at one step
  scores = [metrics.score_rollout(two["frames"], two), metrics.score_rollout(frames, three)]
  results = metrics.aggregate(scores, detector={"player_accuracy": 1.0, "false_detections": 0.0,
                                                "player_instances": 5})
  assert results["subject_preservation"] == pytest.approx(1 - 1 / (STEPS * 5))
  assert results["player_steps"] == STEPS * 5 and results["episodes"] == 2
  assert results["by_players"]["2"]["subject_preservation"] == 1.0
  assert results["by_players"]["3"]["subject_preservation"] == pytest.approx(1 - 1 / (STEPS * 3))
  assert results["by_step"][str(step)]["subject_preservation"] == pytest.approx(1 - 1 / 5)
  assert results["by_step"][str(step + 1)]["subject_preservation"] == 1.0
  assert results["tracking_error_px"] is None  # no predicted coordinates were given
  table = report.markdown_table(results)
  assert "| 3 players |" in table and f"| step {STEPS} |" in table and "Detector on real frames" in table
  json.dumps(results)  # results.json must serialise


# ------------------------------------------------------------------------------------------------------------
# Action files


def _write(tmp_path, data, name="actions.json"):
  path = tmp_path / name
  path.write_text(json.dumps(data) if not isinstance(data, str) else data)
  return path


def test_action_file_time_and_player_major_agree(tmp_path):
  time_major = {"players": 3, "seed": 4, "layout": "rooms",
                "actions": [["FORWARD", "noop", "TURN_LEFT"], ["forward", "STRAFE_LEFT", 7]]}
  by_player = {"actions_by_player": [["FORWARD", "FORWARD"], ["NOOP", "STRAFE_LEFT"], ["TURN_LEFT", "INTERACT"]]}
  acts, meta = action_files.load_action_file(_write(tmp_path, time_major))
  acts2, meta2 = action_files.load_action_file(_write(tmp_path, by_player, "b.json"))
  expected = [[A.FORWARD, A.NOOP, A.TURN_LEFT], [A.FORWARD, A.STRAFE_LEFT, A.INTERACT]]
  np.testing.assert_array_equal(acts, expected)
  np.testing.assert_array_equal(acts2, expected)
  assert acts.dtype == np.int32
  assert meta == {"players": 3, "seed": 4, "layout": "rooms", "steps": 2}
  assert meta2 == {"players": 3, "steps": 2}


@pytest.mark.parametrize("data, message", [
    ({"actions": [["FORWARD", "JUMP"]]}, r"actions\[0\]\[1\] = 'JUMP' is not an action: expected one of NOOP, "
                                         r"FORWARD, BACKWARD, STRAFE_LEFT, STRAFE_RIGHT, TURN_LEFT, TURN_RIGHT, "
                                         r"INTERACT"),
    ({"actions_by_player": [["NOOP"], ["fwd"]]}, r"actions_by_player\[1\]\[0\] = 'fwd' is not an action"),
    ({"actions": [["NOOP", 9]]}, r"actions\[0\]\[1\] = 9, but the action space has 8 actions"),
    ({"actions": [["NOOP", True]]}, r"actions\[0\]\[1\] = True, expected an action name"),
    ({"players": 3, "actions": [["NOOP", "NOOP"]]}, r"players = 3, but the actions give 2 players per step"),
    ({"actions": [["NOOP", "NOOP"], ["NOOP"]]}, r"actions\[1\] has 1 entries but actions\[0\] has 2"),
    ({"actions_by_player": [["NOOP", "NOOP"], ["NOOP"]]},
     r"actions_by_player\[1\] has 1 steps but actions_by_player\[0\] has 2"),
    ({"actions": [["NOOP"] * 9]}, r"9 players, expected 1 to 8"),
    ({"actions": [["NOOP"]], "actions_by_player": [["NOOP"]]}, r"exactly one of .* found both"),
    ({"players": 2}, r"exactly one of .* found neither"),
    ({"actions": [], "players": 1}, r"expected a non-empty list"),
    ({"actions": [["NOOP"]], "sed": 3}, r"unknown keys \['sed'\]"),
    ({"actions": [["NOOP"]], "layout": "maze"}, r"layout = 'maze', expected one of open, rooms"),
    ({"actions": [["NOOP"]], "seed": -1}, r"seed = -1, expected a non-negative integer"),
    ([["NOOP"]], r"the top level is list, expected a JSON object"),
    ("{not json", r"is not valid JSON"),
])
def test_action_file_errors_name_the_problem(tmp_path, data, message):
  with pytest.raises(action_files.ActionFileError, match=message):
    action_files.load_action_file(_write(tmp_path, data))


def test_missing_action_file(tmp_path):
  with pytest.raises(action_files.ActionFileError, match="does not exist"):
    action_files.load_action_file(tmp_path / "nope.json")


def test_action_file_drives_replay(tmp_path):
  steps = [["TURN_RIGHT", "TURN_RIGHT"], ["TURN_RIGHT", "NOOP"]] + [["NOOP", "NOOP"]] * (STEPS - 2)
  acts, meta = action_files.load_action_file(_write(tmp_path, {"seed": 3, "layout": "open", "actions": steps}))
  truth = replay.replay_builtin(meta["seed"], meta["layout"], acts)
  np.testing.assert_array_equal(truth["orientations"][-1], (truth["orientations"][0] + [2, 1]) % 4)
  np.testing.assert_array_equal(truth["cells"][0], truth["cells"][-1])
  with pytest.raises(ValueError, match="unknown layout 'maze'"):
    replay.replay_builtin(3, "maze", acts)


def test_write_strip_lays_rows_out_sharp(tmp_path):
  from PIL import Image

  from ap_jax import viz

  red, blue = np.zeros((4, 6, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)
  red[..., 0], blue[..., 2] = 255, 255
  path = viz.write_strip([[red, red, red], [blue, blue, blue]], str(tmp_path / "s.png"), scale=2, gap=1)
  sheet = np.asarray(Image.open(path))
  assert sheet.shape == (2 * (2 * 4 + 1), 2 * (3 * 6 + 2), 3)
  assert tuple(sheet[0, 0]) == (255, 0, 0) and tuple(sheet[-1, -1]) == (0, 0, 255)
  assert tuple(sheet[8, 0]) == (40, 40, 40)  # the gap between the rows
  with pytest.raises(ValueError, match="equal length"):
    viz.write_strip([[red], [blue, blue]], str(tmp_path / "bad.png"))


def test_hold_initial_frame_baseline_scores_exactly_the_steps_where_nothing_changes(truth3, episodes):
  ep = next(e for e in episodes if len(e["colors"]) >= 3)
  case = cases_lib.Case(frame=truth3["frames"][0], positions=ep["positions"][0], actions=ep["actions"],
                        colors=ep["colors"], truth=truth3, name="t", seed=0)
  hold = run_lib.hold_initial_frame_baseline([case])
  cells, facing = np.asarray(truth3["cells"]), np.asarray(truth3["orientations"])
  unchanged = np.all(cells[1:] == cells[:-1], axis=-1) & (facing[1:] == facing[:-1])  # [T, P]
  assert hold["movement_accuracy"] == pytest.approx(unchanged.mean())
  assert hold["subject_preservation"] == 1.0  # every player is shown, once, in its own colour


def test_comparison_table_has_a_row_per_variant_and_one_for_the_static_baseline():
  row = lambda ma: dict(movement_accuracy=ma, subject_preservation=0.5, tracking_error_px=None, psnr=18.25,
                        by_players={"2": dict(movement_accuracy=ma)},
                        baselines={"hold_initial_frame": dict(movement_accuracy=0.5, subject_preservation=1.0,
                                                              psnr=21.75)})
  lines = report.comparison_markdown({"full": row(0.25), "global_actions": row(0.125)}, (1, 2),
                                     (2, 7)).splitlines()
  assert lines[2] == "| full | 0.250 | 0.500 | - | 18.2 |"
  assert lines[3] == "| global_actions | 0.125 | 0.500 | - | 18.2 |"
  assert lines[4] == "| (hold the initial frame) | 0.500 | 1.000 | - | 21.8 |"
  assert lines[-1] == "| global_actions | - | 0.125 |"
  # Melting Pot rows: the test split and the held-out substrates, each with its own held frame.
  full = dict(row(0.25), heldout=row(0.75))
  lines = report.comparison_markdown({"full": full, "global_actions": row(0.125)}, (1, 2), (2, 7)).splitlines()
  held = lines.index("Substrates held out of training:")
  assert lines[held + 4:held + 6] == ["| full | 0.750 | 0.500 | - | 18.2 |",
                                      "| (hold the initial frame) | 0.500 | 1.000 | - | 21.8 |"]
  assert "The training substrates' test split:" not in lines


def test_oracle_scores_a_datasets_true_frames_perfectly(tmp_path, capsys):
  from ap_jax import cli

  data, out = str(tmp_path / "data"), str(tmp_path / "oracle.json")
  assert cli.main(["data", "--episodes", "30", "--steps", "6", "--players", "1-8", "--out", data]) == 0
  assert cli.main(["eval", "--oracle", "--data", data, "--split", "test", "--episodes", "3", "--steps", "5",
                   "--out", out]) == 0
  results = json.load(open(out))
  assert results["oracle"] is True and results["model"] is None and results["episodes"][0]["steps"] == 5
  for name in ("movement_accuracy", "state_accuracy", "subject_preservation"):
    assert results[name] == 1.0, name
  assert results["detector"]["player_accuracy"] == 1.0 and results["detector"]["false_detections"] == 0.0
  assert set(results["by_substrate"]) <= set(gridgame.LAYOUTS)
  assert "| all | 1.000 |" in capsys.readouterr().out
  assert cli.main(["eval", "--oracle", "--out", out]) == 2
  assert "--oracle scores a dataset's true frames: give the dataset with --data DIR" in capsys.readouterr().err
  assert cli.main(["eval", "--out", out]) == 2
  assert "eval needs --workdir" in capsys.readouterr().err
