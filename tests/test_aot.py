"""`ap-jax aot`: slice names, the roofline arithmetic, and (with libtpu installed) real TPU compiles on this CPU
host: the training and sampling steps of small configs for a v5p-8 slice, FSDP, two slices over DCN, and the
splash-attention kernel."""

from __future__ import annotations

import json

import pytest

from ap_jax import aot, cli

GIB = 1024 ** 3


def test_slice_names_and_topologies():
  t = aot.parse_topology("v5p-64")
  assert (t.shape, t.chips, t.name) == ("2x4x4", 32, "v5p-64 (2x4x4)")
  assert aot.parse_topology("v5p-8").shape == "2x2x1" and aot.parse_topology("v5p-256").chips == 128
  assert aot.parse_topology("v6e-256").shape == "16x16" and aot.parse_topology("v5e-16").chips == 16
  t = aot.parse_topology("v5p:4x4x4", num_slices=2)
  assert (t.chips_per_slice, t.chips, t.name) == (64, 128, "v5p-128 x 2 slices (4x4x4)")
  for text, message in (("v5p-7", r"no v5p slice of that size; expected one of v5p-8, v5p-16"),
                        ("v6e:2x2x2", "v6e topologies have 2 dimensions"),
                        ("v9-8", r"expected a slice name such as v5p-64")):
    with pytest.raises(aot.AotError, match=message):
      aot.parse_topology(text)
  with pytest.raises(aot.AotError, match="--num-slices 0, expected at least 1"):
    aot.parse_topology("v5p-8", num_slices=0)


