"""The sampler and the `ap-jax sample` / `ap-jax eval` commands, on a tiny model trained for two steps.

What is tested is mechanics, not quality (a two-step model draws noise): rollouts are deterministic given a seed
and independent of the batch they run in; a data-parallel mesh gives the single-device rollouts; the KV-cache
path equals re-running the causal model over every frame so far; the sliding window never lets the model attend
over more frames than it was trained on and leaves the frames before it slides untouched; the commands write what
they promise; bad action files are clean CLI errors.

The model is shrunk by config overrides (one code path with configs/tiny.py; the lists mirror test_train.py).
A persistent compilation cache in a temporary directory lets the commands reuse what the sampler tests compiled.
"""

import json
import os

import jax
import numpy as np
import pytest

from ap_jax import cli
from ap_jax import sample as sample_lib
from ap_jax.data import locate
from ap_jax.train import config_utils, trainer
from ap_jax.train import restore as restore_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

SMALL_AE = ["--config.model.vae.channels=8", "--config.model.vae.latent_channels=4",
            "--config.optim.warmup_steps=0", "--config.log_every=1"]
# The autoencoder's checkpoint fingerprint covers the whole model config, so both stages get the DiT overrides.
SIZES = ["--config.model.dit.width=64", "--config.model.dit.depth=2", "--config.model.dit.heads=4",
         "--config.model.dit.mlp=128"]
# The paper's layout (context frame in the sequence, one shared noise level over 2 target frames, KV cache), pinned
# here whatever configs/tiny.py defaults to, so every cache path stays covered.
SMALL_DIT = SIZES + ["--config.data.clip_steps=2", "--config.model.dit.previous_frame_input=false",
                     "--config.model.dit.context_tokens=true", "--config.model.dit.state_facing=false",
                     "--config.model.flow.coord_prior=standard", "--config.model.flow.coord_target=velocity",
                     "--config.data.cache_latents=false"]
# The one-step recipe (docs/research_log.md): previous frame as channels, no context tokens, facing in the state,
# coordinates drawn around the last state, cached latents.
ONE_STEP = SIZES + ["--config.data.clip_steps=1", "--config.model.dit.previous_frame_input=true",
                    "--config.model.dit.context_tokens=false", "--config.model.dit.state_facing=true",
                    "--config.model.flow.coord_prior=previous", "--config.model.flow.coord_noise_std=0.25",
                    "--config.data.cache_latents=true", "--config.sampling.snap_px=8"]
FAST = ["--config.total_steps=2", "--config.checkpoint_every=2", "--config.data.global_batch_size=8",
        "--config.async_checkpointing=false"]
WINDOW = 3  # clip_steps + 1
SAMPLER = dict(denoise_steps=2)  # the commands below use the same settings, so they reuse the compiled chunks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample")
  old_env = os.environ.get("AP_JAX_CACHE")
  os.environ["AP_JAX_CACHE"] = str(root / "cache")
  old_cache = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(root / "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  ae, dit = str(root / "ae"), str(root / "dit")
  load = lambda arg, extra: config_utils.apply_overrides(config_utils.load_config(f"{TINY}:{arg}"),
                                                         SMALL_AE + SMALL_DIT + FAST + extra)
  trainer.train(load("autoencoder,runlocal", []), ae, progress=False)
  trainer.train(load("runlocal", [f"--config.autoencoder_workdir={ae}"]), dit, progress=False)
  yield dit
  jax.config.update("jax_compilation_cache_dir", old_cache)
  if old_env is None:
    os.environ.pop("AP_JAX_CACHE")
  else:
    os.environ["AP_JAX_CACHE"] = old_env


@pytest.fixture(scope="module")
def one_step(workdir):
  """A one-step-recipe denoiser on the same autoencoder (two steps: mechanics, not quality)."""
  root = os.path.dirname(workdir)
  config = config_utils.apply_overrides(config_utils.load_config(f"{TINY}:runlocal"),
                                        SMALL_AE + ONE_STEP + FAST + [f"--config.autoencoder_workdir={root}/ae"])
  path = os.path.join(root, "one_step")
  trainer.train(config, path, progress=False)
  return path, restore_lib.load_trained(path)


@pytest.fixture(scope="module")
def trained(workdir):
  return restore_lib.load_trained(workdir)


def test_loading_for_inference_reads_the_weights_alone(workdir, trained, monkeypatch):
  """`load_trained` restores the EMA (or raw) parameters without building an optimizer or reading Adam's moments,
  and they equal the ones in the whole training state restored the trainer's way."""
  from ap_jax.train import checkpoint as checkpoint_lib
  from ap_jax.train import mesh as mesh_lib, optim as optim_lib, stages as stages_lib, state as state_lib

  config = trained.config
  mesh, rules = mesh_lib.single_device_mesh(), mesh_lib.rules_from_config(config)
  stage = stages_lib.build_stage(config, frozen=trained.vae_params, meta=dict(latent_shift=0.0, latent_scale=1.0))
  tx, _ = optim_lib.build_optimizer(config.optim, int(config.total_steps))
  _, _, abstract = state_lib.build_state(config, stage, tx, mesh, rules)
  with checkpoint_lib.Checkpointer(workdir, read_only=True) as ckpt:
    step, state, _ = ckpt.restore_latest(abstract)

  def no_optimizer(*args, **kwargs):
    raise AssertionError("loading for inference built an optimizer")

  monkeypatch.setattr(optim_lib, "build_optimizer", no_optimizer)
  ema, raw = restore_lib.load_trained(workdir), restore_lib.load_trained(workdir, use_ema=False)
  assert ema.step == raw.step == step
  for name, loaded in (("ema", ema.params), ("params", raw.params)):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(state[name]))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema.params), jax.device_get(trained.params))


