"""The built-in game: a small multi-player grid world in JAX, following Melting Pot's conventions.

Why it exists: ActionParty's data is multi-player game rollouts. Melting Pot is the paper's source, but it is a
heavy dependency that steps one environment per core. This game needs nothing but JAX, so thousands of episodes
come from one `jax.vmap`-ed call on any device, and it has the same ingredients the model must learn: several
coloured avatars with a visible facing, walls that block, collectibles, and the unified relative action space.

Dimension letters: N episodes, T actions, P player slots (`max_players`), Y, X grid cells, H, W pixels,
C = 3 colour channels, S = cell size in pixels.

Rules (deterministic given the seed):
- The map is a Y x X grid of cells. Cells outside the grid and wall cells block movement.
- Players 0..P-1 each occupy one cell, face N/E/S/W (0/1/2/3) and take one of the eight unified actions per
  step (see `ap_jax.actions`): moves are relative to the facing and never change it; turns change only it.
- All moves are simultaneous. A move succeeds iff its target cell is inside the grid, not a wall, not occupied
  by any player at the start of the step, and no other player targets the same cell in this step. Otherwise the
  player stays where it is. Consequences: two players never share a cell; two players trying to enter the same
  cell both stay (nobody is favoured, so the rule is symmetric in player slots and predictable from the frame);
  a player cannot step into a cell that another player is leaving in the same step; swaps are impossible.
- Items ("fruit") lie on floor cells and do not block. INTERACT collects the item on the cell in front of the
  player (the cell it faces), which disappears from the next frame; the player's score increments. Two players
  facing the same item both collect it (both score).
- Layouts: `open` (no inner walls), `rooms` (four rooms joined by one door in each wall segment), `corridors`
  (horizontal walls every third row with two gaps each), `random` (each cell a wall with probability
  `wall_density`). All are drawn from the episode's key, so maps vary between episodes.

Rendering: each cell is an S x S sprite. Floor is dark, walls grey, items a small gold square; a player is a
square of its own colour with a white bar on the side it faces. Player colours follow `PLAYER_COLORS`.
Positions in pixels are cell centres: (cell + 0.5) * S, (y, x) order.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ap_jax import actions as A

LAYOUTS: tuple[str, ...] = ("open", "rooms", "corridors", "random")
POLICIES: tuple[str, ...] = ("uniform", "sticky")

FLOOR_COLOR = (24, 24, 32)
WALL_COLOR = (112, 112, 120)
ITEM_COLOR = (255, 210, 0)
FACING_COLOR = (255, 255, 255)
# Eight well-separated colours (none close to the floor, wall, item or facing marker), one per player slot.
PLAYER_COLORS = np.array(
    [
        (230, 25, 75),  # red
        (60, 180, 75),  # green
        (0, 130, 200),  # blue
        (245, 130, 48),  # orange
        (145, 30, 180),  # purple
        (70, 230, 230),  # cyan
        (240, 50, 230),  # magenta
        (150, 95, 35),  # brown
    ],
    dtype=np.uint8,
)

# Sprite ids in the render atlas.
SPRITE_FLOOR, SPRITE_WALL, SPRITE_ITEM = 0, 1, 2
SPRITE_PLAYER0 = 3  # player p facing f is SPRITE_PLAYER0 + 4 * p + f


@dataclasses.dataclass(frozen=True)
class GameConfig:
  """Static shape of the game. Everything here is a compile-time constant of the jitted functions."""

  grid_height: int = 8
  grid_width: int = 8
  cell_size: int = 8
  max_players: int = A.MAX_PLAYERS
  item_density: float = 0.15
  wall_density: float = 0.12

  def __post_init__(self):
    if self.grid_height < 3 or self.grid_width < 3:
      raise ValueError(f"grid is {self.grid_height}x{self.grid_width} cells, expected at least 3x3")
    if self.cell_size < 4:
      raise ValueError(f"cell_size = {self.cell_size}, expected at least 4 pixels (the facing bar needs room)")
    if not 1 <= self.max_players <= len(PLAYER_COLORS):
      raise ValueError(f"max_players = {self.max_players}, expected 1 to {len(PLAYER_COLORS)}")
    if not 0.0 <= self.item_density < 1.0 or not 0.0 <= self.wall_density < 0.5:
      raise ValueError(
          f"item_density = {self.item_density} (expected [0, 1)), wall_density = {self.wall_density} "
          "(expected [0, 0.5))")

  @property
  def frame_shape(self) -> tuple[int, int, int]:
    return (self.grid_height * self.cell_size, self.grid_width * self.cell_size, 3)


def layout_id(name: str) -> int:
  if name not in LAYOUTS:
    raise ValueError(f"unknown layout {name!r}: expected one of {', '.join(LAYOUTS)}")
  return LAYOUTS.index(name)


def check_num_players(num_players: int, config: GameConfig) -> None:
  # A player needs a free cell; the random layout keeps at least half the cells free (wall_density < 0.5).
  limit = min(config.max_players, (config.grid_height * config.grid_width) // 2)
  if not 1 <= num_players <= limit:
    raise ValueError(
        f"num_players = {num_players}, but the built-in game on a {config.grid_height}x{config.grid_width} grid "
        f"allows 1 to {limit} players")


# ----------------------------------------------------------------------------------------------------------
# Maps and reset.


def _make_walls(key: jax.Array, layout: jax.Array, config: GameConfig) -> jax.Array:
  """Returns walls_YX (bool) for the traced layout id; every layout is drawn and one is selected."""
  ny, nx = config.grid_height, config.grid_width
  yy, xx = jnp.meshgrid(jnp.arange(ny), jnp.arange(nx), indexing="ij")
  k_doors, k_gaps, k_random = jax.random.split(key, 3)

  open_walls = jnp.zeros((ny, nx), bool)

  # Rooms: a cross through the middle, with one door in each of its four arms.
  cy, cx = ny // 2, nx // 2
  door = jax.random.uniform(k_doors, (4,))
  door_up = (door[0] * cy).astype(jnp.int32)  # row in [0, cy)
  door_down = cy + 1 + (door[1] * (ny - cy - 1)).astype(jnp.int32)
  door_left = (door[2] * cx).astype(jnp.int32)
  door_right = cx + 1 + (door[3] * (nx - cx - 1)).astype(jnp.int32)
  rooms = (xx == cx) | (yy == cy)
  rooms &= ~((xx == cx) & ((yy == door_up) | (yy == door_down)))
  rooms &= ~((yy == cy) & ((xx == door_left) | (xx == door_right)))

  # Corridors: walls on every third row (rows 2, 5, ...), each with two random gaps.
  gap_cols = jax.random.randint(k_gaps, (ny, 2), 0, nx)
  wall_row = (yy % 3 == 2) & (yy < ny - 1)
  is_gap = (xx == gap_cols[:, :1]) | (xx == gap_cols[:, 1:])
  corridors = wall_row & ~is_gap

  random_walls = jax.random.uniform(k_random, (ny, nx)) < config.wall_density

  return jnp.stack([open_walls, rooms, corridors, random_walls])[layout]


def _sample_distinct_cells(key: jax.Array, free_YX: jax.Array, count: int) -> jax.Array:
  """Samples `count` distinct free cells uniformly (as (y, x) int32), using random keys and top_k."""
  ny, nx = free_YX.shape
  scores = jax.random.uniform(key, (ny * nx,)) + free_YX.reshape(-1).astype(jnp.float32) * 2.0
  _, flat = jax.lax.top_k(scores, count)
  return jnp.stack([flat // nx, flat % nx], axis=-1).astype(jnp.int32)


def reset(key: jax.Array, num_players: jax.Array | int, layout: jax.Array | int, config: GameConfig) -> dict:
  """Creates the initial state of one episode. `num_players` and `layout` may be traced (vmap over them).

  State: walls [Y, X] bool, items [Y, X] bool, positions [P, 2] int32 (y, x), orientations [P] int32,
  active [P] bool (slots >= num_players are inactive: not drawn, never block), score [P] int32.
  """
  k_walls, k_cells, k_face, k_items = jax.random.split(key, 4)
  layout = jnp.asarray(layout, jnp.int32)
  walls = _make_walls(k_walls, layout, config)
  positions = _sample_distinct_cells(k_cells, ~walls, config.max_players)
  active = jnp.arange(config.max_players) < num_players
  # Park inactive players far outside the grid so that they never match a cell.
  positions = jnp.where(active[:, None], positions, -1000)
  orientations = jax.random.randint(k_face, (config.max_players,), 0, A.NUM_ORIENTATIONS, dtype=jnp.int32)
  occupied = _occupancy(positions, active, config)
  items = (jax.random.uniform(k_items, walls.shape) < config.item_density) & ~walls & ~occupied
  return dict(
      walls=walls,
      items=items,
      positions=positions,
      orientations=orientations,
      active=active,
      score=jnp.zeros((config.max_players,), jnp.int32),
  )


def _occupancy(positions: jax.Array, active: jax.Array, config: GameConfig) -> jax.Array:
  grid = jnp.zeros((config.grid_height, config.grid_width), bool)
  y = jnp.where(active, positions[:, 0], config.grid_height)  # out of range -> dropped
  return grid.at[y, positions[:, 1]].set(True, mode="drop")


# ----------------------------------------------------------------------------------------------------------
# Dynamics.


def step(state: dict, actions_P: jax.Array, config: GameConfig) -> dict:
  """Applies one joint action (int32 [P]) under the simultaneous-move rule in the module docstring."""
  deltas = jnp.asarray(A.ORIENTATION_DELTAS)
  move_rotation = jnp.asarray(A.MOVE_ROTATION)[actions_P]
  active = state["active"]
  pos, facing = state["positions"], state["orientations"]
  moving = (move_rotation >= 0) & active
  direction = (facing + jnp.maximum(move_rotation, 0)) % A.NUM_ORIENTATIONS
  target = pos + deltas[direction] * moving[:, None]

  ny, nx = config.grid_height, config.grid_width
  inside = (target[:, 0] >= 0) & (target[:, 0] < ny) & (target[:, 1] >= 0) & (target[:, 1] < nx)
  wall_hit = state["walls"][jnp.clip(target[:, 0], 0, ny - 1), jnp.clip(target[:, 1], 0, nx - 1)]
  same_cell = jnp.all(target[:, None, :] == pos[None, :, :], axis=-1)  # [mover i, occupant j]
  occupied = jnp.any(same_cell & active[None, :], axis=1)
  same_target = jnp.all(target[:, None, :] == target[None, :, :], axis=-1)
  others = ~jnp.eye(config.max_players, dtype=bool)
  contested = jnp.any(same_target & others & moving[None, :], axis=1)
  success = moving & inside & ~wall_hit & ~occupied & ~contested
  new_pos = jnp.where(success[:, None], target, pos)

  turn = jnp.asarray(A.TURN_DELTA)[actions_P]
  new_facing = jnp.where(active, (facing + turn) % A.NUM_ORIENTATIONS, facing)

  interacting = (actions_P == A.INTERACT) & active
  front = pos + deltas[facing]
  front_inside = (front[:, 0] >= 0) & (front[:, 0] < ny) & (front[:, 1] >= 0) & (front[:, 1] < nx)
  front_y = jnp.clip(front[:, 0], 0, ny - 1)
  front_x = jnp.clip(front[:, 1], 0, nx - 1)
  collects = interacting & front_inside & state["items"][front_y, front_x]
  items = state["items"].at[jnp.where(collects, front_y, ny), front_x].set(False, mode="drop")
  return dict(state, positions=new_pos, orientations=new_facing, items=items,
              score=state["score"] + collects.astype(jnp.int32))


# ----------------------------------------------------------------------------------------------------------
# Rendering.


@functools.lru_cache(maxsize=None)
def sprite_atlas(cell_size: int, max_players: int = A.MAX_PLAYERS) -> np.ndarray:
  """uint8 [3 + 4 * max_players, S, S, 3]: floor, wall, item, then each player in each facing."""
  s = cell_size
  atlas = np.zeros((3 + 4 * max_players, s, s, 3), np.uint8)
  atlas[:] = FLOOR_COLOR
  atlas[SPRITE_WALL] = WALL_COLOR
  lo, hi = s // 4, s - s // 4
  atlas[SPRITE_ITEM, lo:hi, lo:hi] = ITEM_COLOR
  margin = 1 if s >= 6 else 0
  bar = max(1, s // 4)
  for p in range(max_players):
    for f in range(4):
      sprite = atlas[SPRITE_PLAYER0 + 4 * p + f]
      sprite[margin:s - margin, margin:s - margin] = PLAYER_COLORS[p]
      inner = slice(margin + 1, s - margin - 1) if s >= 8 else slice(margin, s - margin)
      if f == A.NORTH:
        sprite[margin:margin + bar, inner] = FACING_COLOR
      elif f == A.SOUTH:
        sprite[s - margin - bar:s - margin, inner] = FACING_COLOR
      elif f == A.EAST:
        sprite[inner, s - margin - bar:s - margin] = FACING_COLOR
      else:
        sprite[inner, margin:margin + bar] = FACING_COLOR
  return atlas


def sprite_ids(state: dict, config: GameConfig) -> jax.Array:
  """int32 [Y, X]: which sprite each cell shows (players drawn over items and floor)."""
  ids = jnp.where(state["walls"], SPRITE_WALL, jnp.where(state["items"], SPRITE_ITEM, SPRITE_FLOOR))
  slot = jnp.arange(config.max_players)
  player_sprite = SPRITE_PLAYER0 + 4 * slot + state["orientations"]
  y = jnp.where(state["active"], state["positions"][:, 0], config.grid_height)
  return ids.at[y, state["positions"][:, 1]].set(player_sprite, mode="drop")


def render(state: dict, config: GameConfig) -> jax.Array:
  """uint8 [H, W, 3] frame of one state."""
  atlas = jnp.asarray(sprite_atlas(config.cell_size, config.max_players))
  tiles = atlas[sprite_ids(state, config)]  # [Y, X, S, S, C]
  ny, nx, s = config.grid_height, config.grid_width, config.cell_size
  return tiles.transpose(0, 2, 1, 3, 4).reshape(ny * s, nx * s, 3)


def pixel_positions(positions_P2: jax.Array, cell_size: int) -> jax.Array:
  """Cell (y, x) -> pixel centre (y, x), float32."""
  return (positions_P2.astype(jnp.float32) + 0.5) * cell_size


# ----------------------------------------------------------------------------------------------------------
# Policies and rollouts.


def sample_actions(key: jax.Array, steps: int, active_P: jax.Array, policy: str, sticky_p: float) -> jax.Array:
  """int32 [T, P] actions. `uniform`: i.i.d. over the 8 actions. `sticky`: repeat the previous action with
  probability sticky_p, otherwise draw uniformly, so trajectories look like play rather than jitter.
  Inactive slots get NOOP."""
  if policy not in POLICIES:
    raise ValueError(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")
  if not 0.0 <= sticky_p < 1.0:
    raise ValueError(f"sticky_p = {sticky_p}, expected a probability in [0, 1)")
  num_slots = active_P.shape[0]
  k_fresh, k_repeat = jax.random.split(key)
  fresh = jax.random.randint(k_fresh, (steps, num_slots), 0, A.NUM_ACTIONS, dtype=jnp.int32)
  if policy == "sticky":
    repeat = jax.random.bernoulli(k_repeat, sticky_p, (steps, num_slots))

    def carry_action(prev, inputs):
      new, rep = inputs
      act = jnp.where(rep, prev, new)
      return act, act

    _, fresh = jax.lax.scan(carry_action, fresh[0], (fresh, repeat))
  return jnp.where(active_P[None, :], fresh, A.NOOP).astype(jnp.int32)


def play(state: dict, actions_TP: jax.Array, config: GameConfig) -> dict:
  """Runs given actions from a state. Returns frames [T+1, H, W, 3], positions [T+1, P, 2] (cells, int32),
  orientations [T+1, P], items [T+1, Y, X], score [T+1, P], and the final state."""

  def one_step(s, a):
    s = step(s, a, config)
    return s, _observe(s, config)

  final, trajectory = jax.lax.scan(one_step, state, actions_TP)
  first = _observe(state, config)
  trajectory = jax.tree.map(lambda x0, xs: jnp.concatenate([x0[None], xs], axis=0), first, trajectory)
  trajectory["final_state"] = final
  return trajectory


def _observe(state: dict, config: GameConfig) -> dict:
  return dict(
      frames=render(state, config),
      cells=state["positions"],
      orientations=state["orientations"],
      items=state["items"],
      score=state["score"],
  )


@functools.partial(jax.jit, static_argnames=("config", "steps", "policy", "sticky_p"))
def rollout_batch(keys: jax.Array, num_players: jax.Array, layouts: jax.Array, *, config: GameConfig, steps: int,
                  policy: str = "sticky", sticky_p: float = 0.7) -> dict:
  """Generates a batch of N episodes with one vmapped call.

  keys: [N] episode keys; num_players, layouts: int32 [N]. Returns padded arrays over P = max_players slots:
  frames uint8 [N, T+1, H, W, 3], actions int32 [N, T, P], positions float32 [N, T+1, P, 2] (pixel centres),
  cells int32 [N, T+1, P, 2], orientations int32 [N, T+1, P], active bool [N, P], score int32 [N, T+1, P].
  """

  def one(key, n, layout):
    k_reset, k_policy = jax.random.split(key)
    state = reset(k_reset, n, layout, config)
    acts = sample_actions(k_policy, steps, state["active"], policy, sticky_p)
    traj = play(state, acts, config)
    return dict(
        frames=traj["frames"],
        actions=acts,
        positions=pixel_positions(traj["cells"], config.cell_size),
        cells=traj["cells"],
        orientations=traj["orientations"],
        active=state["active"],
        score=traj["score"],
    )

  return jax.vmap(one)(keys, num_players, layouts)


# ----------------------------------------------------------------------------------------------------------
# Episodes by seed: the unit the dataset stores and the evaluator replays.


def episode_spec(seed: int, players: tuple[int, int], layouts: tuple[str, ...] = LAYOUTS) -> tuple[int, int]:
  """(num_players, layout id) of the episode with this seed: drawn from the seed, so a seed names an episode."""
  lo, hi = players
  if not 1 <= lo <= hi <= A.MAX_PLAYERS:
    raise ValueError(f"players = {lo}-{hi}, expected 1 <= MIN <= MAX <= {A.MAX_PLAYERS}")
  for name in layouts:
    layout_id(name)
  rng = np.random.default_rng(np.uint64(seed) + np.uint64(0x5EED))
  return int(rng.integers(lo, hi + 1)), layout_id(layouts[int(rng.integers(len(layouts)))])


def episode_key(seed: int) -> jax.Array:
  return jax.random.key(np.uint32(seed % (1 << 32)))


def initial_state(seed: int, num_players: int, layout: int, config: GameConfig) -> dict:
  """The exact reset state of episode `seed` (as `generate_episodes` draws it), for replaying actions."""
  k_reset, _ = jax.random.split(episode_key(seed))
  return reset(k_reset, num_players, layout, config)


def generate_episodes(seeds: list[int], *, config: GameConfig, steps: int, players: tuple[int, int],
                      layouts: tuple[str, ...] = LAYOUTS, policy: str = "sticky",
                      sticky_p: float = 0.7) -> list[dict[str, Any]]:
  """Episodes in the dataset schema (`ap_jax.data.schema`), one per seed, trimmed to each episode's players."""
  if steps < 1:
    raise ValueError(f"steps = {steps}, expected at least 1")
  check_num_players(players[1], config)
  specs = [episode_spec(s, players, layouts) for s in seeds]
  keys = jnp.stack([episode_key(s) for s in seeds])
  batch = rollout_batch(keys, jnp.asarray([n for n, _ in specs], jnp.int32),
                        jnp.asarray([l for _, l in specs], jnp.int32), config=config, steps=steps,
                        policy=policy, sticky_p=sticky_p)
  batch = jax.device_get(batch)
  episodes = []
  for i, (seed, (n, layout)) in enumerate(zip(seeds, specs)):
    episodes.append(dict(
        frames=np.asarray(batch["frames"][i]),
        actions=np.asarray(batch["actions"][i, :, :n], np.int32),
        positions=np.asarray(batch["positions"][i, :, :n], np.float32),
        orientations=np.asarray(batch["orientations"][i, :, :n], np.int32),
        player_mask=np.ones((n,), bool),
        colors=PLAYER_COLORS[:n].copy(),
        source="builtin",
        substrate=LAYOUTS[layout],
        seed=int(seed),
        cell_size=int(config.cell_size),
    ))
  return episodes
