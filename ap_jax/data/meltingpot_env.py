"""One Melting Pot episode's DMLab2D environment: settings that report positions, player colours, determinism.

Needs the `meltingpot` extra (`bash launch/install_meltingpot.sh`); importing this module does not.

The substrate's DMLab2D settings are built as Melting Pot builds them (`meltingpot.utils.substrates.builder`), with
one addition: every avatar object gets DMLab2D's `LocationObserver` component (`objectIsAvatar=True,
alsoReportOrientation=True`), so the environment itself reports `N.POSITION` and `N.ORIENTATION` for player N.
Positions and facings are never guessed from pixels. We drive the raw `dmlab2d.Lab2d` and ask it for only
`WORLD.RGB` and those two observations: Melting Pot's wrappers would also render every player's egocentric view,
which the world model does not use. A fresh `Lab2d` is built per episode, as Melting Pot's own reset does.

Conventions, checked against the environment (tests/test_meltingpot.py):
- `N.POSITION` is the avatar's cell as (x, y) = (column, row); we store (y, x). FORWARD while facing North lowers
  y by one.
- `N.ORIENTATION` is 0=N, 1=E, 2=S, 3=W (component_library.lua `_ORIENTATION_TO_INT`), the same as
  `ap_jax.actions`. TURN_RIGHT adds one (mod 4).

Colours: player i's colour is the main colour of its sprite: the palette's body colour `'*'` (Melting Pot's avatar
palette), or for sprites without one (`predator_prey__*`) the opaque palette colour used most in the sprite. Some
substrates colour all players alike (`chemistry__*`, `predator_prey__*` within a role); the colours say so rather
than invent a difference.

Determinism: Melting Pot as shipped is NOT reproducible from its seeds. Two things had to be fixed here:
- Some substrates draw their settings from Python's global `random` (coins: map size, player and coin colours). We
  seed it from the episode's settings seed while the settings are built, and restore the caller's state afterwards.
- dmlab2d's LuaJIT seeds its string hash from /dev/urandom, so `pairs` over string-keyed tables visits keys in a
  different order in every Lua state. Melting Pot assigns avatars to spawn points in that order (and other
  per-object loops consume the Lua RNG in that order), so two environments with identical seeds diverge from the
  first frame. We run Melting Pot's Lua files from a cached copy in which `pairs` visits string and number keys in
  sorted order (`_deterministic_lua_root`); stepping becomes 2-3x slower, still well under a millisecond.
"""

from __future__ import annotations

import copy
import functools
import random
from collections import Counter

import numpy as np

from ap_jax import actions as A
from ap_jax.data import meltingpot_actions as mp_actions
from ap_jax.data import meltingpot_substrates as mp_substrates


# --------------------------------------------------------------------------------------------------------------
# Location observers and player colours


def _components(game_object) -> list:
  return list(game_object.get("components", []))


def _avatar_component(game_object):
  return next((c for c in _components(game_object) if c.get("component") == "Avatar"), None)


def _add_location_observers(settings) -> list:
  """Adds a LocationObserver to every avatar object; returns the avatar objects in player-index order."""
  avatars = []
  for game_object in settings.simulation.get("gameObjects", []):
    avatar = _avatar_component(game_object)
    if avatar is None:
      continue
    if avatar.get("kwargs", {}).get("useAbsoluteCoordinates", False):
      raise ValueError("an avatar uses absolute movement (useAbsoluteCoordinates), but the unified actions are "
                       "relative to facing")
    observers = [c for c in _components(game_object) if c.get("component") == "LocationObserver"]
    if observers:  # Some substrates add one behind a debug flag: make it report what we need.
      for c in observers:
        c["kwargs"] = {**dict(c.get("kwargs", {})), "objectIsAvatar": True, "alsoReportOrientation": True}
    else:
      game_object["components"].append({
          "component": "LocationObserver",
          "kwargs": {"objectIsAvatar": True, "alsoReportOrientation": True},
      })
    avatars.append(game_object)
  avatars.sort(key=lambda o: int(_avatar_component(o)["kwargs"]["index"]))
  return avatars


def _avatar_colour(game_object) -> tuple[int, int, int]:
  """The avatar sprite's main colour: palette '*' (Melting Pot's body colour) or the most used opaque colour."""
  appearance = next((c for c in _components(game_object) if c.get("component") == "Appearance"), None)
  kwargs = appearance.get("kwargs", {}) if appearance is not None else {}
  if kwargs.get("spriteRGBColors"):  # renderMode 'colored_square' (e.g. the *_in_the_matrix__repeated games)
    return tuple(int(c) for c in kwargs["spriteRGBColors"][0][:3])
  if not kwargs.get("palettes"):
    raise ValueError(f"avatar object {game_object.get('name')!r} has no Appearance colours: {kwargs}")
  palette = dict(kwargs["palettes"][0])
  if "*" in palette:
    return tuple(int(c) for c in palette["*"][:3])
  opaque = {k: v for k, v in palette.items() if len(v) < 4 or v[3] > 0}
  shapes = kwargs.get("spriteShapes")
  if shapes:
    counts = Counter(ch for ch in shapes[0] if ch in opaque)
    if counts:
      return tuple(int(c) for c in opaque[counts.most_common(1)[0][0]][:3])
  return tuple(int(c) for c in next(iter(opaque.values()))[:3])


# --------------------------------------------------------------------------------------------------------------
# Deterministic Lua


