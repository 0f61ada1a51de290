"""The rollouts dataset (TFDS ArrayRecord) and the Grain pipeline: round trip, state, sharding, bad input."""

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ap_jax import actions as A
from ap_jax.data import dataset, frames, pipeline, schema, tfds_builder
from ap_jax.games import gridgame as G

SPEC = tfds_builder.GenerationSpec(episodes=40, steps=6, players=(1, 4), chunk=16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return dataset.build(SPEC, str(tmp_path_factory.mktemp("data") / "builtin"))


def test_build_then_read_round_trip(data_dir):
  info = dataset.read_info(data_dir)
  assert {s: info.num_episodes(s) for s in info.split_files} == {"train": 32, "validation": 4, "test": 4}
  assert info.generation["steps"] == 6 and info.config_name == "builtin"
  seeds = {}
  for split in ("train", "validation", "test"):
    source = dataset.open_split(data_dir, split)
    episodes = [source[i] for i in range(len(source))]
    for ep in episodes:
      schema.validate_episode(ep)
    seeds[split] = {ep["seed"] for ep in episodes}
    # Stored episodes are exactly what the game generates from their seeds.
    ep = episodes[0]
    again = G.generate_episodes([ep["seed"]], config=G.GameConfig(), steps=6, players=(1, 4))[0]
    for key in ("frames", "actions", "positions", "orientations", "colors"):
      np.testing.assert_array_equal(ep[key], again[key])
    assert ep["substrate"] == again["substrate"] and ep["source"] == "builtin"
  assert seeds["train"] == set(range(32))
  assert not (seeds["train"] & seeds["test"]) and not (seeds["validation"] & seeds["test"])


def test_pipeline_clips_match_their_episodes(data_dir):
  source = dataset.open_split(data_dir, "train")
  by_seed = {source[i]["seed"]: source[i] for i in range(len(source))}
  config = pipeline.PipelineConfig(clip_steps=3, global_batch_size=4, max_players=8)
  batch = next(iter(pipeline.make_dataset(source, config, process_index=0, process_count=1)))
  assert batch["frames"].shape == (4, 4, 64, 64, 3) and batch["frames"].dtype == np.float32
  assert batch["actions"].shape == (4, 3, 8) and batch["positions"].shape == (4, 4, 8, 2)
  assert -1.0 <= batch["frames"].min() and batch["frames"].max() <= 1.0
  for b in range(4):
    ep = by_seed[int(batch["seed"][b])]
    start, n = int(batch["start"][b]), ep["actions"].shape[1]
    frames = np.round((batch["frames"][b] + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(frames, ep["frames"][start:start + 4])
    mask = batch["player_mask"][b]
    assert mask.sum() == n == batch["num_players"][b]
    assert np.all(batch["actions"][b][:, ~mask] == A.NOOP)
    # The slot permutation moves every per-player array together: match players by colour.
    for p in range(n):
      slot = int(np.nonzero(np.all(batch["colors"][b] == ep["colors"][p], -1) & mask)[0][0])
      np.testing.assert_array_equal(batch["actions"][b][:, slot], ep["actions"][start:start + 3, p])
      np.testing.assert_array_equal(batch["positions"][b][:, slot], ep["positions"][start:start + 4, p])
      np.testing.assert_array_equal(batch["orientations"][b][:, slot], ep["orientations"][start:start + 4, p])


def test_frames_go_to_the_model_range_and_back_exactly():
  # One normalisation for the pipeline, latent encoding and the sampler: uint8 x -> x * 2/255 - 1 in float32.
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
  scaled = frames.to_model_range(pixels)
  assert scaled.dtype == np.float32 and scaled.min() == -1.0 and scaled.max() == 1.0
  np.testing.assert_array_equal(scaled, pixels.astype(np.float32) * (2.0 / 255.0) - 1.0)
  np.testing.assert_array_equal(frames.to_uint8(scaled), pixels)
  np.testing.assert_array_equal(frames.to_model_range(scaled), scaled)  # floats are taken as already in range
  np.testing.assert_array_equal(frames.to_uint8(np.array([-1.5, 0.0, 2.0])), [0, 128, 255])  # rounded, clipped
  with pytest.raises(ValueError, match="frames have dtype int32, expected uint8 or floating point"):
    frames.to_model_range(pixels.astype(np.int32))


def test_latent_episodes_give_the_same_clips_with_latents_for_frames(data_dir):
  # data.cache_latents: episodes held in memory with their latents; every clip is the stored source's clip (same
  # windows, slot permutations and per-player arrays) with the latents cut like the frames, and no frames.
  source = dataset.open_split(data_dir, "train")
  latents = np.random.default_rng(0).normal(size=(len(source), 7, 2, 2, 3)).astype(np.float32)
  held = pipeline.LatentEpisodes(source, latents)
  config = pipeline.PipelineConfig(clip_steps=3, global_batch_size=4, max_players=8)
  stored = pipeline.make_dataset(source, config, process_index=0, process_count=1)
  cached = pipeline.make_dataset(held, config, process_index=0, process_count=1)
  index = {source[i]["seed"]: i for i in range(len(source))}
  for want, got, _ in zip(stored, cached, range(10)):  # past the first epoch of 32 / 4 batches
    assert "frames" not in got and set(want) - {"frames"} == set(got) - {"latents"}
    for key in got:
      if key != "latents":
        np.testing.assert_array_equal(got[key], want[key])
    for b in range(4):
      start = int(got["start"][b])
      np.testing.assert_array_equal(got["latents"][b], latents[index[int(got["seed"][b])]][start:start + 4])
  with pytest.raises(ValueError, match="3 latent episodes for a source of 32"):
    pipeline.LatentEpisodes(source, latents[:3])
  with pytest.raises(ValueError, match="neither frames nor latents"):
    pipeline.make_clip({k: v for k, v in source[0].items() if k != "frames"}, config)


def test_slot_permutation_varies_and_can_be_disabled(data_dir):
  source = dataset.open_split(data_dir, "train")
  on = pipeline.PipelineConfig(clip_steps=2, global_batch_size=8)
  masks = np.concatenate([b["player_mask"] for b, _ in zip(pipeline.make_dataset(source, on, process_index=0,
                                                                                process_count=1), range(4))])
  assert len({tuple(m) for m in masks}) > 4
  off = pipeline.PipelineConfig(clip_steps=2, global_batch_size=8, permute_players=False)
  batch = next(iter(pipeline.make_dataset(source, off, process_index=0, process_count=1)))
  for m, n in zip(batch["player_mask"], batch["num_players"]):
    np.testing.assert_array_equal(m, np.arange(8) < n)


def test_iterator_state_restores_the_next_batches(data_dir):
  source = dataset.open_split(data_dir, "train")
  config = pipeline.PipelineConfig(clip_steps=4, global_batch_size=4, read_threads=2)
  it = iter(pipeline.make_dataset(source, config, process_index=0, process_count=1))
  for _ in range(11):  # past the first epoch (32 episodes / 4): the reshuffled second epoch must match too
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]
  fresh = iter(pipeline.make_dataset(source, config, process_index=0, process_count=1))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_slices_of_the_same_global_batches(data_dir):
  source = dataset.open_split(data_dir, "train")
  config = pipeline.PipelineConfig(clip_steps=2, global_batch_size=8, num_epochs=1, shuffle=True)
  single = list(pipeline.make_dataset(source, config, process_index=0, process_count=1))
  parts = [list(pipeline.make_dataset(source, config, process_index=k, process_count=2)) for k in range(2)]
  assert len(single) == len(parts[0]) == len(parts[1]) == 4
  seen = [{int(s) for batch in part for s in batch["seed"]} for part in parts]
  assert not (seen[0] & seen[1])
  assert seen[0] | seen[1] == set(range(32))
  # Process 0 holds the first half of every global batch, process 1 the second: together, the single-process
  # batch exactly (same episodes, windows and slot permutations).
  for whole, first, second in zip(single, *parts):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])