def test_roofline_takes_the_larger_of_compute_and_memory_time():
  chip = aot.CHIPS["v5p"]
  memory = dict(total=10 * GIB)
  # Compute-bound: 4 chips, model FLOPs 4 * peak * 1 ms; XLA undercounts (a loop body once) and is ignored.
  r = aot.roofline(dict(memory_bytes_per_device=memory, flops_per_device=1.0, bytes_accessed_per_device=1e6,
                        model_flops=4 * chip.peak_flops * 1e-3), chip, 4)
  assert r["fits"] and r["bound_by"] == "compute"
  assert r["roofline_step_s"] == pytest.approx(1e-3) and r["mfu_bound"] == pytest.approx(1.0)
  # Memory-bound: the bytes take 4 ms, so at most a quarter of peak.
  r = aot.roofline(dict(memory_bytes_per_device=dict(total=200 * GIB), flops_per_device=None,
                        bytes_accessed_per_device=4e-3 * chip.hbm_bandwidth,
                        model_flops=4 * chip.peak_flops * 1e-3), chip, 4)
  assert not r["fits"] and r["bound_by"] == "memory bandwidth" and r["mfu_bound"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def libtpu():
  pytest.importorskip("libtpu", reason="the TPU compiler (libtpu) is not installed: pip install 'ap_jax[tpu]'")


def _aot(tmp_path, *args):
  out = str(tmp_path / "aot.json")
  code = cli.main(["aot", *args, "--json", out])
  return code, json.load(open(out))


def test_tpu_compile_of_the_tiny_training_and_sampling_steps(libtpu, tmp_path, capsys):
  code, report = _aot(tmp_path, "--config", "tiny:runlocal", "--topology", "v5p-8")
  assert code == 0 and report["fits"] is True and report["device_kind"] == "TPU v5"
  assert report["mesh"] == dict(data=4, fsdp=1, context=1, tensor=1) and report["chips"] == 4
  for step in ("train", "sample"):
    r = report[step]
    assert 0 < r["per_device_bytes"] < r["hbm_bytes_per_device"] == int(95.74 * GIB)
    assert r["flops_per_step"] > 0 and r["xla_flops_per_device"] > 0 and 0 < r["mfu_bound"] <= 1
  assert report["per_device_bytes"] == report["train"]["per_device_bytes"]
  assert "v5p-8 (2x2x1): 4 chips of TPU v5" in capsys.readouterr().out


def test_tpu_compile_of_the_sampling_step_alone_for_an_inference_slice(libtpu, tmp_path):
  code, report = _aot(tmp_path, "--config", "tiny:runlocal", "--topology", "v6e-8", "--no-train", "--sample-batch", "16")
  assert code == 0 and "train" not in report and report["device_kind"] == "TPU v6 lite"
  assert report["sample"]["batch"] == 16 and report["sample"]["frames_per_s_bound"] > 0
  assert report["per_device_bytes"] == report["sample"]["per_device_bytes"] > 0 and report["fits"] is True
  assert cli.main(["aot", "--config", "tiny:runlocal,autoencoder", "--topology", "v6e-8", "--no-train"]) == 2


@pytest.mark.slow  # two TPU compiles of a few blocks: about a minute
def test_tpu_compile_with_fsdp_across_two_slices_and_splash_attention(libtpu, tmp_path):
  # base:runlocal shards parameters over fsdp; two v5p-8 slices joined over DCN on the data axis.
  code, report = _aot(tmp_path, "--config", "base:runlocal", "--topology", "v5p-8", "--num-slices", "2",
                      "--config.mesh.dcn_data=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--no-sample",
                      "--config.model.dit.attention_impl=splash")
  assert code == 0 and report["num_slices"] == 2 and report["chips"] == 8
  assert report["mesh"] == dict(data=2, fsdp=4, context=1, tensor=1) and "sample" not in report
  assert report["attention_impl"] == "splash" and report["fits"]


@pytest.mark.slow  # a TPU compile at a large batch: minutes on two busy cores
def test_a_step_that_does_not_fit_exits_1(libtpu, tmp_path):
  # The tiny denoiser at batch 8192 on one v5e chip (16 GiB): the TPU compiler itself refuses it (20.5 GiB of
  # temporaries; 13.4 GiB at batch 4096 fits).
  code, report = _aot(tmp_path, "--config", "tiny", "--topology", "v5e:1x1", "--no-sample",
                      "--config.data.global_batch_size=8192")
  assert code == 1 and report["fits"] is False and report["per_device_bytes"] > 16 * GIB
  assert "RESOURCE_EXHAUSTED" in report["train"]["error"]


def test_mesh_errors_name_the_slice(libtpu, capsys):
  assert cli.main(["aot", "--config", "tiny:runlocal", "--topology", "v5p-8", "--config.mesh.data=3"]) == 2
  assert "v5p-8 (2x2x1): mesh data=3" in capsys.readouterr().err


def test_multi_slice_meshes_need_devices_from_that_many_slices():
  import jax
  import ml_collections

  from ap_jax.train import mesh as mesh_lib

  sizes = dict(data=-1, fsdp=1, context=1, tensor=1, dcn_data=2, dcn_fsdp=1, dcn_context=1, dcn_tensor=1)
  with pytest.raises(mesh_lib.MeshError, match=r"ask for 2 slices, but the 8 devices come from 1 slice\(s\)"):
    mesh_lib.build_mesh(ml_collections.ConfigDict(sizes), jax.devices()[:8])
  with pytest.raises(mesh_lib.MeshError, match="expected positive integers"):
    mesh_lib.dcn_shape(ml_collections.ConfigDict(dict(sizes, dcn_tensor=0)))
  one = mesh_lib.build_mesh(ml_collections.ConfigDict(dict(sizes, dcn_data=1)), jax.devices()[:8])
  assert dict(one.shape) == dict(data=8, fsdp=1, context=1, tensor=1)


def test_the_pod_table_dry_run_prints_each_rows_command(tmp_path, capsys):
  import importlib.util
  import os

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "aot_table.py")
  spec = importlib.util.spec_from_file_location("aot_table", path)
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  assert table.main(["--out", str(tmp_path), "--rows", "base-v5p-64,base-2x-v5p-64", "--dry-run"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and all(line.startswith("ap-jax aot --config base --topology v5p-64") for line in lines)
  assert "--num-slices 1" in lines[0] and "--num-slices 2" in lines[1] and "--config.mesh.dcn_data=2" in lines[1]
  assert all("--config.data.grid=64,64" in line and "--config.mesh.fsdp=-1" in line for line in lines)
  assert lines[0].endswith(f"--json {tmp_path}/base-v5p-64.json")
  with pytest.raises(SystemExit):
    table.main(["--out", str(tmp_path), "--rows", "no-such-row"])
