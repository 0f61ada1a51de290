"""The detector learned from labelled true frames (ap_jax.eval.template_detector, on the grid of
ap_jax.eval.cell_grid), fitted for Melting Pot (ap_jax.eval.learned_detector), and scoring with it.

On the built-in game (no extra needed) the learned detector must read true frames exactly as the hand-built one
does. On Melting Pot (the `meltingpot` extra; skipped without it) it must read held-out true frames of several
substrates, a perfect rollout must score 1, a rollout with two players' actions exchanged must score exactly what
the true states say, and removed avatars must be left out instead of counted as lost.
"""

from __future__ import annotations

import numpy as np
import pytest

from ap_jax import actions as A
from ap_jax.eval import cell_grid, detector, learned_detector as L, metrics, replay
from ap_jax.eval.template_detector import TemplateDetector
from ap_jax.games import gridgame

CONFIG = gridgame.GameConfig()
GRID = cell_grid.Grid(cell_size=CONFIG.cell_size, top=0, left=0, rows=CONFIG.grid_height, cols=CONFIG.grid_width)


def _builtin(seeds, steps=12):
  """Stacked true frames, cells, orientations of built-in episodes with 8 players (colours line up by index)."""
  eps = gridgame.generate_episodes(list(seeds), config=CONFIG, steps=steps, players=(8, 8))
  frames = np.concatenate([e["frames"] for e in eps])
  cells = np.concatenate([(e["positions"] // CONFIG.cell_size).astype(np.int32) for e in eps])
  orientations = np.concatenate([e["orientations"] for e in eps])
  return frames, cells, orientations, eps[0]["colors"]


@pytest.fixture(scope="module")
def builtin_fit():
  frames, cells, orientations, colors = _builtin(range(900, 916))
  visible = np.ones(cells.shape[:2], bool)
  return TemplateDetector.fit(frames, cells, orientations, visible, colors, GRID, name="builtin")


def test_grid_tiles_and_centres():
  grid = cell_grid.Grid(cell_size=2, top=3, left=5, rows=4, cols=6)
  frames = np.zeros((2, 16, 20, 3), np.uint8)
  frames[1, 3 + 2 * 2:3 + 3 * 2, 5 + 4 * 2:5 + 5 * 2] = 200  # cell (2, 4) of frame 1
  tiles = grid.tiles(frames)
  assert tiles.shape == (2, 4, 6, 12)
  assert tiles[1, 2, 4].min() == 200 and tiles.sum() == 200 * 12
  np.testing.assert_array_equal(grid.centres(np.array([[2, 4]])), [[3 + 2.5 * 2, 5 + 4.5 * 2]])
  with pytest.raises(ValueError, match="too small for 4 x 6 cells"):
    grid.tiles(np.zeros((1, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="Grid.cell_size = 0"):
    cell_grid.Grid(cell_size=0, top=0, left=0, rows=1, cols=1)


def test_the_melting_pot_module_still_names_the_grid_and_the_detector():
  assert L.Grid is cell_grid.Grid and L.player_visible is cell_grid.player_visible
  assert L.TemplateDetector is TemplateDetector


def test_learned_detector_reads_builtin_frames_as_the_hand_built_one(builtin_fit):
  frames, cells, orientations, colors = _builtin(range(950, 958))
  visible = np.ones(cells.shape[:2], bool)
  acc = builtin_fit.accuracy(frames, cells, orientations, visible)
  assert acc["player_accuracy"] == 1.0 and acc["false_detections"] == 0.0
  assert acc["player_instances"] == cells.shape[0] * 8 and acc["skipped_instances"] == 0
  assert acc["groups"] == [] and acc["facing_unreadable"] == []
  learned, drawn = builtin_fit.detect(frames), detector.detect(frames, colors, CONFIG.cell_size)
  np.testing.assert_array_equal(learned.count_NP, drawn.count_NP)
  np.testing.assert_array_equal(learned.cells_NP2, drawn.cells_NP2)
  np.testing.assert_array_equal(learned.facing_NP, drawn.facing_NP)
  np.testing.assert_array_equal(learned.centres_NP2, drawn.centres_NP2)


def test_learned_detector_reads_blurred_frames(builtin_fit):
  frames, cells, orientations, _ = _builtin(range(960, 964))
  blurred = detector.perturb(frames, "blur1.0", np.random.default_rng(0))
  acc = builtin_fit.accuracy(blurred, cells, orientations, np.ones(cells.shape[:2], bool))
  assert acc["player_accuracy"] >= 0.99


def test_players_of_one_colour_are_a_group_and_are_not_scored():
  frames, cells, orientations, colors = _builtin(range(900, 904))
  colors = colors.copy()
  colors[5] = colors[2]  # as if players 2 and 5 were drawn alike
  visible = np.ones(cells.shape[:2], bool)
  det = TemplateDetector.fit(frames, cells, orientations, visible, colors, GRID)
  assert (2, 5) in det.groups
  assert not det.identifiable[2] and not det.identifiable[5] and det.identifiable[[0, 1, 3, 4, 6, 7]].all()
  acc = det.accuracy(frames, cells, orientations, visible)
  assert acc["skipped_instances"] == 2 * len(frames) and acc["groups"] == [[2, 5]]
  assert acc["player_instances"] == 6 * len(frames)


def test_player_visible_sees_an_erased_avatar():
  frames, cells, _, colors = _builtin(range(970, 971), steps=3)
  assert cell_grid.player_visible(frames, cells, colors, GRID).all()
  erased = frames.copy()
  y, x = cells[2, 4]
  erased[2, y * 8:(y + 1) * 8, x * 8:(x + 1) * 8] = gridgame.FLOOR_COLOR
  visible = cell_grid.player_visible(erased, cells, colors, GRID)
  assert not visible[2, 4] and visible.sum() == visible.size - 1
  outside = cells.copy()
  outside[0, 0] = (-1, 0)
  assert not cell_grid.player_visible(frames, outside, colors, GRID)[0, 0]


def test_save_and_load_round_trip(builtin_fit, tmp_path):
  path = builtin_fit.save(str(tmp_path / "d" / "builtin.npz"))
  loaded = TemplateDetector.load(path)
  assert loaded.grid == builtin_fit.grid and loaded.groups == builtin_fit.groups
  np.testing.assert_array_equal(loaded.masks_LVD, builtin_fit.masks_LVD)
  assert [p.name for p in (tmp_path / "d").iterdir()] == ["builtin.npz"]  # no temporary file left behind
  frames, *_ = _builtin(range(980, 981), steps=3)
  np.testing.assert_array_equal(loaded.detect(frames).cells_NP2, builtin_fit.detect(frames).cells_NP2)


def test_fit_rejects_mismatched_shapes():
  frames, cells, orientations, colors = _builtin(range(900, 901), steps=2)
  with pytest.raises(ValueError, match=r"expected \[N, H, W, 3\], \[N, P, 2\], \[N, P\], \[N, P\]"):
    TemplateDetector.fit(frames, cells, orientations[:1], np.ones(cells.shape[:2], bool), colors, GRID)
  with pytest.raises(ValueError, match=r"colors has shape \(7, 3\), expected \[8, 3\]"):
    TemplateDetector.fit(frames, cells, orientations, np.ones(cells.shape[:2], bool), colors[:7], GRID)


# ------------------------------------------------------------------------------------------------------------
# Melting Pot

CANVAS = (256, 256)  # holds these substrates' world views unscaled (8 px cells), as the dataset's default canvas
# Distinct players: clean_up (in the default run), commons_harvest, territory (walls painted in the players'
# colours). Drawn alike: chemistry (every avatar) and the *_in_the_matrix__repeated squares (all white).
SUBSTRATES = {"clean_up": 3, "chemistry__two_metabolic_cycles": 3, "commons_harvest__open": 4,
              "territory__inside_out": 3, "prisoners_dilemma_in_the_matrix__repeated": 2}
# territory's paint beams cover the avatar they pass over in about 4% of held-out random-play instances (seen in
# the frames); the metrics skip instances the true frame does not show readably.
MIN_ACCURACY = {"territory__inside_out": 0.95}
LOOK_ALIKE = ("chemistry__two_metabolic_cycles", "prisoners_dilemma_in_the_matrix__repeated")
DEFAULT_RUN = ("clean_up",)  # the rest are marked slow (1-5 min each on 2 busy cores)


@pytest.fixture(scope="module")
def mp():
  module = pytest.importorskip("ap_jax.data.meltingpot")
  from ap_jax.data import meltingpot_substrates
  try:
    meltingpot_substrates.import_meltingpot()
  except ImportError as e:
    pytest.skip(f"Melting Pot is not installed: {e}")
  return module


def _detector(substrate, players):
  return L.meltingpot_detector(substrate, players, CANVAS, fit_episodes=6, check_episodes=3, steps=30, cache=False)


@pytest.mark.meltingpot
@pytest.mark.parametrize("substrate", [s if s in DEFAULT_RUN else pytest.param(s, marks=pytest.mark.slow)
                                       for s in SUBSTRATES])
def test_meltingpot_detector_reads_held_out_true_frames(mp, substrate):
  det = _detector(substrate, SUBSTRATES[substrate])
  check = det.info["check"]
  if substrate in LOOK_ALIKE:  # every avatar is drawn alike: identity cannot be read, and it says so
    assert check["groups"] == [list(range(SUBSTRATES[substrate]))] and check["player_instances"] == 0
    assert check["player_accuracy"] is None and check["skipped_instances"] > 0
    return
  assert check["groups"] == []
  assert check["player_accuracy"] >= MIN_ACCURACY.get(substrate, 0.99), check
  assert check["false_detections"] <= 0.01, check


@pytest.mark.meltingpot
@pytest.mark.slow
def test_colours_drawn_per_episode_are_not_guessed(mp):
  """coins draws its two players' colours per episode: the detector reads only episodes of its fitted colours,
  and scoring an episode of other colours leaves every player unscored instead of guessing."""
  det = _detector("coins", 2)
  assert det.info["colours_vary_by_episode"]
  other = next(t for t in L._random_rollouts("coins", 2, CANVAS, range(20), 4)
               if not np.array_equal(t["colors"], det.colors))
  scores = metrics.score_rollout(other["frames"], other, reader=det)
  assert np.isnan(scores["movement_accuracy"]).all() and np.isnan(scores["subject_preservation"]).all()


@pytest.mark.meltingpot
def test_meltingpot_true_frames_score_perfectly_and_exchanged_actions_score_as_the_states_say(mp):
  substrate, players, steps = "clean_up", 3, 20  # the default run's detector (fitted once per process)
  actions = mp.sample_actions(np.random.default_rng(3), steps, players, "sticky")
  actions[actions == A.INTERACT] = A.FORWARD  # no zapping: every player stays on the board
  truth = replay.replay_meltingpot(substrate, 11, actions, CANVAS)
  reader = _detector(substrate, players)
  perfect = metrics.score_rollout(truth["frames"], truth, pred_positions=truth["positions"], reader=reader)
  for name in ("movement_accuracy", "state_accuracy", "subject_preservation"):
    assert np.nanmean(perfect[name]) == 1.0, name
  assert np.nanmean(perfect["tracking_error_px"]) == 0.0
  assert perfect["interact_accuracy"] is None and perfect["extra_players"] is None

  exchanged = actions.copy()
  exchanged[:, [0, 1]] = actions[:, [1, 0]]
  other = replay.replay_meltingpot(substrate, 11, exchanged, CANVAS)
  scores = metrics.score_rollout(other["frames"], truth, reader=reader)
  moved = np.all(np.diff(other["cells"], axis=0) == np.diff(truth["cells"], axis=0), axis=-1)
  turned = (np.diff(other["orientations"], axis=0) % 4) == (np.diff(truth["orientations"], axis=0) % 4)
  np.testing.assert_array_equal(scores["movement_accuracy"], (moved & turned).astype(np.float32))
  assert np.mean(scores["movement_accuracy"][:, :2]) < 1.0
  assert np.all(scores["subject_preservation"] == 1.0)


@pytest.mark.meltingpot
@pytest.mark.slow
def test_removed_avatars_are_not_counted_as_lost(mp):
  substrate, players = "commons_harvest__open", 6
  truth = None
  for seed in range(40):  # uniform play with 6 players zaps someone within a few seeds
    acts = mp.sample_actions(np.random.default_rng(seed), 40, players, "uniform")
    candidate = replay.replay_meltingpot(substrate, seed, acts, CANVAS)
    if not candidate["visible"].all():
      truth = candidate
      break
  assert truth is not None, "no avatar was removed in 40 random episodes"
  reader = _detector(substrate, players)
  scores = metrics.score_rollout(truth["frames"], truth, reader=reader)
  hidden = ~truth["visible"][1:]
  assert np.isnan(scores["subject_preservation"][hidden]).all()
  assert np.nanmean(scores["subject_preservation"]) == 1.0
  assert np.nanmean(scores["movement_accuracy"]) == 1.0
  # The true frame really lacks the avatar: the detector does not find it there.
  t, p = np.argwhere(~truth["visible"])[0]
  assert reader.detect(truth["frames"][t]).count_NP[p] == 0