def test_live_source_reads_disjoint_reproducible_episodes():
  spec = tfds_builder.GenerationSpec(steps=5, players=(2, 3))
  config = pipeline.PipelineConfig(clip_steps=4, global_batch_size=8)
  batches = [next(iter(pipeline.make_dataset(pipeline.LiveEpisodeSource(spec, chunk=4), config,
                                             process_index=k, process_count=2))) for k in range(2)]
  seeds = [set(b["seed"].tolist()) for b in batches]
  assert not (seeds[0] & seeds[1])
  assert seeds[0] | seeds[1] == {pipeline.LIVE_SEED_OFFSET + i for i in range(8)}
  again = next(iter(pipeline.make_dataset(pipeline.LiveEpisodeSource(spec), config, process_index=0,
                                          process_count=2)))
  np.testing.assert_array_equal(again["frames"], batches[0]["frames"])


def test_interrupted_build_leaves_no_dataset(tmp_path, monkeypatch):
  out = str(tmp_path / "ds")

  def failing(spec, seeds):
    yield from list(tfds_builder._generate_builtin(spec, seeds[:3]))
    raise KeyboardInterrupt("interrupted")

  monkeypatch.setattr(tfds_builder, "generate", failing)
  with pytest.raises(KeyboardInterrupt):
    dataset.build(SPEC, out)
  assert not os.path.exists(out)
  assert not glob.glob(out + ".incomplete-*")