@pytest.fixture(scope="module")
def episodes(trained):
  from ap_jax.data import dataset

  source = dataset.open_split(locate.resolve_dataset(trained.config.data), "test")
  return [source[0], source[1]]


@pytest.fixture(scope="module")
def sampler(trained):
  return sample_lib.Sampler.from_trained(trained, **SAMPLER)


def _inputs(episode, steps):
  return (np.asarray(episode["frames"])[None, 0], np.asarray(episode["positions"])[None, 0],
          np.asarray(episode["actions"])[None, :steps])


# ------------------------------------------------------------------------------------------------ sampler


def test_rollout_is_deterministic_and_independent_of_its_batch(sampler, episodes):
  frames, positions, actions = _inputs(episodes[0], 2)
  first = sampler.rollout(frames, positions, actions, seed=3)
  again = sampler.rollout(frames, positions, actions, seed=3)
  other = sampler.rollout(frames, positions, actions, seed=4)
  assert first.frames.shape == (1, 3, 64, 64, 3) and first.frames.dtype == np.uint8
  assert first.positions.shape == (1, 3, actions.shape[2], 2)
  np.testing.assert_array_equal(first.frames, again.frames)
  np.testing.assert_array_equal(first.positions, again.positions)
  np.testing.assert_array_equal(first.frames[:, 0], frames)  # frame 0 is the given frame
  np.testing.assert_array_equal(first.positions[:, 0], positions)
  assert np.abs(first.frames[:, 1:].astype(int) - other.frames[:, 1:]).max() > 0, "the seed changes nothing"
  # In a batch with another episode (more or fewer players), under rollout id 0 it is the same rollout.
  f2, p2, a2 = _inputs(episodes[1], 2)
  p = max(actions.shape[2], a2.shape[2])
  acts = np.zeros((2, 2, p), np.int32)
  pos = np.zeros((2, p, 2), np.float32)
  mask = np.zeros((2, p), bool)
  for row, (pp, aa) in enumerate(((p2, a2), (positions, actions))):
    acts[row, :, :aa.shape[2]], pos[row, :pp.shape[1]], mask[row, :aa.shape[2]] = aa[0], pp[0], True
  batch = sampler.rollout(np.concatenate([f2, frames]), pos, acts, player_mask=mask, seed=3, rollout_ids=[9, 0])
  # Another batch size compiles other kernels: float32 rounding may differ in the last place, no more.
  assert np.abs(batch.frames[1].astype(int) - first.frames[0]).max() <= 1
  np.testing.assert_allclose(batch.positions[1, :, :actions.shape[2]], first.positions[0], atol=1e-2)


def test_kv_cache_equals_rerunning_the_causal_model_over_all_frames(trained, episodes):
  # Heun, guidance (two caches: conditional and null actions) and noised context frames, so every cache path is
  # compared; the window spans the whole rollout, where both paths see the same frames.
  frames, positions, actions = _inputs(episodes[0], 2)
  kwargs = dict(sampler="heun", denoise_steps=2, guidance=1.5, context_noise=0.05, window=3, chunk=1)
  cached = sample_lib.Sampler.from_trained(trained, **kwargs).rollout(frames, positions, actions, seed=1)
  full = sample_lib.Sampler.from_trained(trained, use_cache=False, **kwargs).rollout(frames, positions, actions,
                                                                                     seed=1)
  assert np.abs(cached.frames.astype(int) - full.frames).max() <= 1  # float32 sums in another order, then rounded
  np.testing.assert_allclose(cached.positions, full.positions, atol=1e-2)  # px: float32 noise, amplified by guidance
  assert cached.timing["max_frames_in_view"] == full.timing["max_frames_in_view"] == 3


