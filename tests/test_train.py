"""The trainer: sharded steps equal the single-device step, bit-exact resume after SIGKILL / SIGTERM, damaged
checkpoints skipped, restore on other device counts, two processes, falling loss, and clear errors.

Runs on the 8 forced CPU devices that conftest.py sets up. Models are shrunk by config overrides (one code path
with the real configs) so that each test compiles and runs in seconds.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ap_jax.model import vae as vae_lib
from benchmarks import crash_soak
from ap_jax.train import checkpoint as checkpoint_lib
from ap_jax.train import config_utils, mesh as mesh_lib, optim as optim_lib, trainer
from ap_jax.data import locate
from ap_jax.train import inputs as inputs_lib
from ap_jax.train import restore as restore_lib
from ap_jax.train import stages as stages_lib
from ap_jax.train import state as state_lib
from ap_jax.train import telemetry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

# A small autoencoder and denoiser: same code path as configs/tiny.py, fewer channels and blocks. The autoencoder
# (and the training command the kill tests run) is the crash soak's: one definition, in benchmarks/crash_soak.py.
SMALL_AE = crash_soak.SMALL_AE
SMALL_DIT = ["--config.model.dit.width=64", "--config.model.dit.depth=2", "--config.model.dit.heads=4",
             "--config.model.dit.mlp=128", "--config.data.clip_steps=2",
             "--config.data.cache_latents=false"]  # batches carry frames (test_cached_latents_* covers the cache)


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cache"))
  old = os.environ.get("AP_JAX_CACHE")
  os.environ["AP_JAX_CACHE"] = path
  yield path
  if old is None:
    os.environ.pop("AP_JAX_CACHE")
  else:
    os.environ["AP_JAX_CACHE"] = old


def make_config(arg="autoencoder,runlocal", overrides=()):
  config = config_utils.load_config(f"{TINY}:{arg}")
  return config_utils.apply_overrides(config, list(SMALL_AE) + list(overrides))


read_losses = crash_soak.logged_losses  # {step: [every logged loss]}


# --------------------------------------------------------------------------------------------- sharded step


# Adam's first updates are about lr * sign(g) whatever |g| is, so parameters whose gradient is pure float noise
# (a bias feeding a norm) would differ by up to 2 lr between two correct programs. A large eps makes the update
# linear in small gradients; the comparison then measures the sharded computation, not sign noise.
EQUIVALENCE = ["--config.optim.eps=0.001", "--config.optim.warmup_steps=0"]


def _one_step(config, stage, devices, batch_np, steps=2):
  mesh = mesh_lib.build_mesh(config.mesh, devices=devices)
  rules = mesh_lib.rules_from_config(config)
  tx, schedule = optim_lib.build_optimizer(config.optim, int(config.total_steps))
  init_fn, state_sh, abstract = state_lib.build_state(config, stage, tx, mesh, rules)
  step_fn, _, frozen_sh = state_lib.build_step(config, stage, tx, schedule, mesh, rules, state_sh, abstract)
  state = init_fn(jax.random.PRNGKey(0))
  frozen = jax.device_put(stage.frozen, frozen_sh) if stage.frozen is not None else None
  batch_sh = mesh_lib.batch_sharding(mesh, rules)
  losses = []
  for _ in range(steps):
    batch = {k: jax.device_put(batch_np[k], batch_sh) for k in stage.batch_keys}
    state, metrics = step_fn(state, batch, frozen)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state["params"]), state


@pytest.mark.parametrize("mesh", [pytest.param(dict(data=8), marks=pytest.mark.slow),
                                  pytest.param(dict(fsdp=8), marks=pytest.mark.slow), dict(data=2, fsdp=2, tensor=2)],
                         ids=["data8", "fsdp8", "data2_fsdp2_tensor2"])  # the default run keeps the mixed mesh
def test_sharded_denoiser_step_matches_single_device(mesh):
  config = make_config("runlocal", SMALL_DIT + EQUIVALENCE + [f"--config.mesh.{k}={v}" for k, v in
                                                dict(dict(data=1, fsdp=1, context=1, tensor=1), **mesh).items()])
  vae_params = vae_lib.vae_init(jax.random.PRNGKey(1), config.model)
  stage = stages_lib.build_stage(config, frozen=vae_params, meta=dict(latent_shift=0.0, latent_scale=1.0))
  batch = next(inputs_lib.build_data(config))
  single_cfg = make_config("runlocal", SMALL_DIT + EQUIVALENCE)  # mesh data=-1 over one device
  ref_losses, ref_params, _ = _one_step(single_cfg, stage, jax.devices()[:1], batch)
  losses, params, state = _one_step(config, stage, jax.devices(), batch)
  # Float32 sums reduce in another order across shards: agreement to ~1e-5 relative, not bitwise.
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), params, ref_params)
  # The parameters really are sharded as the rules say (fsdp shards the embed dimension).
  sharded = [leaf for leaf in jax.tree.leaves(state["params"])
             if leaf.sharding.shard_shape(leaf.shape) != leaf.shape]
  if mesh.get("fsdp", 1) > 1 or mesh.get("tensor", 1) > 1:
    assert len(sharded) > len(jax.tree.leaves(state["params"])) // 3
  else:
    assert not sharded  # pure data parallel replicates the parameters


def test_sharded_autoencoder_step_matches_single_device():
  config = make_config(overrides=["--config.mesh.data=1", "--config.mesh.fsdp=8"] + EQUIVALENCE)
  stage = stages_lib.build_stage(config)
  batch = next(inputs_lib.build_data(config))
  ref_losses, ref_params, _ = _one_step(make_config(overrides=EQUIVALENCE), stage, jax.devices()[:1], batch)
  losses, params, _ = _one_step(config, stage, jax.devices(), batch)
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), params, ref_params)


def test_cached_latents_match_encoding_each_batch():
  # data.cache_latents: the episodes are encoded once before training; a clip's latents are the ones the step
  # would have computed from its frames, and the loss on them is the same.
  config = make_config("runlocal", SMALL_DIT)
  cached = make_config("runlocal", SMALL_DIT + ["--config.data.cache_latents=true"])
  vae_params = vae_lib.vae_init(jax.random.PRNGKey(1), config.model)
  meta = dict(latent_shift=0.1, latent_scale=2.0)
  stage, cached_stage = (stages_lib.build_stage(c, frozen=vae_params, meta=meta) for c in (config, cached))
  assert "latents" in cached_stage.batch_keys and "frames" not in cached_stage.batch_keys
  latents = inputs_lib.encode_source(inputs_lib.open_source(config), vae_params, stage.model_config, batch_frames=40,
                                  progress=False)
  batch = next(inputs_lib.build_data(config))  # the same clips, carrying frames
  cached_batch = next(inputs_lib.build_data(config, latents=latents))
  assert "frames" not in cached_batch
  np.testing.assert_array_equal(cached_batch["start"], batch["start"])
  expect = vae_lib.vae_encode(vae_params, stage.model_config, batch["frames"])
  np.testing.assert_allclose(cached_batch["latents"], expect, atol=2e-5)
  params = stage.init(jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(3)
  loss, _ = stage.loss(params, {k: batch[k] for k in stage.batch_keys}, rng, vae_params)
  cached_loss, _ = cached_stage.loss(params, {k: cached_batch[k] for k in cached_stage.batch_keys}, rng,
                                     vae_params)
  np.testing.assert_allclose(float(cached_loss), float(loss), rtol=1e-4)


# ----------------------------------------------------------------------------------------- kill and resume


def _train_cmd(workdir, total, extra=()):
  return crash_soak.train_command(workdir, total, ["--config.checkpoint_every=5", "--config.async_checkpointing=false",
                                                   *extra])


def _run(cmd, **kw):
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def _interrupt_at(cmd, workdir, step, sig):
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  try:
    while True:
      assert proc.poll() is None, f"training ended before step {step}: {proc.stderr.read()[-2000:]}"
      assert time.time() < deadline, "training too slow to reach the interrupt step"
      if os.path.exists(metrics) and any(json.loads(l)["step"] >= step for l in open(metrics) if l.strip()):
        break
      time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode


@pytest.fixture(scope="module")
def straight_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  _run(_train_cmd(workdir, 20))
  return workdir


@pytest.fixture(scope="module")
def straight_run(straight_dir):
  return read_losses(straight_dir)


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_and_resumed_run_repeats_the_losses(sig, straight_run, tmp_path):
  workdir = str(tmp_path / "run")
  code = _interrupt_at(_train_cmd(workdir, 20), workdir, 11, sig)
  saved = checkpoint_lib.Checkpointer(workdir, read_only=True).all_steps()
  if sig == signal.SIGTERM:
    assert code == 0, "SIGTERM should finish the step, save and exit cleanly"
    assert max(saved) >= 11, f"no checkpoint at the interrupted step: {saved}"
  else:
    assert code == -signal.SIGKILL
  _run(_train_cmd(workdir, 20))
  resumed = read_losses(workdir)
  assert sorted(resumed) == list(range(1, 21))
  for step, values in resumed.items():
    for value in values:  # steps logged before the kill and again after the resume must agree too
      assert value == straight_run[step][0], f"step {step}: {value} != {straight_run[step][0]}"


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
def test_damaged_checkpoint_is_skipped_for_the_previous_one(straight_run, tmp_path):
  workdir = str(tmp_path / "damaged")
  _interrupt_at(_train_cmd(workdir, 20), workdir, 11, signal.SIGKILL)  # checkpoints at steps 5 and 10
  step_dir = os.path.join(workdir, "checkpoints", "10", "state")
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if os.path.getsize(os.path.join(r, f))]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  r = _run(_train_cmd(workdir, 20))
  assert "checkpoint at step 10 cannot be restored" in r.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  resumed = read_losses(workdir)
  for step in range(6, 21):  # resumed from step 5: steps 6.. repeat the uninterrupted run
    assert resumed[step][-1] == straight_run[step][0], f"step {step}"


# ------------------------------------------------------------------------------------- other device counts


def test_restore_on_a_different_device_count(tmp_path):
  config = make_config(overrides=["--config.mesh.data=1", "--config.mesh.fsdp=8"])
  stage = stages_lib.build_stage(config)
  rules = mesh_lib.rules_from_config(config)
  tx, _ = optim_lib.build_optimizer(config.optim, 10)
  mesh8 = mesh_lib.build_mesh(config.mesh)
  init_fn, _, _ = state_lib.build_state(config, stage, tx, mesh8, rules)
  state = init_fn(jax.random.PRNGKey(3))
  data_iter = inputs_lib.build_data(config)
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, data_iter, {"fingerprint": "x"})
  ckpt.wait()
  expected = jax.device_get(state["params"])
  for devices, mesh_cfg in ((jax.devices()[:1], dict(data=1, fsdp=1)), (jax.devices()[:4], dict(data=2, fsdp=2))):
    cfg = make_config(overrides=[f"--config.mesh.{k}={v}" for k, v in mesh_cfg.items()])
    mesh = mesh_lib.build_mesh(cfg.mesh, devices=devices)
    _, _, abstract = state_lib.build_state(cfg, stage, tx, mesh, rules)
    step, restored, _ = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False).restore_latest(
        abstract, inputs_lib.build_data(cfg))
    assert step == 1
    leaf = jax.tree.leaves(restored["params"])[0]
    assert leaf.sharding.mesh.devices.size == len(devices)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), expected)


# ------------------------------------------------------------------------------------------- two processes


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
def test_two_processes_match_one(straight_run, tmp_path):
  # 2 processes x 4 CPU devices: the same 8-device mesh and global batches as the single-process straight run.
  multi = str(tmp_path / "multi")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(_train_cmd(multi, 20, [f"--coordinator=127.0.0.1:{port}", "--num-processes=2",
                                                   f"--process-id={i}"]),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  errors = [p.communicate(timeout=600)[1] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
  assert "2 process(es)" in errors[0]
  two = read_losses(multi)  # written by process 0 only
  assert sorted(two) == list(range(1, 21)) and all(len(v) == 1 for v in two.values())
  # Gloo's cross-process all-reduce sums in another order than one process does: float32 rounding drifts by
  # ~1e-5 relative over 20 steps (measured 1.8e-5 at worst). A wrong shard or batch would be off by far more.
  for step, values in straight_run.items():
    np.testing.assert_allclose(two[step][0], values[0], rtol=1e-4, err_msg=f"step {step}")


# ------------------------------------------------------------------------------------------------ learning


def test_tiny_autoencoder_loss_falls(tmp_path):
  config = make_config(overrides=["--config.total_steps=40", "--config.checkpoint_every=40",
                                  "--config.optim.learning_rate=0.003"])
  summary = trainer.train(config, str(tmp_path), progress=False)
  losses = [h["loss"] for h in summary["history"]]
  first, last = np.mean(losses[:3]), np.mean(losses[-3:])
  assert last < 0.6 * first, f"loss went from {first:.3f} to {last:.3f}"
  assert os.path.exists(os.path.join(str(tmp_path), "loss.png"))


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_gets_clear_errors(tmp_path):
  config = make_config()
  with pytest.raises(config_utils.ConfigError, match=r"no key 'optim.learning_rte'; did you mean optim.learning_rate"):
    config_utils.apply_overrides(config, ["--config.optim.learning_rte=0.1"])
  with pytest.raises(config_utils.ConfigError, match="got a str, expected a int"):
    config_utils.apply_overrides(config, ["--config.total_steps=many"])
  with pytest.raises(mesh_lib.MeshError, match="needs 6 devices, but there are 8"):
    mesh_lib.build_mesh(make_config(overrides=["--config.mesh.data=3", "--config.mesh.fsdp=2"]).mesh)
  with pytest.raises(mesh_lib.MeshError, match="does not divide the 8 devices"):
    mesh_lib.build_mesh(make_config(overrides=["--config.mesh.data=-1", "--config.mesh.fsdp=3"]).mesh)
  bad_batch = make_config(overrides=["--config.data.global_batch_size=6"])
  with pytest.raises(mesh_lib.MeshError, match="global batch 6 does not divide over the 8 batch shards"):
    trainer.train(bad_batch, str(tmp_path / "b"), progress=False)
  # A workdir holding another model's checkpoint is refused, naming both.
  workdir = str(tmp_path / "w")
  trainer.train(make_config(overrides=["--config.total_steps=1", "--config.checkpoint_every=1"]), workdir,
                progress=False)
  other = make_config(overrides=["--config.total_steps=2", "--config.model.vae.latent_channels=8"])
  with pytest.raises(trainer.TrainError, match="holds a checkpoint of another model"):
    trainer.train(other, workdir, progress=False)
  summary = trainer.train(other, workdir, fresh=True, progress=False)
  assert summary["start_step"] == 0
  with pytest.raises(trainer.TrainError, match="needs --config.autoencoder_workdir"):
    trainer.train(make_config("runlocal"), str(tmp_path / "d"), progress=False)


# ------------------------------------------------------------------------------------ reliability (issue 10)


def _tree_listing(path):
  """Every folder and file under path, with file sizes."""
  out = []
  for root, dirs, files in os.walk(path):
    out += [(os.path.relpath(os.path.join(root, d), path), None) for d in dirs]
    out += [(os.path.relpath(os.path.join(root, f), path), os.path.getsize(os.path.join(root, f))) for f in files]
  return sorted(out)


def test_readers_never_modify_a_workdir(tmp_path):
  workdir = str(tmp_path / "w")
  trainer.train(make_config(overrides=["--config.total_steps=4", "--config.checkpoint_every=2"]), workdir,
                progress=False)
  # What a run writing its next checkpoint has on disk: Orbax's in-flight temporary folder.
  inflight = os.path.join(workdir, "checkpoints", "25.orbax-checkpoint-tmp-1700000000", "state")
  os.makedirs(inflight)
  open(os.path.join(inflight, "partial"), "wb").write(b"\0" * 100)
  before = _tree_listing(workdir)
  config = make_config("runlocal", [f"--config.autoencoder_workdir={workdir}"])
  mesh = mesh_lib.build_mesh(config.mesh, devices=jax.devices()[:1])
  params, meta = restore_lib.load_autoencoder(config, mesh, mesh_lib.rules_from_config(config))
  assert meta["step"] == 4 and jax.tree.leaves(params)
  assert _tree_listing(workdir) == before, "a reader changed the workdir"
  # Missing paths are named as missing, and nothing is created.
  from ap_jax import cli

  for command in (["eval", "--workdir", str(tmp_path / "typo"), "--episodes", "1", "--out", str(tmp_path / "r.json")],
                  ["sample", "--workdir", str(tmp_path / "typo"), "--episode", "test:0", "--out",
                   str(tmp_path / "x.mp4")]):
    assert cli.main(command) == 2
    assert not os.path.exists(tmp_path / "typo")
  with pytest.raises(trainer.TrainError, match="does not exist"):
    restore_lib.load_trained(str(tmp_path / "typo"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(trainer.TrainError, match="holds no checkpoint yet"):
    restore_lib.load_trained(str(empty))
  assert os.listdir(empty) == []
  missing_ae = make_config("runlocal", [f"--config.autoencoder_workdir={tmp_path / 'no_ae'}"])
  with pytest.raises(trainer.TrainError, match="autoencoder_workdir .*no_ae does not exist"):
    trainer.train(missing_ae, str(tmp_path / "d"), progress=False)
  assert not os.path.exists(tmp_path / "no_ae")


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
def test_reading_while_a_run_saves_every_step_does_not_disturb_it(straight_run, tmp_path):
  # The reproduction: a reader polls the workdir of a run that saves (asynchronously) every step.
  workdir = str(tmp_path / "live")
  proc = subprocess.Popen(_train_cmd(workdir, 20, ["--config.checkpoint_every=1", "--config.async_checkpointing=true"]),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  config = make_config("runlocal", [f"--config.autoencoder_workdir={workdir}"])
  mesh = mesh_lib.build_mesh(config.mesh, devices=jax.devices()[:1])
  rules = mesh_lib.rules_from_config(config)
  reads = 0
  try:
    while proc.poll() is None:
      if os.path.isdir(os.path.join(workdir, "checkpoints")):
        try:
          restore_lib.load_autoencoder(config, mesh, rules)
          reads += 1
        except trainer.TrainError as e:
          assert "holds no checkpoint yet" in str(e) or "no checkpoint restores cleanly" in str(e), str(e)
      time.sleep(0.05)
  finally:
    if proc.poll() is None:
      proc.kill()
  err = proc.stderr.read()
  assert proc.returncode == 0, err[-3000:]
  assert reads > 0, "the reader never saw a checkpoint"
  assert read_losses(workdir) == {k: v[:1] for k, v in straight_run.items()}


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
def test_grain_worker_processes_from_the_command_line_resume_exactly(straight_run, tmp_path):
  workdir = str(tmp_path / "workers")
  workers = ["--config.data.worker_count=1"]
  assert _interrupt_at(_train_cmd(workdir, 20, workers), workdir, 8, signal.SIGTERM) == 0
  _run(_train_cmd(workdir, 20, workers))
  resumed = read_losses(workdir)
  assert sorted(resumed) == list(range(1, 21))
  for step, values in resumed.items():
    assert all(v == straight_run[step][0] for v in values), f"step {step}: {values} != {straight_run[step]}"


def _checkpoint_state_files(workdir, step):
  root = os.path.join(workdir, "checkpoints", str(step), "state")
  return [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if os.path.getsize(os.path.join(r, f))]


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
def test_checksums_catch_damage_that_still_parses(straight_run, tmp_path):
  workdir = str(tmp_path / "flipped")
  _interrupt_at(_train_cmd(workdir, 20), workdir, 11, signal.SIGKILL)  # checkpoints at steps 5 and 10
  # Damage that parses: the checksums written with step 10 no longer match its arrays (as after a bit flip in
  # an uncompressed chunk; a flip that breaks the file's encoding is the truncation test's case).
  meta_files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(workdir, "checkpoints", "10", "meta"))
                for f in fs]
  [meta_file] = [f for f in meta_files if '"checksums"' in open(f, errors="ignore").read()]
  meta = json.load(open(meta_file))
  name = sorted(meta["checksums"])[0]
  meta["checksums"][name] = (meta["checksums"][name] + 1) % 2**32
  json.dump(meta, open(meta_file, "w"))
  r = _run(_train_cmd(workdir, 20))
  assert "checkpoint at step 10 cannot be restored (ChecksumMismatch" in r.stderr, r.stderr[-2000:]
  assert name in r.stderr
  assert os.listdir(os.path.join(workdir, "checkpoints_damaged"))
  resumed = read_losses(workdir)
  for step in range(6, 21):
    assert resumed[step][-1] == straight_run[step][0], f"step {step}"


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
def test_flipped_bytes_in_a_state_file_are_caught(straight_run, tmp_path):
  workdir = str(tmp_path / "bytes")
  _interrupt_at(_train_cmd(workdir, 20), workdir, 11, signal.SIGKILL)
  biggest = max(_checkpoint_state_files(workdir, 10), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    chunk = f.read(16)
    f.seek(os.path.getsize(biggest) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  r = _run(_train_cmd(workdir, 20))
  assert "checkpoint at step 10 cannot be restored" in r.stderr, r.stderr[-2000:]
  resumed = read_losses(workdir)
  for step in range(6, 21):
    assert resumed[step][-1] == straight_run[step][0], f"step {step}"


def test_checksums_are_independent_of_sharding():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 24))
  mesh = mesh_lib.build_mesh(make_config(overrides=["--config.mesh.data=1", "--config.mesh.fsdp=8"]).mesh)
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
  tree = dict(a=x, b=jax.numpy.arange(5, dtype=jax.numpy.int32), c=x.astype(jax.numpy.bfloat16))
  sums = checkpoint_lib.state_checksums(tree)
  assert sums == checkpoint_lib.state_checksums(dict(tree, a=sharded))
  assert checkpoint_lib.verify_checksums(tree, sums, what="t")
  flipped = np.asarray(x).copy()
  flipped.view(np.uint32)[3, 5] ^= 1  # one bit
  with pytest.raises(checkpoint_lib.ChecksumMismatch, match="1 of 3 arrays differ .*first: a"):
    checkpoint_lib.verify_checksums(dict(tree, a=jax.numpy.asarray(flipped)), sums, what="t")
  assert not checkpoint_lib.verify_checksums(tree, None, what="t")  # written before checksums: unverified


def test_nan_loss_names_the_checkpoint_that_was_verified(tmp_path):
  workdir = str(tmp_path / "nan")
  trainer.train(make_config(overrides=["--config.total_steps=4", "--config.checkpoint_every=2"]), workdir,
                progress=False)
  # Resume it for more steps with a learning rate that blows up: the error names the restored, verified step 4.
  blowup = make_config(overrides=["--config.total_steps=40", "--config.checkpoint_every=100",
                                  "--config.optim.learning_rate=1e30"])
  with pytest.raises(trainer.TrainError, match=r"stopping without saving. The newest good checkpoint is step 4, "
                                                r"restored at the start of this run with its checksums verified"):
    trainer.train(blowup, workdir, progress=False)


def test_sigterm_during_set_up_stops_before_the_first_step(tmp_path, monkeypatch):
  real = state_lib.build_step

  def build_step_then_sigterm(*args, **kwargs):
    out = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step compiles: before the loop
    return out

  monkeypatch.setattr(state_lib, "build_step", build_step_then_sigterm)
  summary = trainer.train(make_config(overrides=["--config.total_steps=5"]), str(tmp_path / "t"), progress=False)
  assert summary["stopped_by"] == "SIGTERM" and summary["end_step"] == 0
  assert checkpoint_lib.Checkpointer(str(tmp_path / "t"), read_only=True).all_steps() == []


@pytest.mark.slow  # trains an autoencoder and two short denoiser runs on it
def test_denoisers_on_one_autoencoder_share_the_encoded_latents(tmp_path, cache_dir):
  ae_dir = str(tmp_path / "ae")
  trainer.train(make_config(overrides=["--config.total_steps=2"]), ae_dir, progress=False)
  dit = SMALL_DIT + ["--config.data.cache_latents=true", "--config.total_steps=2",
                     f"--config.autoencoder_workdir={ae_dir}"]
  first = trainer.train(make_config("runlocal", dit), str(tmp_path / "a"), progress=False)
  [cached] = os.listdir(os.path.join(cache_dir, "latents"))
  table = np.load(os.path.join(cache_dir, "latents", cached))
  encodes = []
  real = inputs_lib.encode_source
  with pytest.MonkeyPatch.context() as m:
    m.setattr(inputs_lib, "encode_source", lambda *a, **k: encodes.append(1) or real(*a, **k))
    # Another variant of the denoiser on the same autoencoder and data: reads the table, encodes nothing, and
    # trains on the same clips (its first loss equals the first run's).
    second = trainer.train(make_config("runlocal", dit), str(tmp_path / "b"), progress=False)
    assert encodes == [] and second["history"][0]["loss"] == first["history"][0]["loss"]
    # A retrained autoencoder (other weights) gets its own table.
    trainer.train(make_config(overrides=["--config.total_steps=4"]), ae_dir, progress=False)
    trainer.train(make_config("runlocal", dit), str(tmp_path / "c"), progress=False)
    assert encodes == [1] and len(os.listdir(os.path.join(cache_dir, "latents"))) == 2
  assert table.shape[0] == len(inputs_lib.open_source(make_config("runlocal", dit)))


@pytest.mark.slow  # trains an autoencoder, then starts a denoiser run
def test_sigterm_while_encoding_latents_stops_before_the_encoding_ends(tmp_path, monkeypatch):
  # data.cache_latents encodes every training episode before the first step (minutes on a CPU): a preemption
  # notice must stop the run at the next encoder call, not after the whole table.
  ae_dir = str(tmp_path / "ae")
  trainer.train(make_config(overrides=["--config.total_steps=2"]), ae_dir, progress=False)
  config = make_config("runlocal", SMALL_DIT + ["--config.data.cache_latents=true", "--config.total_steps=5",
                                                f"--config.autoencoder_workdir={ae_dir}"])
  real, reads = inputs_lib.encode_source, []

  class SignalOnThirdRead:  # the source the encoder reads: SIGTERM arrives while its first call is assembled
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, index):
      reads.append(index)
      if len(reads) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      return self.source[index]

  monkeypatch.setattr(inputs_lib, "encode_source", lambda source, *a, **k: real(SignalOnThirdRead(source), *a, **k))
  summary = trainer.train(config, str(tmp_path / "dit"), progress=False)
  assert summary["stopped_by"] == "SIGTERM" and summary["end_step"] == 0
  per_call = 128 // 17  # episodes per encoder call (17 frames each)
  assert len(reads) == 1 + per_call < len(inputs_lib.open_source(config)), "the encoding went on past its first call"
  assert checkpoint_lib.Checkpointer(str(tmp_path / "dit"), read_only=True).all_steps() == []
  # Asked with a stop already pending, encode_source does no work at all.
  assert inputs_lib.encode_source(inputs_lib.open_source(config), None, None, should_stop=lambda: True) is None


def test_a_stopped_stage_stops_the_demo(tmp_path, monkeypatch):
  from ap_jax import cli, demo

  calls = []

  def stopped_train(config, workdir, **kwargs):
    calls.append(config.stage)
    return dict(stopped_by="SIGTERM", end_step=3, total_steps=int(config.total_steps))

  monkeypatch.setattr(trainer, "train", stopped_train)
  monkeypatch.setattr(demo, "build_data", lambda out, episodes, players=(2, 4): str(tmp_path / "data"))
  with pytest.raises(trainer.Stopped, match="stopped by SIGTERM while training the autoencoder"):
    demo.train_stages(str(tmp_path), str(tmp_path / "data"), ae_steps=10, dit_steps=10, progress=False)
  assert calls == ["autoencoder"], "the denoiser must not train on a half-trained autoencoder"
  assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 128 + signal.SIGTERM


def test_clean_errors_leave_no_stray_tracebacks(tmp_path):
  r = subprocess.run([sys.executable, "-m", "ap_jax", "train", "--config", f"{TINY}:runlocal", "--workdir",
                      str(tmp_path / "w"), "--no-progress"], capture_output=True, text=True, timeout=600)
  assert r.returncode == 2
  assert "needs --config.autoencoder_workdir" in r.stderr
  assert "Traceback" not in r.stderr and "cannot schedule new futures" not in r.stderr, r.stderr[-2000:]


def test_torn_metrics_line_is_dropped_and_reported(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
  assert [r["step"] for r in telemetry.read_metrics(str(path))] == [1, 2]
  assert "line 3 does not parse" in caplog.text
  writer = telemetry.MetricsWriter(str(tmp_path), True)
  writer.write(3, {"loss": 0.3})
  writer.close()
  assert "cut by an interrupted write" in caplog.text
  assert [r["step"] for r in telemetry.read_metrics(str(path))] == [1, 2, 3]
  assert telemetry.plot_losses(str(tmp_path))


def test_unknown_config_arguments_are_errors():
  for name in ("tiny", "small", "base", "meltingpot"):
    with pytest.raises(config_utils.ConfigError, match=r"unknown config argument\(s\) 'runlocl' \(did you mean "
                                                       r"'runlocal'\?\); this config knows: autoencoder, runlocal"):
      config_utils.load_config(os.path.join(ROOT, "configs", f"{name}.py") + ":autoencoder,runlocl")


@pytest.mark.slow  # a few training processes; CI runs it in its slow step
def test_sigkill_at_random_points_and_during_saves_resumes_bit_exact(straight_run, tmp_path):
  workdir = str(tmp_path / "soak")
  records = crash_soak.run_soak(workdir, kills=2, total=20, seed=1)
  assert records[0]["save_in_flight"], "the first kill is meant to land while a save is being written"
  assert crash_soak.mismatches(crash_soak.logged_losses(workdir), straight_run, 20) == []


def test_meltingpot_configs_name_their_training_and_held_out_substrates():
  for arg in ("tiny", "", "tiny,autoencoder"):
    config = config_utils.load_config("meltingpot" + (f":{arg}" if arg else ""))
    spec, held = locate.generation_spec(config.data), locate.generation_spec(config.data, heldout=True)
    assert spec.source == held.source == "meltingpot"
    assert spec.substrates and held.substrates and not set(spec.substrates) & set(held.substrates)
    assert spec.canvas_hw == held.canvas_hw == tuple(locate.frame_hw(config))
    assert (held.steps, held.policy, held.seed) == (spec.steps, spec.policy, spec.seed)
    assert spec.content_hash() != held.content_hash()
  tiny = config_utils.load_config("meltingpot:tiny")
  assert tiny.model_name == "tiny" and tiny.model.dit.previous_frame_input  # the built-in game's tiny recipe
  # How a dataset is generated (worker processes, vmapped chunk) does not change what it holds, nor its name.
  spec = locate.generation_spec(tiny.data)
  assert spec.content_hash() == dataclasses.replace(spec, workers=7, chunk=3).content_hash()
  assert spec.content_hash() != dataclasses.replace(spec, episodes=spec.episodes + 1).content_hash()
  # Substrate lists from the command line.
  config_utils.apply_overrides(tiny, ["--config.data.substrates=coins, clean_up",
                                      "--config.data.heldout_substrates=clean_up"])
  assert tiny.data.substrates == ("coins", "clean_up")
  with pytest.raises(config_utils.ConfigError, match=r"includes training substrates \['clean_up'\]"):
    locate.generation_spec(tiny.data, heldout=True)
  config_utils.apply_overrides(tiny, ["--config.data.heldout_substrates=()"])
  with pytest.raises(config_utils.ConfigError, match="no held-out substrates: set data.heldout_substrates"):
    locate.generation_spec(tiny.data, heldout=True)
  with pytest.raises(config_utils.ConfigError, match="held-out substrates are for data.source = 'meltingpot', "
                                                     "not 'builtin'"):
    locate.resolve_dataset(config_utils.load_config("tiny").data, heldout=True)


def test_meltingpot_tiny_compression_sets_the_autoencoder_and_the_patch_together():
  """`compress=2` (default) and `compress=4`: a token is one 8 px cell either way (9 x 16 tokens a 72 x 128 frame),
  on the same dataset; the denoiser weights the players' cells, the autoencoder stage has its own weighting."""
  for arg, mult, patch in (("tiny", (1, 2), 4), ("tiny,compress=4", (1, 2, 4), 2)):
    config = config_utils.load_config(f"meltingpot:{arg}")
    assert (tuple(config.model.vae.channel_mult), config.model.dit.patch_size) == (mult, patch)
    factor = 2 ** (len(mult) - 1)
    assert tuple(s // factor // patch for s in locate.frame_hw(config)) == (9, 16)
    assert config.model.flow.subject_loss_weight == 12.0 and config.model.flow.video_target == "residual"
    assert config.model.dit.subject_rope_previous
  assert config_utils.load_config("meltingpot:tiny,autoencoder").model.flow.subject_loss_weight == 0.0
  assert config_utils.load_config("tiny").model.flow.video_target == "velocity"  # the built-in game keeps Wan's
  assert not config_utils.load_config("tiny").model.dit.subject_rope_previous  # ... and the paper's one position
  assert (locate.generation_spec(config_utils.load_config("meltingpot:tiny,compress=4").data).content_hash()
          == locate.generation_spec(config_utils.load_config("meltingpot:tiny").data).content_hash())
  with pytest.raises(ValueError, match="compress=3: expected 2 or 4"):
    config_utils.load_config("meltingpot:tiny,compress=3")


@pytest.mark.parametrize("base", ["tiny", "meltingpot:tiny"])
def test_every_comparison_variant_builds_a_denoiser_on_each_config(base):
  """`ap-jax compare` applies each variant's overrides on top of its config: each must give a model the denoiser
  accepts (meltingpot:tiny's previous-cell rotation needs subject tokens, so the baseline turns it off), and the
  baseline has no subject tokens."""
  from ap_jax import demo
  from ap_jax.model import dit_model
  for name, overrides in demo.VARIANTS.items():
    config = demo._config("", overrides, base)
    settings = dit_model.Settings.from_config(config.model)
    assert settings.subject_tokens == (name != "global_actions"), name
  full = dit_model.Settings.from_config(demo._config("", demo.VARIANTS["full"], base).model)
  assert full.subject_rope_previous == (base == "meltingpot:tiny")


def test_meltingpot_tiny_canvas_and_patch_arguments():
  """`canvas=HxW` sets the generated canvas (a new dataset), `patch=N` the denoiser's patch; a canvas whose latents
  the patch does not tile is refused, naming both."""
  config = config_utils.load_config("meltingpot:tiny,canvas=128x128,patch=8")
  assert locate.frame_hw(config) == (128, 128) and config.model.dit.patch_size == 8
  assert tuple(config.model.vae.channel_mult) == (1, 2)
  spec = locate.generation_spec(config.data)
  assert spec.canvas_hw == (128, 128)
  assert spec.content_hash() != locate.generation_spec(config_utils.load_config("meltingpot:tiny").data).content_hash()
  with pytest.raises(ValueError, match=r"canvas 72x128 at compress=2 gives 36 x 64 latents, not a multiple of "
                                       r"patch 8: expected a canvas in multiples of 16 px"):
    config_utils.load_config("meltingpot:tiny,patch=8")
  with pytest.raises(ValueError, match=r"canvas='72by128': expected HEIGHTxWIDTH in pixels"):
    config_utils.load_config("meltingpot:tiny,canvas=72by128")
  with pytest.raises(ValueError, match="canvas= and patch= are arguments of the tiny recipe"):
    config_utils.load_config("meltingpot:patch=4")


@pytest.mark.slow  # Melting Pot episodes, detectors fitted on first use, two stages compiled: about 3 min
@pytest.mark.meltingpot
def test_meltingpot_config_trains_and_scores_its_held_out_substrates(tmp_path, monkeypatch):
  pytest.importorskip("meltingpot")
  from ap_jax import cli

  monkeypatch.setenv("AP_JAX_CACHE", str(tmp_path / "cache"))
  config = ["--config", "meltingpot:tiny,runlocal", "--config.data.heldout_substrates=collaborative_cooking__ring"]
  ae, dit, out = str(tmp_path / "ae"), str(tmp_path / "dit"), str(tmp_path / "heldout.json")
  assert cli.main(["train", "--config", "meltingpot:tiny,autoencoder,runlocal", "--workdir", ae,
                   "--config.total_steps=2"]) == 0
  assert cli.main(["train", *config, "--workdir", dit, "--config.total_steps=2",
                   f"--config.autoencoder_workdir={ae}"]) == 0
  datasets = os.listdir(tmp_path / "cache" / "datasets")
  assert len(datasets) == 1 and datasets[0].startswith("meltingpot-")  # generated from the config on first use
  assert cli.main(["eval", "--workdir", dit, "--heldout", "--episodes", "1", "--steps", "2", "--denoise-steps", "1",
                   "--out", out]) == 0
  results = json.load(open(out))
  assert results["heldout"] is True and set(results["by_substrate"]) == {"collaborative_cooking__ring"}
  assert results["data"].startswith(str(tmp_path / "cache" / "datasets" / "meltingpot-"))
  assert 0.0 <= results["movement_accuracy"] <= 1.0 and results["episodes"][0]["steps"] == 2
  assert cli.main(["eval", "--workdir", dit, "--heldout", "--players", "2-2", "--out", out]) == 2
  # Fresh episodes of a player count only one training substrate takes (figure_eight takes at most 6).
  assert cli.main(["eval", "--workdir", dit, "--players", "8-8", "--episodes", "1", "--steps", "2",
                   "--denoise-steps", "1", "--out", out]) == 0
  results = json.load(open(out))
  assert set(results["by_substrate"]) == {"collaborative_cooking__crowded"} and set(results["by_players"]) == {"8"}
  assert results["episodes"][0]["name"].startswith("fresh:8p:") and results["episodes"][0]["steps"] == 2


def test_a_reader_lists_again_when_a_step_vanishes_mid_listing(tmp_path, monkeypatch):
  # The race CI hit: Orbax lists the step folders, then reads each one's commit time; the training run's
  # max_to_keep clean-up can delete a folder in between, and the read fails with FileNotFoundError (its metadata
  # file is gone, so Orbax falls back to stat-ing the folder). The read fails here the same way.
  import grain
  from orbax.checkpoint._src.path import step as orbax_step

  workdir = str(tmp_path / "w")
  with checkpoint_lib.Checkpointer(workdir, async_save=False) as owner:
    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    for step in (1, 2):
      owner.save(step, {"w": np.arange(3.0)}, it, {"step": step})
  real, vanished = orbax_step.Metadata.commit_timestamp, []

  def vanishing(name, times):
    def commit_timestamp(self):
      if os.path.basename(str(self.path)) == name and len(vanished) < times:
        vanished.append(name)
        raise FileNotFoundError(2, "No such file or directory", str(self.path))
      return real.fget(self)
    return property(commit_timestamp)

  monkeypatch.setattr(orbax_step.Metadata, "commit_timestamp", vanishing("1", 2))
  reader = checkpoint_lib.Checkpointer(workdir, read_only=True)  # construction lists once: step 1 vanishes
  assert reader.all_steps() == [1, 2] and vanished == ["1", "1"]  # and once more in all_steps's reload
  monkeypatch.setattr(orbax_step.Metadata, "commit_timestamp", vanishing("2", 10 ** 6))
  with pytest.raises(FileNotFoundError):  # a folder that stays missing is still an error
    reader.all_steps()


@pytest.mark.slow  # two training runs: 5 min on 2 busy cores (test_fs.py covers the writers one by one, fast)
def test_a_bucket_workdir_holds_every_run_output(memory_bucket, tmp_path, monkeypatch):
  """`ap-jax train --workdir gs://...`: config.json, metrics.jsonl, TensorBoard, loss.png and summary.json go
  through the object store (conftest's in-memory `gs://`), and a second run resumes and appends. Orbax writes a
  gs:// checkpoint with TensorStore's own GCS driver, which has no offline stand-in, so the checkpoints alone are
  sent to a local folder here."""
  from ap_jax import cli, fs

  real_init = checkpoint_lib.Checkpointer.__init__

  def local_checkpoints(self, workdir, **kwargs):
    real_init(self, str(tmp_path / "ckpt") if fs.is_url(workdir) else workdir, **kwargs)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "__init__", local_checkpoints)
  monkeypatch.chdir(tmp_path)  # a URL taken as a local path would leave a folder named `gs:` here
  run = "gs://bkt/runs/ae"
  train = ["train", "--config", f"{TINY}:autoencoder,runlocal", "--workdir", run, "--no-progress", *SMALL_AE,
           "--config.checkpoint_every=2"]
  assert cli.main(train + ["--config.total_steps=2"]) == 0
  assert cli.main(train + ["--config.total_steps=3"]) == 0  # resumes from step 2
  assert {"config.json", "metrics.jsonl", "loss.png", "tensorboard", "summary.json"} <= set(fs.listdir(run))
  assert [r["step"] for r in telemetry.read_metrics(f"{run}/metrics.jsonl")] == [1, 2, 3]
  summary = json.loads(fs.read_text(f"{run}/summary.json"))
  assert (summary["start_step"], summary["end_step"]) == (2, 3)
  assert json.loads(fs.read_text(f"{run}/config.json"))["stage"] == "autoencoder"
  assert fs.glob(f"{run}/tensorboard/events.out.tfevents.*")
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_mesh_flags_name_a_mesh_over_the_first_devices():
  # `--mesh` of sample/eval and `bench sampling --meshes` read the same text.
  assert mesh_lib.parse_mesh_spec("data=4,tensor=2") == dict(data=4, fsdp=1, context=1, tensor=2)
  mesh = mesh_lib.mesh_from_spec("data=2,tensor=2")
  assert dict(mesh.shape) == dict(data=2, fsdp=1, context=1, tensor=2)
  assert list(mesh.devices.flat) == jax.devices()[:4]
  assert dict(mesh_lib.mesh_from_spec("data=-1,tensor=2").shape)["data"] == len(jax.devices()) // 2
  for bad in ("data=4,pipeline=2", "data=0", "data=four", "data=-2"):
    with pytest.raises(mesh_lib.MeshError, match=f"mesh '{bad}': expected AXIS=SIZE"):
      mesh_lib.parse_mesh_spec(bad)
  with pytest.raises(mesh_lib.MeshError, match="mesh 'data=16' needs 16 devices, but there are 8"):
    mesh_lib.mesh_from_spec("data=16")


