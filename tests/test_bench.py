"""`ap-jax bench`: each benchmark runs at tiny sizes and reports consistent figures (no timing is asserted)."""

import json
import math

import numpy as np
import pytest

from ap_jax import bench, cli
from ap_jax.train import config_utils
from ap_jax.train import mesh as mesh_lib

SMALL = ["--config.data.global_batch_size=8", "--config.model.dit.depth=1"]


def test_config_names_resolve_to_the_configs_folder():
  assert config_utils.load_config("tiny:runlocal").total_steps == config_utils.load_config(
      "configs/tiny.py:runlocal").total_steps
  with pytest.raises(config_utils.ConfigError, match="does not exist; configs in"):
    config_utils.load_config("no_such_config")


@pytest.mark.slow  # a compile of the training step on the 8-device mesh (about a minute on 2 cores)
def test_step_benchmark_reports_consistent_rates():
  row = bench.step_benchmark("tiny", SMALL, repeats=2, inner=1)
  assert row["batch"] == 8 and row["step_s"] > 0 and row["devices"] == 8  # the forced 8-device CPU mesh
  assert math.isclose(row["examples_per_s"], 8 / row["step_s"])
  assert math.isclose(row["achieved_flops_per_s"], row["flops_per_step"] / row["step_s"])
  assert row["compiled_memory_bytes"] > 0 and row["parameters"] > 0
  # Tokens: 8 x 8 patches of the target frame and 8 subject slots (the tiny recipe's one-step clips).
  assert math.isclose(row["tokens_per_s"], row["examples_per_s"] * (64 + 8))
  assert "| tiny --config.data.global_batch_size=8" in bench.step_table([row])


@pytest.mark.slow  # a compile of the training step and a profiler trace
def test_profile_charges_every_op_to_a_scope_of_the_model(tmp_path):
  result = bench.profile_benchmark("tiny", SMALL, steps=2, trace_dir=str(tmp_path / "trace"))
  scopes = {r["name"]: r["ms"] for r in result["by_scope"]}
  # Every op of the step is charged once: the scopes add up to the total, and the model's parts all show.
  assert math.isclose(sum(scopes.values()), result["op_ms"], rel_tol=1e-6)
  assert {"self_attn", "cross_attn", "mlp", "optimizer", "ema"} <= set(scopes), scopes
  assert scopes["self_attn"] > 0 and scopes["mlp"] > 0
  assert result["ops_per_step"] > 50 and result["step_wall_ms"] > 0
  assert result["top_ops"][0]["ms"] >= result["top_ops"][-1]["ms"]
  assert any(p.name.endswith(".trace.json.gz") for p in (tmp_path / "trace").rglob("*"))  # kept for TensorBoard
  table = bench.profile_table(result)
  assert "| self_attn |" in table and "| kind of op" in table


@pytest.mark.slow  # four sampler compiles over three meshes
def test_sampling_benchmark_runs_sharded_over_the_given_meshes():
  # The forced 8-device CPU mesh: one device, 8-way data parallel, and data x tensor, at a batch the sampler pads.
  grid = [dict(players=2, denoise_steps=1, batch=6, use_cache=True)]
  rows = bench.sampling_benchmark("tiny", ["--config.model.dit.depth=1"], grid=grid, steps=2, repeats=1,
                                  meshes=[None, "data=8", "data=2,tensor=2"])
  assert [(r["mesh"], r["devices"]) for r in rows] == [("1 device", 1), ("data=8", 8), ("data=2,tensor=2", 4)]
  assert all(r["batch"] == 6 and r["frames_per_s"] > 0 and r["compiled_functions"] >= 1 for r in rows)
  assert "| tiny | data=2,tensor=2 | 2 | 1 | 6 |" in bench.sampling_table(rows)
  with pytest.raises(ValueError, match="mesh 'data=4,pipeline=2'"):
    mesh_lib.parse_mesh_spec("data=4,pipeline=2")
  with pytest.raises(ValueError, match="needs 16 devices"):
    bench.sampling_benchmark("tiny", grid=grid, meshes=["data=16"])


def test_sampling_benchmark_compiles_once_per_setting():
  rows = bench.sampling_benchmark("tiny", grid=[dict(players=3, denoise_steps=2, batch=2, use_cache=True)], steps=6,
                                  repeats=1)
  [row] = rows
  assert row["frames_per_s"] == pytest.approx(2 * 6 / row["rollout_s"])
  # A rollout longer than the window reuses its compiled pieces: at most one per cache length, plus the context.
  assert row["compiled_functions"] <= config_utils.load_config("tiny").data.clip_steps + 2


@pytest.mark.slow  # builds a dataset and compiles the training step
def test_cli_bench_data_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert cli.main(["bench", "data", "--quick", "--workers", "0", "--batch", "8", "--json", str(out),
                   "--config.model.dit.depth=1"]) == 0
  result = json.loads(out.read_text())
  sources = {r["source"] for r in result["data"]["pipeline"]}
  assert sources == {"arrayrecord_frames", "latents_in_memory", "live"}
  step_s = result["step"][0]["step_s"]
  for r in result["data"]["pipeline"]:
    assert r["headroom"] == pytest.approx(r["clips_per_s"] * step_s / 8)
  assert "input pipeline" in capsys.readouterr().out


@pytest.mark.slow  # PyTorch's Wan transformer and three ap_jax step compiles
def test_peer_benchmark_matches_shapes_and_reports_the_ratio():
  pytest.importorskip("diffusers", reason="the bench extra (torch, diffusers) is not installed")
  result = bench.peer_benchmark("tiny", SMALL, repeats=1, inner=1, subjects=(4,))
  assert result["video_tokens"] == 64 and result["frames"] == 1  # one 8 x 8 frame of tokens (tiny recipe)
  off, on = result["ap_jax"]
  assert not off["subject_tokens"] and on["subject_tokens"]
  assert result["speedup_vs_peer"] == pytest.approx(result["peer"]["step_s"] / off["step_s"])
  # Same transformer shape: parameter counts within 5% (the heads and embeddings differ slightly).
  assert abs(result["peer"]["parameters"] / off["parameters"] - 1) < 0.05
  assert "Wan (diffusers)" in bench.peer_table(result)


@pytest.mark.slow  # two step compiles
def test_scaling_benchmark_fits_the_growth(monkeypatch):
  label, _, overrides = bench.SCALING["players"]
  monkeypatch.setitem(bench.SCALING, "players", (label, [2, 8], lambda n: SMALL + overrides(n)))
  result = bench.scaling_benchmark("tiny", sweeps=["players"], repeats=1, inner=1)["players"]
  small, large = result["rows"]
  assert (small["value"], large["value"]) == (2, 8)
  # FLOPs grow with the slots but far slower than linearly (8 subject tokens beside 64 video tokens).
  k = result["growth_exponent"]["flops_per_step"]
  assert k == pytest.approx(np.log(large["flops_per_step"] / small["flops_per_step"]) / np.log(4)) and 0 < k < 0.5
  assert "subject slots (fitted growth" in bench.scaling_table({"players": result})