def test_reencoded_cache_equals_rerunning_the_window_after_it_slides(trained, episodes):
  # With `reencode` (the default) the cached path rebuilds its cache from the kept frames as a fresh clip start,
  # which is exactly what the no-cache path computes, also after the window has slid; appending to the cache and
  # trimming it instead (reencode=False) keeps keys computed while older frames were in view, and differs.
  frames, positions, actions = _inputs(episodes[0], 3 * WINDOW)
  kwargs = dict(denoise_steps=2, window=WINDOW, chunk=1)
  cached = sample_lib.Sampler.from_trained(trained, **kwargs).rollout(frames, positions, actions, seed=1)
  full = sample_lib.Sampler.from_trained(trained, use_cache=False, **kwargs).rollout(frames, positions, actions,
                                                                                     seed=1)
  appended = sample_lib.Sampler.from_trained(trained, reencode=False, **kwargs).rollout(frames, positions, actions,
                                                                                        seed=1)
  assert np.abs(cached.frames.astype(int) - full.frames).max() <= 1
  np.testing.assert_allclose(cached.positions, full.positions, atol=1e-2)
  late = slice(WINDOW + 1, None)  # frames generated after the window first slid
  assert np.abs(appended.frames[:, late].astype(int) - full.frames[:, late]).max() > 1


def test_snapped_coordinates_sit_on_cell_centres(trained, episodes):
  frames, positions, actions = _inputs(episodes[0], 3)
  out = sample_lib.Sampler.from_trained(trained, denoise_steps=2, snap_px=8).rollout(frames, positions, actions)
  np.testing.assert_allclose((out.positions[:, 1:] - 4.0) % 8.0, 0.0, atol=1e-4)
  with pytest.raises(sample_lib.SampleError, match="snap_px = -1"):
    sample_lib.Sampler.from_trained(trained, snap_px=-1)


def test_sliding_window_continues_past_the_training_clip(sampler, episodes):
  frames, positions, actions = _inputs(episodes[0], 2 * WINDOW)
  assert actions.shape[1] == 2 * WINDOW
  long = sampler.rollout(frames, positions, actions, seed=5)
  short = sampler.rollout(frames, positions, actions[:, :WINDOW - 1], seed=5)
  assert long.frames.shape[1] == 2 * WINDOW + 1
  assert long.timing["max_frames_in_view"] == WINDOW  # never more frames than training clips had
  # Until the window first slides, the long rollout is the short one, frame for frame.
  np.testing.assert_array_equal(long.frames[:, :WINDOW], short.frames)
  np.testing.assert_array_equal(long.positions[:, :WINDOW], short.positions)
  assert np.all(np.isfinite(long.positions))
  assert np.all((long.positions >= 0) & (long.positions <= 64))  # fed-back coordinates stay on the canvas


def test_sharded_sampling_matches_one_device(workdir, trained, sampler, episodes):
  # Rollouts over a data=2 mesh (parameters laid out by load_trained) against the single-device sampler.
  from ap_jax.train import mesh as mesh_lib

  mesh = mesh_lib.build_mesh(dict(data=2, fsdp=1, context=1, tensor=1), devices=jax.devices()[:2])
  sharded_model = restore_lib.load_trained(workdir, mesh)
  sharded = sample_lib.Sampler.from_trained(sharded_model, mesh=mesh, rules=mesh_lib.rules_from_config(trained.config),
                                            **SAMPLER)
  inputs = [_inputs(ep, 2) for ep in episodes]
  p = max(a.shape[2] for _, _, a in inputs)
  acts = np.stack([np.pad(a[0], [(0, 0), (0, p - a.shape[2])]) for _, _, a in inputs])
  pos = np.stack([np.pad(q[0], [(0, p - q.shape[1]), (0, 0)]) for _, q, _ in inputs])
  mask = np.stack([np.arange(p) < a.shape[2] for _, _, a in inputs])
  frames = np.concatenate([f for f, _, _ in inputs])
  ref = sampler.rollout(frames, pos, acts, player_mask=mask, seed=2)
  out = sharded.rollout(frames, pos, acts, player_mask=mask, seed=2)
  assert {d.id for d in jax.tree.leaves(sharded_model.params)[0].sharding.device_set} == {0, 1}
  assert np.abs(out.frames.astype(int) - ref.frames).max() <= 1
  np.testing.assert_allclose(out.positions, ref.positions, atol=1e-2)  # px, on a 64 px canvas