def test_batch_shards_and_batch_sharding_follow_the_batch_rule():
  # One helper for the trainer's batch check and the sampler's padding and placement: the batch dimension goes over
  # the mesh axes the `batch` rule names that the mesh has, and the shard count is the product of their sizes.
  mesh = mesh_lib.mesh_from_spec("data=2,fsdp=2,tensor=2")
  rules = mesh_lib.rules_from_config(config_utils.load_config(f"{TINY}:runlocal"))
  assert mesh_lib.batch_shards(mesh, rules) == 4
  assert mesh_lib.batch_sharding(mesh, rules).spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert mesh_lib.batch_shards(mesh_lib.mesh_from_spec("tensor=8"), rules) == 1
  assert mesh_lib.batch_shards(mesh, (("batch", "data"),)) == 2
  assert mesh_lib.batch_shards(mesh, (("batch", None),)) == 1
  with pytest.raises(mesh_lib.MeshError, match="global batch 6 does not divide over the 4 batch shards"):
    mesh_lib.check_batch(6, mesh, rules)


def test_autoencoder_crops_on_subjects_contain_a_real_player():
  """`autoencoder_crop_on_subjects=1` puts a real player inside every crop of a frame that has one; padding slots
  are never chosen; frames of clips without players fall back to uniform crops; bad fractions are refused."""
  b, t, h, w, p = 4, 2, 96, 96, 3
  rng = np.random.default_rng(0)
  positions = rng.uniform(4, h - 4, size=(b, t, p, 2)).astype(np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 1]], bool)
  positions[~np.broadcast_to(mask[:, None], (b, t, p))] = 2.0  # padding slots sit in a corner, far from players
  frames = np.zeros((b, t, h, w, 2), np.float32)  # channel 0: real players' pixels, channel 1: padding's
  for i, j, k in np.ndindex(b, t, p):
    y, x = positions[i, j, k].astype(int)
    frames[i, j, y, x, 0 if mask[i, k] else 1] = 1.0
  for seed in range(5):
    crops = np.asarray(stages_lib.random_crops(jax.numpy.asarray(frames), 24, jax.random.PRNGKey(seed),
                                            (positions, mask, 1.0)))
    assert crops.shape == (b * t, 1, 24, 24, 2)
    has_player = crops[..., 0].reshape(b * t, -1).max(-1) > 0
    assert has_player.reshape(b, t)[mask.any(-1)].all()
  uniform = np.asarray(stages_lib.random_crops(jax.numpy.asarray(frames), 24, jax.random.PRNGKey(0)))
  assert uniform.shape == (b * t, 1, 24, 24, 2)
  config = config_utils.load_config(f"{TINY}:autoencoder,runlocal")
  config_utils.apply_overrides(config, ["--config.autoencoder_crop_on_subjects=1.5"])
  with pytest.raises(config_utils.ConfigError, match="autoencoder_crop_on_subjects = 1.5"):
    stages_lib.build_stage(config)