@pytest.mark.slow  # generates episodes until killed; CI runs it in its slow step
def test_killed_build_process_leaves_no_dataset(tmp_path):
  out = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, "-m", "ap_jax", "data", "--episodes", "50000", "--steps", "8",
                           "--out", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    # Kill as soon as TFDS has started writing shard files (an event, not a deadline: a busy machine is slow to
    # get there, but 50,000 episodes cannot finish before the first shard appears).
    while not glob.glob(os.path.join(out + ".incomplete-*", "*", "*", "*", "*.array_record*")):
      assert proc.poll() is None, f"the build exited before writing: {proc.stderr.read()[-2000:]}"
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  finally:
    if proc.poll() is None:
      proc.kill()
  assert not os.path.exists(out)
  [partial] = glob.glob(out + ".incomplete-*")
  with pytest.raises(dataset.DatasetError, match="unfinished build"):
    dataset.read_info(partial)
  # The next build on this host clears the leftovers of the dead build (its owner process is gone) ...
  dataset.build(tfds_builder.GenerationSpec(episodes=3, steps=2), out)
  assert os.path.exists(os.path.join(out, "dataset_info.json")) and not glob.glob(out + ".incomplete-*")


def test_a_build_in_progress_is_not_removed_by_another(tmp_path):
  # ... but not a directory whose writer is alive (several processes may build the same dataset at once).
  out = str(tmp_path / "busy")
  alive = out + ".incomplete-other"
  os.makedirs(alive)
  with open(os.path.join(alive, dataset.OWNER_FILE), "w") as f:
    f.write('{"host": "%s", "pid": %d}' % (__import__("socket").gethostname(), os.getppid()))
  dataset.build(tfds_builder.GenerationSpec(episodes=3, steps=2), out)
  assert os.path.isdir(alive)


def test_overwrite_replaces_only_a_dataset(data_dir, tmp_path):
  plain = tmp_path / "notes.txt"
  plain.write_text("keep me")
  other = tmp_path / "photos"
  other.mkdir()
  (other / "a.jpg").write_bytes(b"x")
  spec = tfds_builder.GenerationSpec(episodes=3, steps=2)
  for path in (plain, other):
    with pytest.raises(FileExistsError, match="is not an ap_jax dataset"):
      dataset.build(spec, str(path), overwrite=True)
  assert plain.read_text() == "keep me" and (other / "a.jpg").exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  assert os.path.exists(os.path.join(dataset.build(spec, str(empty), overwrite=True), dataset.INFO_FILE))