def test_bad_sampler_settings_are_named(trained):
  with pytest.raises(sample_lib.SampleError, match="sampler = 'rk4'"):
    sample_lib.Sampler.from_trained(trained, sampler="rk4")
  with pytest.raises(sample_lib.SampleError, match="window = 2 frames, expected at least chunk \\+ 1 = 3"):
    sample_lib.Sampler.from_trained(trained, chunk=2, window=2)
  s = sample_lib.Sampler.from_trained(trained)
  # Defaults follow the training layout: one context frame and clip_steps = 2 frames at one shared noise level.
  assert (s.chunk, s.window) == (2, WINDOW)
  with pytest.raises(sample_lib.SampleError, match="actions give 9 players, but the model has 8 subject slots"):
    s.rollout(np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 9, 2)), np.zeros((1, 2, 9), np.int32))
  with pytest.raises(ValueError, match=r"actions\[0, 1, 0\] = 8, but the action space has 8 actions"):
    s.rollout(np.zeros((1, 64, 64, 3), np.uint8), np.zeros((1, 1, 2)), np.array([[[0], [8]]]))


def test_one_step_model_rollouts(one_step, episodes):
  _, one_step = one_step
  # Chunks of one frame that see only the previous frame (channels), coordinates snapped to the 8 px cells as the
  # config asks, each player's initial facing required (it is part of the state), deterministic per seed.
  episode = episodes[0]
  frames, positions, actions = _inputs(episode, 4)
  facing = np.asarray(episode["orientations"])[None, 0]
  sampler = sample_lib.Sampler.from_trained(one_step, denoise_steps=2)
  assert (sampler.chunk, sampler.snap_px, sampler.state_dims) == (1, 8.0, 4)
  out = sampler.rollout(frames, positions, actions, seed=2, initial_orientations=facing)
  again = sampler.rollout(frames, positions, actions, seed=2, initial_orientations=facing)
  np.testing.assert_array_equal(out.frames, again.frames)
  assert out.frames.shape == (1, 5, 64, 64, 3) and out.positions.shape == (1, 5, actions.shape[2], 2)
  assert out.timing["max_frames_in_view"] == 1
  np.testing.assert_allclose((out.positions[:, 1:] - 4.0) % 8.0, 0.0, atol=1e-4)
  with pytest.raises(sample_lib.SampleError, match="pass initial_orientations"):
    sampler.rollout(frames, positions, actions)
  with pytest.raises(sample_lib.SampleError, match="initial_orientations has shape"):
    sampler.rollout(frames, positions, actions, initial_orientations=facing + 4)
  with pytest.raises(sample_lib.SampleError, match="chunk = 2, but the model reads the previous frame"):
    sample_lib.Sampler.from_trained(one_step, chunk=2, window=3)


def test_eval_command_on_a_one_step_model(one_step, tmp_path):
  out = str(tmp_path / "results.json")
  assert cli.main(["eval", "--workdir", one_step[0], "--split", "test", "--episodes", "2", "--steps", "2",
                   "--denoise-steps", "2", "--out", out]) == 0
  results = json.load(open(out))
  assert results["sampling"]["chunk"] == 1 and results["sampling"]["snap_px"] == 8.0
  assert results["movement_accuracy"] is not None


# ----------------------------------------------------------------------------------------------- commands


def test_sample_command_writes_video_and_coordinates(workdir, tmp_path):
  out = str(tmp_path / "episode.mp4")
  assert cli.main(["sample", "--workdir", workdir, "--episode", "test:0", "--steps", "4", "--denoise-steps", "2",
                   "--out", out]) == 0
  assert os.path.getsize(out) > 0
  record = json.load(open(str(tmp_path / "episode.json")))
  assert record["case"] == "test:0" and record["sampling"]["window"] == WINDOW
  assert len(record["steps"]) == 5
  players = record["players"]
  for step in record["steps"]:
    assert np.asarray(step["predicted_positions"]).shape == (players, 2)
    assert np.asarray(step["true_positions"]).shape == (players, 2)
  assert all(len(s["carried_out"]) == players for s in record["steps"][:-1])
  assert record["steps"][-1]["actions"] is None
  assert set(record["metrics"]) >= {"movement_accuracy", "subject_preservation", "psnr"}

  actions = tmp_path / "three.json"
  actions.write_text(json.dumps({"seed": 12, "layout": "rooms", "actions": [["FORWARD", "NOOP", "TURN_LEFT"],
                                                                             ["STRAFE_LEFT", "INTERACT", "NOOP"]]}))
  out = str(tmp_path / "file.gif")
  assert cli.main(["sample", "--workdir", workdir, "--actions", str(actions), "--denoise-steps", "2",
                   "--out", out]) == 0
  record = json.load(open(str(tmp_path / "file.json")))
  assert record["players"] == 3 and record["layout"] == "rooms" and len(record["steps"]) == 3
  assert record["steps"][0]["actions"] == ["FORWARD", "NOOP", "TURN_LEFT"]
  # Frame 0 is the true game's reset for seed 12: the true and predicted positions start equal.
  assert record["steps"][0]["predicted_positions"] == record["steps"][0]["true_positions"]


