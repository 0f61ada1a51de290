"""Melting Pot rollouts: the environment's own positions agree with the unified actions, and episodes fit the schema.

Needs the `meltingpot` extra (`bash launch/install_meltingpot.sh`); skipped without it. Each environment is built a
handful of times per module (fixtures), so the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("meltingpot")

from ap_jax import actions as A  # noqa: E402
from ap_jax.data import meltingpot as M  # noqa: E402
from ap_jax.data import meltingpot_actions as MA  # noqa: E402
from ap_jax.data import meltingpot_substrates as MS  # noqa: E402
from ap_jax.data import schema  # noqa: E402

pytestmark = pytest.mark.meltingpot

# Three substrates with different player counts (their defaults): 2, 7 and 5.
SUBSTRATES = {"coins": 2, "commons_harvest__open": 7, "territory__inside_out": 5}
STEPS = 60
BIG_CANVAS = (200, 200)  # Holds all three world views unscaled (8 px cells).


@pytest.fixture(scope="module", params=sorted(SUBSTRATES))
def scripted(request):
  """Player 0 plays random movement and turn actions while the others stay still (so only walls block it)."""
  substrate = request.param
  n = SUBSTRATES[substrate]
  rng = np.random.default_rng(7)
  moves = [A.FORWARD] * 6 + [A.BACKWARD, A.STRAFE_LEFT, A.STRAFE_RIGHT, A.TURN_LEFT, A.TURN_RIGHT, A.NOOP]
  actions = np.full((STEPS, n), A.NOOP, np.int32)
  actions[:, 0] = rng.choice(moves, size=STEPS)
  return substrate, actions, M.rollout(substrate, n, actions, seed=3)


@pytest.fixture(scope="module", params=sorted(SUBSTRATES))
def episode(request):
  substrate = request.param
  return M.generate_episode(substrate, SUBSTRATES[substrate], 24, seed=11, canvas_hw=BIG_CANVAS)


def test_moves_and_turns_follow_the_environments_own_position(scripted):
  substrate, actions, raw = scripted
  cells, ori = raw["cells"], raw["orientations"]
  assert len(cells) == STEPS + 1
  h, w = (s // raw["sprite_size"] for s in raw["world"].shape[1:3])
  moved = {a: 0 for a in (A.FORWARD, A.BACKWARD, A.STRAFE_LEFT, A.STRAFE_RIGHT)}
  for t in range(STEPS):
    a, facing = int(actions[t, 0]), int(ori[t, 0])
    step = cells[t + 1, 0] - cells[t, 0]
    where = f"{substrate} t={t} action {A.ACTION_NAMES[a]} facing {A.ORIENTATION_NAMES[facing]} at {cells[t, 0]}"
    if a in moved:
      expected = A.ORIENTATION_DELTAS[(facing + A.MOVE_ROTATION[a]) % 4]
      # The cell may be a wall; then the avatar stays. It never moves anywhere else.
      assert step.tolist() in ([0, 0], expected.tolist()), f"{where}: moved by {step}, expected {expected} or 0"
      assert ori[t + 1, 0] == facing, f"{where}: facing changed to {ori[t + 1, 0]}"
      moved[a] += bool(step.any())
    else:
      assert not step.any(), f"{where}: moved by {step}"
      assert ori[t + 1, 0] == (facing + A.TURN_DELTA[a]) % 4, f"{where}: facing became {ori[t + 1, 0]}"
  assert moved[A.FORWARD] >= 5, f"{substrate}: FORWARD moved the avatar only {moved[A.FORWARD]} times"
  # The others did nothing and stayed where they were; everyone is inside the map.
  assert (cells[:, 1:] == cells[:1, 1:]).all() and (ori[:, 1:] == ori[:1, 1:]).all()
  assert ((cells >= 0) & (cells < np.array([h, w]))).all()


def test_forward_into_a_free_cell_moves_one_cell(scripted):
  """FORWARD into a cell known to be walkable (player 0 stood there before) and empty always moves one cell."""
  substrate, actions, raw = scripted
  cells = raw["cells"]
  checked = 0
  for t in np.flatnonzero(actions[:, 0] == A.FORWARD):
    target = cells[t, 0] + A.ORIENTATION_DELTAS[raw["orientations"][t, 0]]
    walkable = (cells[:t, 0] == target).all(-1).any()
    empty = not (cells[t, 1:] == target).all(-1).any()
    if walkable and empty:
      assert (cells[t + 1, 0] == target).all(), f"{substrate} t={t}: free cell {target} but stayed at {cells[t, 0]}"
      checked += 1
  assert checked >= 2, f"{substrate}: only {checked} FORWARD steps into known free cells"


def test_episode_matches_schema_and_canvas(episode):
  schema.validate_episode(episode)
  substrate = episode["substrate"]
  n = SUBSTRATES[substrate]
  assert episode["source"] == "meltingpot" and episode["frames"].shape == (25, *BIG_CANVAS, 3)
  assert episode["actions"].shape == (24, n) and episode["player_mask"].all()
  assert int(episode["cell_size"]) == 8  # Fits unscaled.
  pos = episode["positions"]
  assert ((pos >= 0) & (pos < np.array(BIG_CANVAS))).all()
  # Positions are cell centres: offset + (cell + 0.5) * cell_size, with one offset for all.
  frac = (pos - 4.0) % 8
  assert np.allclose(frac, frac[0, 0]), "positions are not on one cell grid"


def test_each_player_colour_is_drawn_at_its_position(episode):
  frames, pos, colours = episode["frames"], episode["positions"], episode["colors"]
  half = int(episode["cell_size"]) // 2
  assert len({tuple(c) for c in colours}) == len(colours), "these substrates give each player its own colour"
  for i, colour in enumerate(colours):
    y, x = (int(v) for v in pos[0, i])
    patch = frames[0, y - half:y + half, x - half:x + half].reshape(-1, 3).astype(int)
    assert (np.abs(patch - colour).max(-1) <= 8).any(), (
        f"{episode['substrate']}: player {i}'s colour {colour} is not drawn in its cell at {(y, x)}")


def test_downscaled_canvas_keeps_cells_square_and_positions_inside():
  ep = M.generate_episode("commons_harvest__open", 3, 4, seed=5, canvas_hw=(64, 80))
  # 144 x 192 px does not fit 64 x 80: k = 4 (the smallest divisor of 8 that fits) gives 36 x 48 px, 2 px cells.
  assert int(ep["cell_size"]) == 2 and ep["frames"].shape[1:3] == (64, 80)
  k, (top, left) = M.canvas_layout((144, 192), (64, 80))
  assert (k, top, left) == (4, 14, 16)
  assert not ep["frames"][:, :top].any() and not ep["frames"][:, top + 36:].any()  # black padding
  pos = ep["positions"]
  assert ((pos >= [top, left]) & (pos < [top + 36, left + 48])).all()
  assert np.allclose((pos - [top, left]) % 2, 1.0)


def test_same_seed_same_episode_and_different_seed_differs():
  a = M.generate_episode("commons_harvest__open", 4, 30, seed=21, policy="uniform")
  b = M.generate_episode("commons_harvest__open", 4, 30, seed=21, policy="uniform")
  c = M.generate_episode("commons_harvest__open", 4, 30, seed=22, policy="uniform")
  for key in ("frames", "actions", "positions", "orientations", "colors"):
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert not np.array_equal(a["positions"], c["positions"])


def test_sticky_policy_repeats_actions():
  rng = np.random.default_rng(0)
  sticky = M.sample_actions(rng, 4000, 2, "sticky", sticky_p=0.7)
  uniform = M.sample_actions(rng, 4000, 2, "uniform")
  repeat = lambda acts: (acts[1:] == acts[:-1]).mean()  # noqa: E731
  assert 0.7 < repeat(sticky) < 0.8  # 0.7 + 0.3 / 8
  assert 0.1 < repeat(uniform) < 0.15  # 1 / 8
  assert set(np.unique(uniform)) == set(range(A.NUM_ACTIONS))


def test_action_table_covers_every_substrate():
  names = MS.list_substrates()
  assert len(names) >= 49
  for name in names:
    table = MA.unified_action_table(name)
    dicts = MA.unified_action_dicts(name)
    assert len(table) == A.NUM_ACTIONS
    assert dicts[:A.INTERACT] == [{}, {"move": 1}, {"move": 3}, {"move": 4}, {"move": 2}, {"turn": -1}, {"turn": 1}]
    assert (dicts[A.INTERACT] == {}) == (MA.unexpressed_actions(name) == ["INTERACT"])
    assert MS.player_counts(name), name
  assert MA.unexpressed_actions("coins") == ["INTERACT"]
  assert MA.unified_action_dicts("commons_harvest__open")[A.INTERACT] == {"fireZap": 1}
  assert MA.unified_action_dicts("collaborative_cooking__ring")[A.INTERACT] == {"interact": 1}
  markdown = MA.action_table_markdown()
  assert all(f"`{name}`" in markdown for name in names)


def test_player_counts_match_what_the_environment_accepts():
  assert M.probe_player_counts("coins", candidates=(1, 2, 3), steps=2) == MS.player_counts("coins") == (2,)
  assert M.probe_player_counts("paintball__king_of_the_hill", candidates=(3, 4), steps=2) == (4,)
  assert 3 not in MS.player_counts("paintball__king_of_the_hill")


@pytest.mark.parametrize("kwargs, message", [
    (dict(substrate="coinz"), "unknown Melting Pot substrate 'coinz': expected one of .*commons_harvest__open"),
    (dict(num_players=3), r"num_players = 3 for substrate 'coins', expected one of 2"),
    (dict(substrate="paintball__king_of_the_hill", num_players=3), r"num_players = 3 .* expected one of 2, 4, 6, 8"),
    (dict(steps=0), "steps = 0, expected an integer of at least 1"),
    (dict(seed=-1), "seed = -1"),
    (dict(policy="greedy"), "policy = 'greedy', expected one of uniform, sticky"),
    (dict(sticky_p=1.5), "sticky_p = 1.5"),
    (dict(canvas_hw=(8, 8)), r"canvas_hw = \(8, 8\) is too small .*\(17 x 17\)"),
])
def test_bad_input_is_named(kwargs, message):
  args = dict(substrate="coins", num_players=2, steps=4, seed=0) | kwargs
  with pytest.raises(ValueError, match=message):
    M.generate_episode(args.pop("substrate"), args.pop("num_players"), args.pop("steps"), args.pop("seed"), **args)