# LuaJIT (inside dmlab2d) seeds its string hash from /dev/urandom, so the order in which `pairs` visits a
# string-keyed table changes from one Lua state to the next. Melting Pot's simulation assigns avatars to spawn points
# (and runs other per-object loops) in `pairs` order, so two environments built with the same seeds play different
# episodes. We run Melting Pot's Lua from a copy whose files shadow `pairs` with one that visits string and number
# keys in sorted order (tables with other keys keep the native order). The header's pointer to meltingpot.py (whose
# docstring leads here) is left as it was: the header is hashed into the cache path of the copy.
_SORTED_PAIRS_LUA = """-- ap_jax: deterministic `pairs` (see ap_jax/data/meltingpot.py)
local _nativePairs = pairs
local function pairs(t)
  local keys = {}
  for k in _nativePairs(t) do
    local kind = type(k)
    if kind ~= 'string' and kind ~= 'number' then return _nativePairs(t) end
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta == 'number' end
    return a < b
  end)
  local i = 0
  return function()
    i = i + 1
    local k = keys[i]
    if k ~= nil then return k, t[k] end
  end
end
"""
_PATCHED_LUA_FILES = ("*.lua",)


@functools.lru_cache(maxsize=None)
def _deterministic_lua_root() -> str:
  """A directory holding a copy of meltingpot/lua with deterministic `pairs`; used as DMLab2D's levelDirectory."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  import meltingpot  # pylint: disable=import-outside-toplevel
  source = pathlib.Path(meltingpot.__file__).parent / "lua"
  files = sorted(p for p in source.rglob("*.lua"))
  digest = hashlib.sha256(_SORTED_PAIRS_LUA.encode())
  for f in files:
    digest.update(str(f.relative_to(source)).encode())
    digest.update(f.read_bytes())
  cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "ap_jax"
  root = cache / f"meltingpot_lua_{digest.hexdigest()[:16]}"
  if (root / "meltingpot" / "lua").is_dir():
    return str(root)
  cache.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=".staging_"))
  try:
    for f in files:
      dest = staging / "meltingpot" / "lua" / f.relative_to(source)
      dest.parent.mkdir(parents=True, exist_ok=True)
      dest.write_text(_SORTED_PAIRS_LUA + f.read_text())
    try:
      os.rename(staging, root)  # Atomic: a concurrent process either wins or finds the finished copy.
    except OSError:
      if not (root / "meltingpot" / "lua").is_dir():
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return str(root)


# --------------------------------------------------------------------------------------------------------------
# The episode's environment


class EpisodeSettings:
  """The DMLab2D settings of one episode, with what we read from them (avatar colours, sprite size)."""

  def __init__(self, substrate: str, num_players: int, settings_seed: int):
    _, _, _, builder = mp_substrates.import_meltingpot()
    from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
    cfg = mp_substrates.substrate_config(substrate)
    roles = mp_substrates.roles_for(substrate, num_players)
    # Some substrates draw their settings from Python's global `random` (coins: map size and colours), so the
    # episode seed seeds it here; the caller's random state is restored afterwards.
    saved = random.getstate()
    random.seed(settings_seed)
    try:
      settings = cfg.lab2d_settings_builder(roles=roles, config=cfg)
    finally:
      random.setstate(saved)
    # As meltingpot.utils.substrates.builder.builder does, plus the location observers and our Lua copy.
    settings = config_dict.ConfigDict(copy.deepcopy(settings)).unlock()
    builder.apply_prefab_overrides(settings, None)
    builder.maybe_build_and_add_avatar_objects(settings)
    avatars = _add_location_observers(settings)
    if len(avatars) != num_players:
      raise ValueError(f"substrate {substrate!r} built {len(avatars)} avatars for {num_players} players")
    builder.locate_and_overwrite_level_directory(settings)
    settings.levelDirectory = _deterministic_lua_root()
    self.substrate = substrate
    self.num_players = num_players
    self.sprite_size = int(settings.get("spriteSize", 8))
    self.colors = np.array([_avatar_colour(o) for o in avatars], np.uint8)
    self.settings = builder.parse_python_settings_for_dmlab2d(settings)

  def start(self, env_seed: int, episode_seed: int):
    """A fresh, started Lab2d environment (a fresh one per episode, as Melting Pot's own reset builds)."""
    dmlab2d, runfiles_helper, _, _ = mp_substrates.import_meltingpot()
    env = dmlab2d.Lab2d(runfiles_helper.find(), dict(self.settings, env_seed=str(env_seed)))
    names = env.observation_names()
    wanted = [f"{i}.{kind}" for i in range(1, self.num_players + 1) for kind in ("POSITION", "ORIENTATION")]
    missing = [n for n in ["WORLD.RGB", *wanted] if n not in names]
    if missing:
      raise RuntimeError(f"substrate {self.substrate!r} does not report {missing}; the LocationObserver was not "
                         f"attached to every avatar")
    env.start(episode=0, seed=episode_seed)
    return env

  def action_vectors(self, env) -> np.ndarray:
    """[P, 8, D] int32: the DMLab2D discrete action vector of each player's unified action (others zero)."""
    names = list(env.action_discrete_names())
    vectors = np.zeros((self.num_players, A.NUM_ACTIONS, len(names)), np.int32)
    for a, action in enumerate(mp_actions.unified_action_dicts(self.substrate)):
      for key, value in action.items():
        for p in range(self.num_players):
          vectors[p, a, names.index(f"{p + 1}.{key}")] = value
    return vectors


def observe(env, num_players: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(WORLD.RGB [h, w, 3] copy, cell positions [P, 2] (y, x), orientations [P])."""
  world = np.array(env.observation("WORLD.RGB"), dtype=np.uint8)
  xy = np.array([np.asarray(env.observation(f"{i}.POSITION")) for i in range(1, num_players + 1)], np.int32)
  ori = np.array([int(np.asarray(env.observation(f"{i}.ORIENTATION"))) for i in range(1, num_players + 1)], np.int32)
  return world, xy[:, ::-1].copy(), ori
