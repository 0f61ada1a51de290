"""Loading experiment configs (ml_collections files under configs/) and applying command-line overrides.

A config file defines `get_config(arg: str | None = None) -> ConfigDict`, big_vision style; `path:arg` passes
`arg`, which the file reads with `parse_arg`: flags and typed values, e.g. `configs/tiny.py:autoencoder,batch=32`.
A bare name (`tiny:runlocal`) is the config of that name shipped with the package, found from any working
directory; a path (`configs/tiny.py`, `my_configs/x.py`) is a file. Overrides are `--config.a.b=value`; the value
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


# The value types a config argument can have, and how a value reads in messages.
_ARG_TYPES = {bool: "a boolean (true/false)", int: "an int", float: "a float", str: "a string"}


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """A config file's argument, the text after the colon of `tiny.py:autoencoder,runlocal,batch=32`, as a
  ConfigDict with one entry per keyword of `defaults` (big_vision's `parse_arg`).

    arg = config_utils.parse_arg(arg, autoencoder=False, runlocal=False, batch=int)
    if arg.runlocal: ...

  Items are comma-separated. A bare word sets a boolean to True (`runlocal`); `key=value` sets any key, the value
  parsed to the type of its default: bool (true/false, yes/no, 1/0), int, float or str (as written; a value cannot
  hold a comma). A default that is a type (`batch=int`) is None unless the argument sets it: "the config's own
  value". An unknown key, a bare word for a key that is not a boolean, a value that does not parse as the
  default's type, or a key given twice with different values is a ConfigError: a typo must not silently train
  another config.
  """
  types = {}
  for key, default in defaults.items():
    kind = default if isinstance(default, type) else type(default)
    if kind not in _ARG_TYPES:
      raise TypeError(f"parse_arg: default of {key!r} is {default!r}; expected a bool, int, float or str, or one of "
                      "those types (None unless given)")
    types[key] = kind

  def spelling(key):  # how `this config knows: ...` lists a key
    kind = types[key]
    return key if kind is bool else f"{key}={kind.__name__.upper()}"

  values, given, unknown = {}, {}, []
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in types:
      unknown.append(key)
      continue
    kind = types[key]
    if not has_value:
      if kind is not bool:
        raise ConfigError(f"config argument {key!r} needs a value: {spelling(key)}")
      value = True
    else:
      value = _parse_arg_value(key, text.strip(), kind)
    if key in values and values[key] != value:
      raise ConfigError(f"config argument {key!r} given twice, as {given[key]!r} and {item!r}")
    values[key], given[key] = value, item
  if unknown:
    known = list(types)
    hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
    raise ConfigError("unknown config argument(s) " + ", ".join(
        f"{u!r}" + (f" (did you mean {hints[u][0]!r}?)" if hints[u] else "") for u in unknown)
        + f"; this config knows: {', '.join(spelling(k) for k in known)}")
  result = ml_collections.ConfigDict(
      {key: values.get(key, None if isinstance(default, type) else default) for key, default in defaults.items()},
      type_safe=False)
  result.lock()  # a config file cannot add keys to its argument by accident
  return result


def _parse_arg_value(key: str, text: str, kind: type) -> Any:
  if kind is bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1"):
      return True
    if lowered in ("false", "no", "0"):
      return False
  elif kind is str:
    return text
  else:
    try:
      return kind(text)
    except ValueError:
      pass
  raise ConfigError(f"config argument {key}={text}: {text!r} is not {_ARG_TYPES[kind]}")


def configs_dir() -> str:
  """The folder bare config names resolve in (`tiny` is `tiny.py` there): a checkout's top-level configs/ when
  ap_jax runs from a checkout (an editable install, or the checkout on PYTHONPATH), else the configs installed
  with the package as `ap_jax.configs` (setup.cfg maps configs/ onto that package, so a wheel carries them)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  checkout = os.path.join(root, "configs")
  # A checkout is where setup.cfg sits beside the package; a bare `configs` folder beside an installed ap_jax
  # (another distribution's, in site-packages) is not ours.
  if os.path.isdir(checkout) and os.path.isfile(os.path.join(root, "setup.cfg")):
    return checkout
  spec = importlib.util.find_spec("ap_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return list(spec.submodule_search_locations)[0]
  return checkout  # neither: load_config's error names this folder


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`, or `NAME[:arg]` for the config `NAME.py` in `configs_dir()` (from any
  working directory). `arg` goes to the file's `get_config(arg)` (None when empty)."""
  path, _, arg = spec.partition(":")
  here = configs_dir()
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
