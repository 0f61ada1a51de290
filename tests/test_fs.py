"""`ap_jax.fs`: local paths and `gs://` URLs through one set of operations. The URLs go to an in-memory object
store (conftest's `memory_bucket`: epath's fsspec backend, no append, no network), so these tests run the code a
bucket runs, short of gcsfs or tf.io.gfile themselves."""

import json
import os

import numpy as np
import pytest

from ap_jax import fs, viz
from ap_jax.data import dataset as dataset_lib
from ap_jax.data import tfds_builder
from ap_jax.eval import report
from ap_jax.train import telemetry


def test_object_store_operations(memory_bucket, tmp_path):
  run = "gs://bkt/runs/a"
  assert fs.is_url(run) and not fs.is_url(str(tmp_path)) and fs.absolute(run) == run
  assert fs.join(run, "checkpoints") == "gs://bkt/runs/a/checkpoints" and fs.dirname(run + "/x.json") == run
  fs.write_atomic(fs.join(run, "config.json"), '{"a": 1}')
  fs.append_text(fs.join(run, "metrics.jsonl"), "1\n")
  fs.append_text(fs.join(run, "metrics.jsonl"), "2\n")  # no append on the store: read and written back
  assert fs.read_text(fs.join(run, "metrics.jsonl")) == "1\n2\n"
  assert sorted(fs.listdir(run)) == ["config.json", "metrics.jsonl"] and fs.isdir(run)
  assert fs.glob(run + "/*.json") == [run + "/config.json"]
  fs.rename(run, "gs://bkt/runs/b")
  assert not fs.exists(run) and json.loads(fs.read_text("gs://bkt/runs/b/config.json")) == {"a": 1}
  with fs.local_file("gs://bkt/runs/b/v.gif") as local:  # a writer that needs a local file
    assert not fs.is_url(local)
    with open(local, "wb") as f:
      f.write(b"GIF89a")
  assert fs.read_bytes("gs://bkt/runs/b/v.gif") == b"GIF89a" and not os.path.exists(local)
  fs.rmtree("gs://bkt/runs/b")
  assert not fs.exists("gs://bkt/runs/b") and not os.path.exists("gs:")
  # Local paths keep os semantics: an atomic write leaves no temporary beside the file.
  fs.write_atomic(str(tmp_path / "d" / "x.json"), "{}")
  assert os.listdir(tmp_path / "d") == ["x.json"]


def test_run_outputs_on_a_bucket(memory_bucket):
  """metrics.jsonl (a torn last line dropped), TensorBoard events, loss.png, JSON reports, videos and strips."""
  run = "gs://bkt/runs/ae"
  fs.write_atomic(fs.join(run, "metrics.jsonl"), '{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a torn write
  writer = telemetry.MetricsWriter(run, enabled=True)
  for step in (2, 3):
    writer.write(step, dict(loss=1.0 / step))
  writer.close()
  assert [r["step"] for r in telemetry.read_metrics(fs.join(run, "metrics.jsonl"))] == [1, 2, 3]
  events = fs.glob(fs.join(run, "tensorboard") + "/events.out.tfevents.*")
  assert len(events) == 1 and len(fs.read_bytes(events[0])) > 100  # the scalars, not just the file header
  assert fs.read_bytes(telemetry.plot_losses(run))[:4] == b"\x89PNG"
  report.write_json(dict(x=np.float32(0.5)), "gs://bkt/eval/results.json")
  assert json.loads(fs.read_text("gs://bkt/eval/results.json")) == {"x": 0.5}
  frames = [np.full((8, 8, 3), i * 30, np.uint8) for i in range(3)]
  viz.write_video(frames, "gs://bkt/eval/rollout.gif")
  viz.write_strip([frames, frames], "gs://bkt/eval/rollout.png")
  assert fs.read_bytes("gs://bkt/eval/rollout.gif")[:3] == b"GIF"
  assert fs.read_bytes("gs://bkt/eval/rollout.png")[:4] == b"\x89PNG"
  assert not os.path.exists("gs:")


def test_dataset_built_for_a_bucket_uploads_its_info_last(memory_bucket, monkeypatch):
  uploads = []
  real = fs.upload_file
  monkeypatch.setattr(fs, "upload_file", lambda local, dst: (uploads.append(fs.basename(dst)), real(local, dst)))
  spec = tfds_builder.GenerationSpec(episodes=3, steps=2, players=(1, 2), chunk=1)
  url = dataset_lib.build(spec, "gs://bkt/data/builtin")
  assert url == "gs://bkt/data/builtin" and uploads[-1] == dataset_lib.INFO_FILE
  info = dataset_lib.read_info(url)  # metadata read back through the bucket
  assert info.num_episodes("train") + info.num_episodes("test") + info.num_episodes("validation") == 3
  assert all(fs.exists(path) for path, _ in info.split_files["train"])
  with pytest.raises(FileExistsError, match="already exists"):
    dataset_lib.build(spec, url)


def test_overwriting_a_dataset_on_a_bucket_removes_its_info_first(memory_bucket, monkeypatch):
  spec = tfds_builder.GenerationSpec(episodes=3, steps=2, players=(1, 2), chunk=1)
  url = dataset_lib.build(spec, "gs://bkt/data/builtin")
  removed = []
  real = fs.rmtree
  monkeypatch.setattr(fs, "rmtree", lambda path: (removed.append(fs.exists(fs.join(path, dataset_lib.INFO_FILE))),
                                                  real(path)))
  assert dataset_lib.build(spec, url, overwrite=True) == url and fs.exists(fs.join(url, dataset_lib.INFO_FILE))
  assert removed == [False]  # the old dataset_info.json was gone before its files went
