"""Config arguments (`tiny:autoencoder,runlocal,batch=32`): one parser, `config_utils.parse_arg`, serves every config
file; its spellings, its errors, and the key=value arguments the configs take."""

import os

import pytest

from ap_jax.train import config_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("tiny", "small", "base", "meltingpot")


def test_parse_arg_reads_flags_and_typed_values():
  arg = config_utils.parse_arg("runlocal, batch=32,lr=0.5,name=x=y", autoencoder=False, runlocal=False, batch=int,
                               lr=1e-3, name="a", fast=True)
  assert arg.to_dict() == dict(autoencoder=False, runlocal=True, batch=32, lr=0.5, name="x=y", fast=True)
  # Nothing given: the defaults; a type as default is None ("the config's own value").
  for empty in (None, "", ",,"):
    assert config_utils.parse_arg(empty, runlocal=False, batch=int, lr=1e-3).to_dict() == dict(
        runlocal=False, batch=None, lr=1e-3)
  # Booleans: bare is True, or spelled out; an int default reads 1_000; a float default reads an int.
  arg = config_utils.parse_arg("a=false,b=Yes,c=0,steps=1_000,lr=2", a=True, b=False, c=True, steps=int, lr=1e-3)
  assert (arg.a, arg.b, arg.c, arg.steps, arg.lr) == (False, True, False, 1000, 2.0)
  assert isinstance(arg.lr, float)
  # Repeats are fine when they agree (`runlocal,runlocal=true`).
  assert config_utils.parse_arg("runlocal,runlocal=true", runlocal=False).runlocal
  with pytest.raises(AttributeError):
    arg.no_such_key  # pylint: disable=pointless-statement


def test_parse_arg_errors_name_the_argument():
  spec = dict(autoencoder=False, runlocal=False, batch=int, lr=1e-3)
  with pytest.raises(config_utils.ConfigError, match=r"unknown config argument\(s\) 'runlocl' \(did you mean "
                                                     r"'runlocal'\?\), 'bach' \(did you mean 'batch'\?\); this "
                                                     r"config knows: autoencoder, runlocal, batch=INT, lr=FLOAT$"):
    config_utils.parse_arg("runlocl,bach=3", **spec)
  with pytest.raises(config_utils.ConfigError, match=r"config argument batch=3\.5: '3\.5' is not an int$"):
    config_utils.parse_arg("batch=3.5", **spec)
  with pytest.raises(config_utils.ConfigError, match=r"config argument lr=fast: 'fast' is not a float$"):
    config_utils.parse_arg("lr=fast", **spec)
  with pytest.raises(config_utils.ConfigError, match=r"config argument runlocal=maybe: 'maybe' is not a boolean "):
    config_utils.parse_arg("runlocal=maybe", **spec)
  with pytest.raises(config_utils.ConfigError, match=r"config argument 'batch' needs a value: batch=INT$"):
    config_utils.parse_arg("batch", **spec)
  with pytest.raises(config_utils.ConfigError, match=r"'batch' given twice, as 'batch=8' and 'batch=16'$"):
    config_utils.parse_arg("batch=8,runlocal,batch=16", **spec)
  with pytest.raises(TypeError, match="default of 'shape' is"):  # the config file's mistake, not the user's
    config_utils.parse_arg("", shape=(1, 2))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_takes_its_arguments_through_parse_arg(name):
  with pytest.raises(config_utils.ConfigError, match=r"unknown config argument\(s\) 'runlocl' \(did you mean "
                                                     r"'runlocal'\?\); this config knows: autoencoder, runlocal, "):
    config_utils.load_config(f"{name}:autoencoder,runlocl")
  with pytest.raises(config_utils.ConfigError, match=r"config argument batch=big: 'big' is not an int"):
    config_utils.load_config(f"{name}:batch=big")
  # One config, however it is spelled: name or path, any order, flags bare or spelled out.
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spellings = [f"{name}:autoencoder,runlocal", f"{path}:runlocal,autoencoder",
               f"{name}:autoencoder=true,runlocal=yes", f"{name}: autoencoder , runlocal,"]
  dicts = [config_utils.load_config(s).to_dict() for s in spellings]
  assert all(d == dicts[0] for d in dicts), spellings
  assert config_utils.load_config(f"{name}:runlocal=false").to_dict() == config_utils.load_config(name).to_dict()
  # batch= and steps= are the global batch size and the training steps, and win over runlocal.
  for arg in ("", "runlocal", "autoencoder,runlocal") + (("tiny", "tiny,runlocal") if name == "meltingpot" else ()):
    plain = config_utils.load_config(f"{name}:{arg}")
    given = config_utils.load_config(f"{name}:{arg},batch=24,steps=7")
    assert (given.data.global_batch_size, given.total_steps) == (24, 7)
    assert given.to_dict() == config_utils.apply_overrides(
        plain, ["--config.data.global_batch_size=24", "--config.total_steps=7"]).to_dict()


def test_config_files_document_their_arguments():
  for name in CONFIGS:
    with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
      source = f.read()
    doc = source.split('"""')[1]
    for argument in ("`autoencoder`", "`runlocal`", "`batch=N`", "`steps=N`"):
      assert argument in doc, (name, argument)
    assert "config_utils.parse_arg(arg, " in source and "config_args" not in source