def test_eval_command_on_the_split_and_on_fresh_player_counts(workdir, tmp_path, capsys):
  out = str(tmp_path / "results.json")
  assert cli.main(["eval", "--workdir", workdir, "--split", "test", "--episodes", "2", "--steps", "2",
                   "--denoise-steps", "2", "--out", out]) == 0
  results = json.load(open(out))
  for key in ("movement_accuracy", "subject_preservation", "tracking_error_px", "psnr", "ssim"):
    assert results[key] is not None, key
  assert results["episodes"][0]["name"] == "test:0" and len(results["episodes"]) == 2
  assert sorted(results["by_step"]) == ["1", "2"]
  assert results["detector"]["player_accuracy"] == 1.0  # on the true frames
  assert "| all |" in capsys.readouterr().out

  out = str(tmp_path / "players.json")
  assert cli.main(["eval", "--workdir", workdir, "--players", "1-2", "--episodes", "1", "--steps", "2",
                   "--denoise-steps", "2", "--out", out]) == 0
  results = json.load(open(out))
  assert sorted(results["by_players"]) == ["1", "2"] and results["players"] == [1, 2]
  seeds = [e["seed"] for e in results["episodes"]]
  assert all(s >= 400_000_000 for s in seeds), f"fresh episodes must come from held-out seeds, got {seeds}"


@pytest.mark.parametrize("content, message", [
    ({"seed": 1, "actions": [["FORWARD", "JUMP"]]}, "actions\\[0\\]\\[1\\] = 'JUMP' is not an action"),
    ({"seed": 1, "players": 3, "actions": [["FORWARD", "NOOP"]]}, "players = 3, but the actions give 2 players"),
    ({"seed": 1, "actions_by_player": [["NOOP", "NOOP"], ["NOOP"]]}, "actions_by_player\\[1\\] has 1 steps but"),
    ({"actions": [["NOOP"]]}, "no 'seed'"),
], ids=["unknown_action", "player_count", "lengths", "no_seed"])
def test_bad_action_files_are_clean_cli_errors(workdir, tmp_path, capsys, content, message):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(content))
  code = cli.main(["sample", "--workdir", workdir, "--actions", str(path), "--out", str(tmp_path / "v.mp4")])
  assert code == 2
  err = capsys.readouterr().err
  assert "ap-jax sample: error:" in err
  assert __import__("re").search(message, err), err


def test_too_many_steps_and_missing_split_are_clean_cli_errors(workdir, tmp_path, capsys):
  path = tmp_path / "short.json"
  path.write_text(json.dumps({"seed": 1, "actions": [["NOOP"]]}))
  assert cli.main(["sample", "--workdir", workdir, "--actions", str(path), "--steps", "5",
                   "--out", str(tmp_path / "v.mp4")]) == 2
  assert "--steps 5, but action file" in capsys.readouterr().err
  assert cli.main(["eval", "--workdir", workdir, "--split", "nope", "--episodes", "1", "--out",
                   str(tmp_path / "r.json")]) == 2
  assert "split 'nope'" in capsys.readouterr().err


def test_oracle_through_the_autoencoder_scores_its_reconstructions(workdir, tmp_path, capsys):

  ae = os.path.join(os.path.dirname(workdir), "ae")
  data = locate.resolve_dataset(restore_lib.load_trained(workdir).config.data)
  out = str(tmp_path / "oracle_ae.json")
  assert cli.main(["eval", "--oracle", "--autoencoder", ae, "--data", data, "--split", "test", "--episodes", "2",
                   "--steps", "2", "--out", out]) == 0
  results = json.load(open(out))
  assert results["autoencoder"] == os.path.abspath(ae) and results["oracle"] is True
  assert results["psnr"] < 60  # two training steps: reconstructions, not the true frames (100 dB)
  assert results["detector"]["player_accuracy"] == 1.0  # the detector's own accuracy is on the true frames
  assert cli.main(["eval", "--oracle", "--autoencoder", workdir, "--data", data, "--out", out]) == 2
  assert "expected the workdir of a trained autoencoder" in capsys.readouterr().err