def _copy(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return dst


def _train_file(path):
  return dataset.read_info(path).split_files["train"][0][0]


def test_missing_truncated_and_corrupt_files_name_the_file(data_dir, tmp_path):
  missing = _copy(data_dir, str(tmp_path / "missing"))
  os.remove(_train_file(missing))
  with pytest.raises(dataset.DatasetError, match=r"ArrayRecord file .*train\.array_record-00000-of-00001 is missing"):
    dataset.open_split(missing, "train")

  truncated = _copy(data_dir, str(tmp_path / "truncated"))
  path = _train_file(truncated)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  with pytest.raises(dataset.DatasetError, match=r"train\.array_record-00000-of-00001 is corrupt or truncated"):
    dataset.open_split(truncated, "train")

  corrupt = _copy(data_dir, str(tmp_path / "corrupt"))
  path = _train_file(corrupt)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    f.write(b"\xff" * 256)  # damage a data chunk: its checksum no longer matches
  # Depending on what the damage hits (a block header or a chunk's data), opening or decoding fails; either way
  # the error names the file.
  with pytest.raises(dataset.DatasetError, match=r"train\.array_record-00000-of-00001.*(hash mismatch|orrupt)"):
    source = dataset.open_split(corrupt, "train")
    for i in range(len(source)):
      source[i]


def test_bad_input_gets_clear_errors(data_dir, tmp_path):
  with pytest.raises(dataset.DatasetError, match="is not an ap_jax dataset"):
    dataset.open_split(str(tmp_path), "train")
  with pytest.raises(dataset.DatasetError, match="does not exist"):
    dataset.open_split(str(tmp_path / "nowhere"), "train")
  with pytest.raises(dataset.DatasetError, match="split 'dev' is not in"):
    dataset.open_split(data_dir, "dev")
  with pytest.raises(ValueError, match="unknown source 'atari'"):
    tfds_builder.check_spec(tfds_builder.GenerationSpec(source="atari"))
  with pytest.raises(ValueError, match="players = 2-9"):
    tfds_builder.check_spec(tfds_builder.GenerationSpec(players=(2, 9)))
  with pytest.raises(ValueError, match="num_players = 6.*allows 1 to 4"):
    tfds_builder.check_spec(tfds_builder.GenerationSpec(players=(2, 6), grid_hw=(3, 3)))
  with pytest.raises(ValueError, match="unknown layout 'maze'"):
    tfds_builder.check_spec(tfds_builder.GenerationSpec(substrates=("maze",)))
  source = dataset.open_split(data_dir, "train")
  with pytest.raises(ValueError, match="clip_steps = 7 is longer than the episodes .* which have 6 steps"):
    pipeline.make_dataset(source, pipeline.PipelineConfig(clip_steps=7), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="up to 4 players, but max_players = 3"):
    pipeline.make_dataset(source, pipeline.PipelineConfig(max_players=3), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="global_batch_size = 6 does not divide over 4 processes"):
    pipeline.make_dataset(source, pipeline.PipelineConfig(global_batch_size=6), process_index=0, process_count=4)
  with pytest.raises(FileExistsError, match="already exists"):
    dataset.build(SPEC, data_dir)


def test_cli_data_and_show(tmp_path):
  out = str(tmp_path / "cli_ds")
  run = lambda *a: subprocess.run([sys.executable, "-m", "ap_jax", *a], capture_output=True, text=True)
  r = run("data", "--episodes", "6", "--steps", "3", "--players", "2-3", "--out", out)
  assert r.returncode == 0, r.stderr
  assert "wrote" in r.stdout
  gif = str(tmp_path / "preview.gif")
  r = run("show", out, "--episode", "1", "--out", gif)
  assert r.returncode == 0, r.stderr
  import imageio.v2 as imageio

  frames = imageio.mimread(gif)
  assert len(frames) == 4 and frames[0].shape[1] == 64 * 4
  r = run("show", out, "--episode", "99", "--out", gif)
  assert r.returncode == 2 and "--episode 99" in r.stderr and "episodes 0 to 3" in r.stderr
  r = run("data", "--players", "2-x", "--out", out)
  assert r.returncode == 2 and "MIN-MAX" in r.stderr
  r = run("show", str(tmp_path), "--out", gif)
  assert r.returncode == 2 and "not an ap_jax dataset" in r.stderr


@pytest.mark.slow  # a Beam pipeline and a fresh compile of the game: 55 s on 2 busy cores
def test_beam_generation_writes_the_same_episodes(data_dir, tmp_path):
  """`ap-jax data --beam-runner DirectRunner`: TFDS's Beam path, a few episodes, the same episodes as the plain
  build (their order in the shards may differ)."""
  pytest.importorskip("apache_beam", reason="the beam extra (apache-beam) is not installed")
  from ap_jax import cli

  out = str(tmp_path / "beam")
  assert cli.main(["data", "--episodes", "40", "--steps", "6", "--players", "1-4", "--out", out,
                   "--beam-runner", "DirectRunner", "--beam-options=--direct_num_workers=1"]) == 0
  for split in ("train", "test"):
    plain, beam = dataset.open_split(data_dir, split), dataset.open_split(out, split)
    by_seed = {ep["seed"]: ep for ep in (beam[i] for i in range(len(beam)))}
    assert sorted(by_seed) == sorted(plain[i]["seed"] for i in range(len(plain)))
    for i in range(len(plain)):
      ep = plain[i]
      for key in ("frames", "actions", "positions", "orientations", "colors", "player_mask"):
        np.testing.assert_array_equal(by_seed[ep["seed"]][key], ep[key])
