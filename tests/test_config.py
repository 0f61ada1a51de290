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