def test_bare_names_find_the_packaged_configs_from_any_working_directory(tmp_path, monkeypatch):
  by_path = {spec: config_utils.load_config(os.path.join(ROOT, "configs", spec)).to_dict()
             for spec in ("tiny.py:autoencoder,runlocal", "meltingpot.py:tiny")}
  monkeypatch.chdir(tmp_path)
  assert config_utils.configs_dir() == os.path.join(ROOT, "configs")  # a checkout: its own configs/
  assert config_utils.load_config("tiny:autoencoder,runlocal").to_dict() == by_path["tiny.py:autoencoder,runlocal"]
  assert config_utils.load_config("meltingpot:tiny").to_dict() == by_path["meltingpot.py:tiny"]
  # A path is a path: configs/tiny.py is relative to the working directory.
  with pytest.raises(config_utils.ConfigError, match=r"'configs/tiny.py' does not exist; configs in .*: base.py, "
                                                     r"meltingpot.py, small.py, tiny.py$"):
    config_utils.load_config("configs/tiny.py")


def test_setup_cfg_installs_every_package_and_the_configs():
  import configparser

  import setuptools

  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, "setup.cfg"))
  packages = setup["options"]["packages"].split()
  assert set(packages) == set(setuptools.find_packages(ROOT, include=["ap_jax", "ap_jax.*"])) | {"ap_jax.configs"}
  assert setup["options"]["package_dir"].split() == ["ap_jax.configs", "=", "configs"]


def _can_build_a_wheel_offline() -> bool:
  try:
    from setuptools.command import bdist_wheel  # pylint: disable=import-outside-toplevel,unused-import  # >= 70.1
  except ImportError:
    try:
      from wheel import bdist_wheel  # pylint: disable=import-outside-toplevel,unused-import,no-name-in-module
    except ImportError:
      return False
  return True


def test_the_wheel_carries_the_configs_and_finds_them_by_name(tmp_path):
  """Builds the wheel (from a copy of the sources: an in-tree build leaves build/ behind), unpacks it as an install
  does, and loads configs by bare name from another folder with only the unpacked wheel on the path."""
  import shutil
  import subprocess
  import sys
  import zipfile

  src = tmp_path / "src"
  src.mkdir()
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  for name in ("ap_jax", "configs"):
    shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
  # Offline (the build tools already installed) where it can; otherwise pip fetches pyproject.toml's build tools.
  isolation = ["--no-build-isolation"] if _can_build_a_wheel_offline() else []
  r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "dist"),
                      str(src)], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stdout + r.stderr
  [wheel] = (tmp_path / "dist").glob("ap_jax-*.whl")
  names = set(zipfile.ZipFile(wheel).namelist())
  configs = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
  assert {f"ap_jax/configs/{f}" for f in configs} <= names, sorted(names)
  sources = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "ap_jax"))
             for f in fs if f.endswith(".py")}
  assert sources <= names, sorted(sources - names)  # every package is listed in setup.cfg
  site = tmp_path / "site"
  zipfile.ZipFile(wheel).extractall(site)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  script = ("import ap_jax; from ap_jax.train import config_utils as cu; print(ap_jax.__file__); "
            "print(cu.configs_dir()); print(cu.to_json(cu.load_config('tiny:autoencoder,runlocal'))); "
            "print(cu.to_json(cu.load_config('meltingpot:tiny')))")
  r = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, check=False,
                     env={**os.environ, "PYTHONPATH": str(site)})
  assert r.returncode == 0, r.stderr
  module, found, out = r.stdout.split("\n", 2)
  assert module == str(site / "ap_jax" / "__init__.py") and found == str(site / "ap_jax" / "configs")
  assert out == "".join(config_utils.to_json(config_utils.load_config(spec)) + "\n"
                        for spec in ("tiny:autoencoder,runlocal", "meltingpot:tiny"))


def test_tokens_per_example_refuses_a_frame_the_tokens_do_not_tile():
  """A 4 x 3 token frame counts 12 video tokens and the tiny recipe's 8 subject slots (one-step clips: the target
  frame only); a frame one pixel off the token grid is refused, naming both sizes, instead of floored."""
  from ap_jax.model import config as model_config_lib
  from ap_jax.train import stages as stages_lib
  config = config_utils.load_config("tiny")
  stage = stages_lib.Stage(name="denoiser", model_config=config.model, init=None, logical_axes=None, loss=None,
                           batch_keys=())
  per_side = model_config_lib.pixels_per_token(config.model)
  config.data.frame_hw = (4 * per_side, 3 * per_side)
  assert stages_lib.tokens_per_example(config, stage) == 12 + 8
  config.data.frame_hw = (4 * per_side + 1, 3 * per_side)
  with pytest.raises(config_utils.ConfigError, match=rf"frames are {4 * per_side + 1} x {3 * per_side} px, not a "
                     rf"multiple of {per_side} px a token"):
    stages_lib.tokens_per_example(config, stage)
