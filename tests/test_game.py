"""The built-in grid game: movement relative to facing, walls, collisions, items, determinism, rendering."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ap_jax import actions as A
from ap_jax.data import schema
from ap_jax.games import gridgame as G

CONFIG = G.GameConfig(grid_height=7, grid_width=7, cell_size=8, max_players=4)

# Expected (dy, dx) of each movement action for each facing, written out by hand (not derived from the code's
# tables): FORWARD goes where the player faces; BACKWARD opposite; STRAFE_LEFT to its left hand.
EXPECTED_MOVE = {
    (A.NORTH, A.FORWARD): (-1, 0), (A.NORTH, A.BACKWARD): (1, 0),
    (A.NORTH, A.STRAFE_LEFT): (0, -1), (A.NORTH, A.STRAFE_RIGHT): (0, 1),
    (A.EAST, A.FORWARD): (0, 1), (A.EAST, A.BACKWARD): (0, -1),
    (A.EAST, A.STRAFE_LEFT): (-1, 0), (A.EAST, A.STRAFE_RIGHT): (1, 0),
    (A.SOUTH, A.FORWARD): (1, 0), (A.SOUTH, A.BACKWARD): (-1, 0),
    (A.SOUTH, A.STRAFE_LEFT): (0, 1), (A.SOUTH, A.STRAFE_RIGHT): (0, -1),
    (A.WEST, A.FORWARD): (0, -1), (A.WEST, A.BACKWARD): (0, 1),
    (A.WEST, A.STRAFE_LEFT): (1, 0), (A.WEST, A.STRAFE_RIGHT): (-1, 0),
}
EXPECTED_TURN = {A.TURN_LEFT: {A.NORTH: A.WEST, A.WEST: A.SOUTH, A.SOUTH: A.EAST, A.EAST: A.NORTH},
                 A.TURN_RIGHT: {A.NORTH: A.EAST, A.EAST: A.SOUTH, A.SOUTH: A.WEST, A.WEST: A.NORTH}}


def make_state(positions, orientations, walls=(), items=(), config=CONFIG):
  n = len(positions)
  pos = np.full((config.max_players, 2), -1000, np.int32)
  pos[:n] = positions
  ori = np.zeros((config.max_players,), np.int32)
  ori[:n] = orientations
  wall_grid = np.zeros((config.grid_height, config.grid_width), bool)
  for y, x in walls:
    wall_grid[y, x] = True
  item_grid = np.zeros_like(wall_grid)
  for y, x in items:
    item_grid[y, x] = True
  return dict(walls=jnp.asarray(wall_grid), items=jnp.asarray(item_grid), positions=jnp.asarray(pos),
              orientations=jnp.asarray(ori), active=jnp.arange(config.max_players) < n,
              score=jnp.zeros((config.max_players,), jnp.int32))


def act(*per_player, config=CONFIG):
  a = np.zeros((config.max_players,), np.int32)
  a[:len(per_player)] = per_player
  return jnp.asarray(a)


@pytest.mark.parametrize("facing,action", list(itertools.product(range(4), range(A.NUM_ACTIONS))))
def test_every_action_in_every_facing(facing, action):
  state = make_state([(3, 3)], [facing])
  new = G.step(state, act(action), CONFIG)
  dy, dx = EXPECTED_MOVE.get((facing, action), (0, 0))
  assert tuple(np.asarray(new["positions"][0])) == (3 + dy, 3 + dx)
  expected_facing = EXPECTED_TURN.get(action, {}).get(facing, facing)
  assert int(new["orientations"][0]) == expected_facing


def test_walls_and_edges_block():
  state = make_state([(3, 3), (0, 0)], [A.NORTH, A.WEST], walls=[(2, 3)])
  new = G.step(state, act(A.FORWARD, A.FORWARD), CONFIG)
  np.testing.assert_array_equal(new["positions"][:2], [[3, 3], [0, 0]])
  new = G.step(state, act(A.STRAFE_RIGHT, A.STRAFE_RIGHT), CONFIG)  # east of (3,3) free; north of (0,0) edge
  np.testing.assert_array_equal(new["positions"][:2], [[3, 4], [0, 0]])


def test_two_players_into_one_cell_both_stay():
  state = make_state([(3, 2), (3, 4)], [A.EAST, A.WEST])
  new = G.step(state, act(A.FORWARD, A.FORWARD), CONFIG)
  np.testing.assert_array_equal(new["positions"][:2], [[3, 2], [3, 4]])


def test_cannot_enter_a_cell_being_vacated_and_no_swaps():
  # Player 0 follows player 1 eastwards: 1 moves, 0 is blocked by where 1 stood at the start of the step.
  state = make_state([(3, 2), (3, 3)], [A.EAST, A.EAST])
  new = G.step(state, act(A.FORWARD, A.FORWARD), CONFIG)
  np.testing.assert_array_equal(new["positions"][:2], [[3, 2], [3, 4]])
  # Facing each other side by side: a swap would need both to enter occupied cells.
  state = make_state([(3, 2), (3, 3)], [A.EAST, A.WEST])
  new = G.step(state, act(A.FORWARD, A.FORWARD), CONFIG)
  np.testing.assert_array_equal(new["positions"][:2], [[3, 2], [3, 3]])


def test_interact_collects_the_item_in_front_only():
  state = make_state([(3, 3), (5, 5)], [A.NORTH, A.SOUTH], items=[(2, 3), (4, 5), (3, 4)])
  new = G.step(state, act(A.INTERACT, A.INTERACT), CONFIG)
  items = np.asarray(new["items"])
  assert not items[2, 3]  # in front of player 0: collected
  assert items[4, 5]  # behind player 1: untouched
  assert items[3, 4]
  np.testing.assert_array_equal(new["score"][:2], [1, 0])
  frame = np.asarray(G.render(new, CONFIG))
  s = CONFIG.cell_size
  assert not np.any(np.all(frame[2 * s:3 * s, 3 * s:4 * s] == G.ITEM_COLOR, axis=-1))
  assert np.any(np.all(frame[4 * s:5 * s, 5 * s:6 * s] == G.ITEM_COLOR, axis=-1))


def test_inactive_players_neither_block_nor_show():
  state = make_state([(3, 3)], [A.EAST])
  new = G.step(state, act(A.FORWARD, A.FORWARD, A.FORWARD, A.FORWARD), CONFIG)
  np.testing.assert_array_equal(new["positions"][0], [3, 4])
  np.testing.assert_array_equal(new["positions"][1:], state["positions"][1:])
  frame = np.asarray(G.render(new, CONFIG))
  for color in G.PLAYER_COLORS[1:CONFIG.max_players]:
    assert not np.any(np.all(frame == color, axis=-1))


def _rollout(seeds, players=(1, 4), steps=12, config=CONFIG):
  return G.generate_episodes(list(seeds), config=config, steps=steps, players=players)


def test_rollouts_keep_players_apart_and_off_walls():
  config = CONFIG
  seeds = list(range(24))
  keys = jnp.stack([G.episode_key(s) for s in seeds])
  specs = [G.episode_spec(s, (2, 4)) for s in seeds]
  batch = G.rollout_batch(keys, jnp.asarray([n for n, _ in specs]), jnp.asarray([l for _, l in specs]),
                          config=config, steps=20, policy="uniform")
  cells, active = np.asarray(batch["cells"]), np.asarray(batch["active"])
  for i, (n, layout) in enumerate(specs):
    state = G.reset(jax.random.split(G.episode_key(seeds[i]))[0], n, layout, config)
    walls = np.asarray(state["walls"])
    for t in range(cells.shape[1]):
      c = cells[i, t, :n]
      assert len({tuple(x) for x in c}) == n, f"episode {i} step {t}: players share a cell {c}"
      assert not walls[c[:, 0], c[:, 1]].any()
      if t:
        assert np.abs(c - cells[i, t - 1, :n]).sum(-1).max() <= 1  # at most one cell per step
  assert active.sum(1).tolist() == [n for n, _ in specs]


def test_deterministic_given_seed_and_varied_across_seeds():
  a = _rollout(range(6))
  b = _rollout(range(6))
  for ea, eb in zip(a, b):
    for key in ("frames", "actions", "positions", "orientations"):
      np.testing.assert_array_equal(ea[key], eb[key])
  c = _rollout(range(6, 12))
  assert not np.array_equal(a[0]["frames"], c[0]["frames"])
  layouts = {e["substrate"] for e in _rollout(range(40), steps=2)}
  assert layouts == set(G.LAYOUTS)


def test_replaying_actions_from_the_initial_state_reproduces_the_episode():
  ep = _rollout([123])[0]
  n, layout = G.episode_spec(123, (1, 4))
  state = G.initial_state(123, n, layout, CONFIG)
  actions = np.zeros((ep["actions"].shape[0], CONFIG.max_players), np.int32)
  actions[:, :n] = ep["actions"]
  traj = G.play(state, jnp.asarray(actions), CONFIG)
  np.testing.assert_array_equal(np.asarray(traj["frames"]), ep["frames"])


def test_rendering_agrees_with_positions_and_facing():
  s = CONFIG.cell_size
  for ep in _rollout(range(8), players=(4, 4)):
    schema.validate_episode(ep)
    for t in range(ep["frames"].shape[0]):
      for p in range(ep["actions"].shape[1]):
        y, x = ep["positions"][t, p]
        cy, cx = int(y // s), int(x // s)
        assert (cy + 0.5) * s == y and (cx + 0.5) * s == x  # pixel centres of cells
        tile = ep["frames"][t, cy * s:(cy + 1) * s, cx * s:(cx + 1) * s]
        assert np.all(tile[s // 2, s // 2] == ep["colors"][p]), f"player {p} colour not at its position"
        # The white facing bar lies on the side the player faces.
        white = np.all(tile == G.FACING_COLOR, axis=-1)
        ys, xs = np.nonzero(white)
        assert ys.size, "no facing bar drawn"
        dy, dx = A.ORIENTATION_DELTAS[ep["orientations"][t, p]]
        center = (s - 1) / 2
        assert np.sign(round(ys.mean() - center)) == dy and np.sign(round(xs.mean() - center)) == dx


def test_sticky_policy_repeats_actions():
  key = jax.random.key(0)
  active = jnp.ones((8,), bool)
  sticky = np.asarray(G.sample_actions(key, 400, active, "sticky", 0.8))
  uniform = np.asarray(G.sample_actions(key, 400, active, "uniform", 0.8))
  repeat_sticky = (sticky[1:] == sticky[:-1]).mean()
  repeat_uniform = (uniform[1:] == uniform[:-1]).mean()
  assert 0.78 < repeat_sticky < 0.9  # 0.8 + 0.2 / 8 expected
  assert repeat_uniform < 0.2
  assert set(np.unique(uniform)) == set(range(A.NUM_ACTIONS))


def test_bad_game_input():
  with pytest.raises(ValueError, match="unknown layout 'maze'"):
    G.layout_id("maze")
  with pytest.raises(ValueError, match="num_players = 9"):
    G.check_num_players(9, G.GameConfig())
  with pytest.raises(ValueError, match="cell_size = 2"):
    G.GameConfig(cell_size=2)
  with pytest.raises(ValueError, match="unknown policy 'greedy'"):
    G.sample_actions(jax.random.key(0), 3, jnp.ones((2,), bool), "greedy", 0.5)
  with pytest.raises(ValueError, match=r"actions\[1, 0\] = 9, but the action space has 8 actions"):
    A.check_actions(np.array([[0, 1], [9, 2]]))
