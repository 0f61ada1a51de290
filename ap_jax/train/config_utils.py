"""Loading experiment configs (ml_collections files under configs/) and applying command-line overrides.

A config file defines `get_config(arg: str | None = None) -> ConfigDict`, big_vision style; `path:arg` passes
`arg` (e.g. `configs/tiny.py:runlocal` for a smaller smoke run). Overrides are `--config.a.b=value`; the value
is parsed as a Python literal and must match the type of the key it replaces. A key that does not exist is an
error naming the closest existing keys, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file, key or value that cannot be used."""


def config_args(arg: str | None, known: Sequence[str]) -> set[str]:
  """The comma-separated arguments after a config path's colon, e.g. `configs/tiny.py:autoencoder,runlocal`.
  An unknown one is an error listing the known ones (a typo must not silently train the full config)."""
  args = set((arg or "").split(",")) - {""}
  unknown = sorted(args - set(known))
  if unknown:
    hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
    raise ConfigError("unknown config argument(s) " + ", ".join(
        f"{u!r}" + (f" (did you mean {hints[u][0]!r}?)" if hints[u] else "") for u in unknown)
        + f"; this config knows: {', '.join(known)}")
  return args


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`, or `NAME[:arg]` for `configs/NAME.py`."""
  path, _, arg = spec.partition(":")
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")
  if not os.path.exists(path) and os.sep not in path and not path.endswith(".py"):
    path = os.path.join(here, f"{path}.py")  # a bare name: `tiny` is configs/tiny.py
  if not os.path.exists(path):
    choices = sorted(f for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_")) \
        if os.path.isdir(here) else []
    raise ConfigError(f"config file {path!r} does not exist; configs in {here}: {', '.join(choices)}")
  module_spec = importlib.util.spec_from_file_location(f"ap_jax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None) function")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config returned {type(config).__name__}, expected an ml_collections.ConfigDict")
  return config


def _all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    full = f"{prefix}{key}"
    keys.append(full)
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(_all_keys(value, full + "."))
  return keys


def _parse_value(text: str, old: Any, key: str) -> Any:
  if isinstance(old, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}={text}: expected a boolean (true/false)")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # bare strings need no quotes
  if old is None:
    return value
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(old)(value)
  if isinstance(old, (tuple, list)) and isinstance(value, str):
    return type(old)(v.strip() for v in value.split(",") if v.strip())  # names: a,b,c
  if isinstance(old, (tuple, list)) and isinstance(value, (int, float)):
    return type(old)([value])
  if isinstance(old, str) and not isinstance(value, str):
    return text
  if type(value) is not type(old):
    raise ConfigError(f"--config.{key}={text}: got a {type(value).__name__}, expected a {type(old).__name__} "
                      f"(current value {old!r})")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `key=value` / `--config.key=value` overrides in order; returns the config (modified in place)."""
  known = _all_keys(config)
  for item in overrides:
    text = item[len("--config."):] if item.startswith("--config.") else item
    if "=" not in text:
      raise ConfigError(f"override {item!r}: expected --config.KEY=VALUE")
    key, value_text = text.split("=", 1)
    if key not in known:
      close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise ConfigError(f"config has no key {key!r}{hint}")
    parent = config
    *path, leaf = key.split(".")
    for part in path:
      parent = parent[part]
    old = parent[leaf]
    if isinstance(old, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key} is a group of keys ({', '.join(old.keys())}); set one of them")
    with parent.ignore_type():
      parent[leaf] = _parse_value(value_text, old, key)
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True, indent=2)


def model_fingerprint(config: ml_collections.ConfigDict) -> str:
  """Hash of what fixes parameter shapes (stage and model architecture). Checkpoints with another fingerprint
  cannot be resumed."""
  model = json.loads(config.model.to_json_best_effort(sort_keys=True))
  # Keys that change numerics but not shapes may differ between runs of one model.
  for group, keys in (("dit", ("dtype", "attention_impl", "remat_policy", "scan_layers", "ln_grad_barrier")),
                      ("vae", ("dtype", "latent_scale", "latent_shift", "foreground", "subject_radius_px"))):
    for key in keys:
      model.get(group, {}).pop(key, None)
  for key in ("flow",):
    model.pop(key, None)
  if config.stage == "autoencoder":
    # The autoencoder's shapes depend on model.vae only: denoiser variants (ablations, sizes) share one.
    model = {"vae": model.get("vae", {})}
  blob = json.dumps(dict(stage=config.stage, model=model), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]
