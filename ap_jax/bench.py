"""`ap-jax bench`: what training and sampling cost, measured on this machine. Each benchmark prints a table and
returns (and with `--json`, writes) its rows; `BENCHMARKS.md` holds the latest tables and the commands.

  step      the denoiser's training step (forward, backward, AdamW, EMA) per config: median step time,
            examples/s, tokens/s, achieved FLOP/s (analytic FLOPs), MFU where the device's peak is known, compiled
            memory per device and, where the device reports it, its peak memory in use
  data      the input pipeline per source (stored episodes with frames; cached latents held in memory; live
            built-in episodes) and Grain worker count, in clips/s, beside what the step consumes (the
            headroom: pipeline clips/s over the step's; below 1 the step waits for data); built-in game steps/s
  peer      the same transformer shape in diffusers' WanTransformer3DModel (PyTorch), side by side: the ratio
            `speedup_vs_peer`; needs the `bench` extra (torch, diffusers)
  scaling   step time, memory and FLOPs against frames, resolution and players, with the fitted growth
  profile   where the training step's time goes: XLA op times from a JAX profiler trace, per op, per kind of op
            and per named scope of the model (not in `all`: it measures no speed of its own)
  sampling  autoregressive rollouts of a model with random weights (the cost does not depend on the weights):
            generated frames/s and latency per generated step against players, denoising steps, batch and the
            KV cache, with the compile time of the first rollout

Timings are medians over repeats after a warm-up that includes compilation; compare numbers from one run only.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ap_jax import actions as A
from ap_jax.data import locate
from ap_jax.train import inputs as inputs_lib
from ap_jax.train import stages as stages_lib
from ap_jax.train import state as state_lib


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  return dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count(),
              device_kind=getattr(device, "device_kind", str(device)))


def median_seconds(fn: Callable[[], Any], *, repeats: int, inner: int = 1) -> float:
  """Median over `repeats` of the wall time of `inner` calls of `fn` (which must block on its result), per call."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      fn()
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times)


def _config(name: str, overrides: Sequence[str] = ()):
  from ap_jax.train import config_utils

  return config_utils.apply_overrides(config_utils.load_config(name), list(overrides))


def _random_batch(shapes: dict, config, rng: np.random.Generator) -> dict[str, jax.Array]:
  """A batch of the step's shapes: random latents/frames, actions, positions inside the frame, 2..P players."""
  h, w = locate.frame_hw(config)
  out = {}
  for key, s in shapes.items():
    if key in ("latents", "frames"):
      value = rng.uniform(-1, 1, s.shape)
    elif key == "actions":
      value = rng.integers(0, A.NUM_ACTIONS, s.shape)
    elif key == "positions":
      value = rng.uniform(0, 1, s.shape) * np.array([h, w])
    elif key == "orientations":
      value = rng.integers(0, A.NUM_ORIENTATIONS, s.shape)
    elif key == "player_mask":
      value = np.arange(s.shape[1])[None] < rng.integers(2, s.shape[1] + 1, (s.shape[0], 1))
    else:
      raise KeyError(f"no random batch for key {key!r}")
    out[key] = jax.device_put(np.asarray(value, s.dtype), s.sharding)
  return out


def _training_step(config_name: str, overrides: Sequence[str] = ()):
  """The denoiser training step of `config_name` (with `overrides`) on this process's devices, compiled, with a
  random batch and random autoencoder weights (the cost does not depend on the weights). Returns (config, stage,
  mesh, abstract state, compiled step, its analysis, compile seconds, a function that runs one step and waits)."""
  from ap_jax.model import vae as vae_lib
  from ap_jax.train import mesh as mesh_lib, optim as optim_lib, trainer

  config = _config(config_name, overrides)
  config.stage = "denoiser"
  mesh = mesh_lib.build_mesh(config.mesh)
  rules = mesh_lib.rules_from_config(config)
  mesh_lib.check_batch(int(config.data.global_batch_size), mesh, rules)
  vae_params = jax.jit(lambda key: vae_lib.vae_init(key, config.model))(jax.random.PRNGKey(1))  # one compile
  stage = stages_lib.build_stage(config, frozen=vae_params, meta=dict(latent_shift=0.0, latent_scale=1.0))
  tx, schedule = optim_lib.build_optimizer(config.optim, int(config.total_steps))
  init_fn, shardings, abstract = state_lib.build_state(config, stage, tx, mesh, rules)
  start = time.perf_counter()
  step_fn, analysis, frozen_shardings = state_lib.build_step(config, stage, tx, schedule, mesh, rules, shardings,
                                                           abstract)
  compile_s = time.perf_counter() - start
  state = init_fn(jax.random.PRNGKey(0))
  frozen = jax.device_put(vae_params, frozen_shardings)
  batch = _random_batch(state_lib.batch_shapes(config, stage.batch_keys, mesh, rules), config, np.random.default_rng(0))
  holder = [state]

  def one_step():
    holder[0], metrics = step_fn(holder[0], batch, frozen)
    jax.block_until_ready(metrics["loss"])

  return config, stage, mesh, abstract, step_fn, analysis, compile_s, one_step


def step_benchmark(config_name: str, overrides: Sequence[str] = (), *, repeats: int = 5, inner: int = 5) -> dict:
  """One row: the denoiser training step of `config_name` (with `overrides`) on this process's devices."""
  from ap_jax.model import layers as layers_lib

  config, stage, mesh, abstract, _, analysis, compile_s, one_step = _training_step(config_name, overrides)
  one_step()  # warm-up
  seconds = median_seconds(one_step, repeats=repeats, inner=inner)
  b = int(config.data.global_batch_size)
  flops = stages_lib.analytic_step_flops(config, stage)
  device = jax.devices()[0]
  peak = state_lib.peak_flops(device)
  memory = (analysis.get("memory_bytes_per_device") or {}).get("total")
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return dict(config=config_name, overrides=list(overrides), batch=b, clip_steps=int(config.data.clip_steps),
              frame_hw=list(locate.frame_hw(config)), subject_tokens=bool(config.model.dit.subject_tokens),
              dtype=str(config.model.dit.get("dtype", "float32")), devices=mesh.devices.size,
              parameters=layers_lib.count_params(abstract["params"]),
              step_s=seconds, examples_per_s=b / seconds,
              tokens_per_s=b * stages_lib.tokens_per_example(config, stage) / seconds,
              flops_per_step=flops, achieved_flops_per_s=flops / seconds,
              mfu=(flops / mesh.devices.size / seconds / peak) if peak else None, compile_s=compile_s,
              compiled_memory_bytes=memory,
              peak_memory_bytes=(stats or {}).get("peak_bytes_in_use"))


# The model's named scopes (jax.named_scope in ap_jax/model/dit.py), most specific first: an XLA op is charged to
# the first one its source path names. Backward ops carry their forward op's scope.
PROFILE_SCOPES = ("self_attn", "cross_attn", "mlp", "modulation", "embed", "head", "optimizer", "ema")


def _op_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Compiled HLO text -> {instruction name: (kind, source path)}: kind is the fusion's or op's name without its
  number (`ynn_fusion`, `copy_bitcast_fusion`, `dot`, ...), the path is its op_name metadata."""
  import re

  index = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*", hlo_text, re.M):
    line = m.group(0)
    op = re.search(r'op_name="([^"]*)"', line)
    index[m.group(1)] = (re.sub(r"\.\d+$", "", m.group(1)), op.group(1) if op else "")
  return index


def _scope_of(path: str) -> str:
  parts = path.replace("(", "/").replace(")", "/").split("/")
  for scope in PROFILE_SCOPES:
    if scope in parts:
      return scope
  return "other"


def profile_benchmark(config_name: str, overrides: Sequence[str] = (), *, steps: int = 5,
                      trace_dir: str | None = None, top: int = 20) -> dict:
  """Where the training step's time goes: `steps` steps under the JAX profiler, each XLA op's time (from the
  trace) matched to the compiled HLO, summed per op, per kind of op (fusion type and the source op it came from,
  forward or backward) and per named scope of the model. The trace stays in `trace_dir` (TensorBoard / Perfetto)
  when one is given. Op times are what the runtime records per op; on a CPU they overlap when the runtime runs two
  ops at once, so their sum can exceed the step's wall time."""
  import collections
  import glob
  import gzip
  import json

  _, _, _, _, step_fn, _, _, one_step = _training_step(config_name, overrides)
  for _ in range(2):
    one_step()  # compiled and warm
  index = _op_index(step_fn.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    where = trace_dir or tmp
    start = time.perf_counter()
    with jax.profiler.trace(where, create_perfetto_trace=True):
      for _ in range(steps):
        one_step()
    wall_s = (time.perf_counter() - start) / steps
    traces = sorted(glob.glob(os.path.join(where, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not traces:
      raise RuntimeError(f"the profiler wrote no trace under {where}")
    with gzip.open(traces[-1]) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in index:
      per_op[e["name"]] += float(e.get("dur", 0.0)) * 1e-6 / steps
  by_kind: collections.Counter = collections.Counter()
  by_scope: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  for name, seconds in per_op.items():
    kind, path = index[name]
    source = path.split("/")[-1] if path else "?"
    key = f"{kind} | {source}{' (backward)' if 'transpose(' in path else ''}"
    by_kind[key] += seconds
    count[key] += 1
    by_scope[_scope_of(path)] += seconds
  total = sum(per_op.values())
  rows = lambda counter, n: [dict(name=k, ms=1e3 * v, share=v / total if total else 0.0) for k, v in
                             counter.most_common(n)]
  return dict(config=config_name, overrides=list(overrides), steps=steps, step_wall_ms=1e3 * wall_s,
              op_ms=1e3 * total, ops_per_step=len(per_op), trace_dir=trace_dir,
              by_scope=rows(by_scope, None),
              by_kind=[dict(r, ops=count[r["name"]]) for r in rows(by_kind, top)],
              top_ops=[dict(r, kind=index[r["name"]][0], source=index[r["name"]][1]) for r in rows(per_op, top)])


def profile_table(result: dict) -> str:
  lines = [f"{result['config']} {' '.join(result['overrides'])}: step {result['step_wall_ms']:.1f} ms wall under the "
           f"profiler, {result['op_ms']:.1f} ms in {result['ops_per_step']} XLA ops", "", "| scope | ms | share |",
           "|---|---|---|"]
  lines += [f"| {r['name']} | {r['ms']:.1f} | {r['share']:.0%} |" for r in result["by_scope"]]
  lines += ["", "| kind of op (fusion type, source op) | ops | ms | share |", "|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['ops']} | {r['ms']:.1f} | {r['share']:.0%} |" for r in result["by_kind"]]
  return "\n".join(lines)


def pipeline_clips_per_second(source, *, batch: int, clip_steps: int, workers: int, batches: int) -> float:
  from ap_jax.data import pipeline

  config = pipeline.PipelineConfig(clip_steps=clip_steps, global_batch_size=batch, worker_count=workers,
                                   read_threads=2)
  it = iter(pipeline.make_dataset(source, config, process_index=0, process_count=1))
  try:
    for _ in range(3):  # warm-up: worker start, first reads
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * batch / (time.perf_counter() - start)
  finally:
    inputs_lib.close_iterator(it)


def game_steps_per_second(episodes: int, steps: int, grid: int, players: int, repeats: int = 3) -> dict:
  """Built-in game: environment steps/s of vmapped rollouts (every player acts, the frame is rendered)."""
  from ap_jax.games import gridgame as G

  config = G.GameConfig(grid_height=grid, grid_width=grid)
  keys = jax.random.split(jax.random.key(0), episodes)
  n = jnp.full((episodes,), players, jnp.int32)
  layouts = jnp.arange(episodes, dtype=jnp.int32) % len(G.LAYOUTS)

  def run():
    jax.block_until_ready(G.rollout_batch(keys, n, layouts, config=config, steps=steps)["frames"])

  run()
  seconds = median_seconds(run, repeats=repeats)
  return dict(episodes=episodes, steps=steps, grid=grid, players=players, frame_hw=list(config.frame_shape[:2]),
              seconds=seconds, env_steps_per_s=episodes * steps / seconds)


def data_benchmark(*, batch: int = 16, clip_steps: int = 1, workers: Sequence[int] = (0, 1, 2, 4),
                   batches: int = 40, episodes: int = 300, game_episodes: int = 256,
                   step_s: float | None = None) -> dict:
  """Pipeline clips/s per source and worker count; with `step_s` (the training step's time at this batch), the
  headroom over what the step consumes."""
  from ap_jax.data import dataset, pipeline, tfds_builder

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    spec = tfds_builder.GenerationSpec(episodes=episodes, steps=16, players=(2, 7))
    stored = dataset.open_split(dataset.build(spec, os.path.join(tmp, "data")), "train")
    latents = np.random.default_rng(0).normal(size=(len(stored), 17, 16, 16, 8)).astype(np.float32)
    sources = dict(arrayrecord_frames=stored, latents_in_memory=pipeline.LatentEpisodes(stored, latents),
                   live=pipeline.LiveEpisodeSource(spec, chunk=64))
    for name, source in sources.items():
      for n in workers:
        clips = pipeline_clips_per_second(source, batch=batch, clip_steps=clip_steps, workers=n, batches=batches)
        rows.append(dict(source=name, workers=n, batch=batch, clips_per_s=clips, ms_per_batch=1e3 * batch / clips,
                         headroom=(clips * step_s / batch) if step_s else None))
  game = [game_steps_per_second(game_episodes, 32, 8, 4), game_steps_per_second(game_episodes, 32, 16, 4)]
  return dict(pipeline=rows, step_s=step_s, game=game)


def sampling_benchmark(config_name: str = "tiny", overrides: Sequence[str] = (), *, grid: Sequence[dict] | None = None,
                       steps: int = 8, repeats: int = 3, meshes: Sequence[str | None] = (None,)) -> list[dict]:
  """Rows of generated frames/s and latency per generated step. `grid`: the settings to run (players,
  denoise_steps, batch, use_cache); default a one-at-a-time sweep around (4 players, 10 steps, batch 1, cache).
  `meshes`: each grid setting runs on each mesh (`data=8`, `data=4,tensor=2`; None: one device): parameters laid
  out by their logical axes as in training, rollouts split over the batch axes (the sampler pads a batch to a
  multiple of its shards)."""
  from ap_jax import sample as sample_lib
  from ap_jax.model import dit as dit_lib, sharding as sharding_lib, vae as vae_lib
  from ap_jax.train import mesh as mesh_lib, trainer

  config = _config(config_name, overrides)
  config.stage = "denoiser"
  vae_params = jax.jit(lambda key: vae_lib.vae_init(key, config.model))(jax.random.PRNGKey(1))  # one compile
  stage = stages_lib.build_stage(config, frozen=vae_params, meta=dict(latent_shift=0.0, latent_scale=1.0))
  params = jax.jit(lambda key: dit_lib.init(key, stage.model_config))(jax.random.PRNGKey(0))
  base = dict(players=4, denoise_steps=10, batch=1, use_cache=True)
  if grid is None:
    grid = ([dict(base, players=p) for p in (1, 2, 4, 7)] + [dict(base, denoise_steps=k) for k in (1, 2, 4)]
            + [dict(base, batch=8), dict(base, use_cache=False)])
  h, w = locate.frame_hw(config)
  rng = np.random.default_rng(0)
  rows = []
  for mesh_text in meshes:
    mesh = rules = None
    mesh_params, mesh_vae = params, vae_params
    if mesh_text:
      mesh = mesh_lib.mesh_from_spec(mesh_text)
      rules = mesh_lib.rules_from_config(config)
      shardings = sharding_lib.tree_shardings(dit_lib.param_logical_axes(stage.model_config), mesh, rules,
                                              shapes=params)
      mesh_params = jax.device_put(params, shardings)
      mesh_vae = jax.device_put(vae_params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    for setting in grid:
      b, p = int(setting["batch"]), int(setting["players"])
      sampler = sample_lib.Sampler(mesh_params, stage.model_config, mesh_vae,
                                   denoise_steps=int(setting["denoise_steps"]), chunk=1,
                                   window=int(config.data.clip_steps) + 1, use_cache=bool(setting["use_cache"]),
                                   mesh=mesh, rules=rules)
      frames = rng.integers(0, 255, (b, h, w, 3)).astype(np.uint8)
      positions = rng.uniform(0, 1, (b, p, 2)) * np.array([h, w])
      actions = rng.integers(0, A.NUM_ACTIONS, (b, steps, p))
      orientations = np.zeros((b, p), np.int32)

      def run():
        out = sampler.rollout(frames, positions, actions, initial_orientations=orientations)
        np.asarray(out.frames)

      start = time.perf_counter()
      run()  # compiles every jitted piece a rollout of this length uses
      first_s = time.perf_counter() - start
      seconds = median_seconds(run, repeats=repeats)
      rows.append(dict(config=config_name, **setting, mesh=mesh_text or "1 device",
                       devices=mesh.devices.size if mesh is not None else 1, steps=steps, first_rollout_s=first_s,
                       rollout_s=seconds, latency_per_step_s=seconds / steps, frames_per_s=b * steps / seconds,
                       compiled_functions=len(sampler._jitted)))  # pylint: disable=protected-access
  return rows


def peer_benchmark(config_name: str, overrides: Sequence[str] = (), *, repeats: int = 5, inner: int = 3,
                   subjects: Sequence[int] = (4, 8)) -> dict:
  """ap_jax's denoiser step against diffusers' `WanTransformer3DModel` (PyTorch; the family ActionParty's code
  builds on) at the same transformer shape (width, heads, MLP, depth, patch), video token count, batch and dtype
  (float32): forward, flow-matching loss, backward and AdamW, medians. ap_jax runs with subject tokens off (so the
  two sequences match), then with `subjects` subject slots on to show what they cost. Wan keeps its text
  cross-attention, fed one token per subject slot of the config. `speedup_vs_peer` = Wan's step time over ap_jax's."""
  import torch
  from diffusers import WanTransformer3DModel

  from ap_jax.model import config as model_config_lib

  config = _config(config_name, overrides)
  dit = config.model.dit
  if str(dit.get("dtype", "float32")) != "float32":
    raise ValueError(f"model.dit.dtype = {dit.dtype}: the peer comparison runs float32 on both sides (pass "
                     "--config.model.dit.dtype=float32)")
  b, comp = int(config.data.global_batch_size), model_config_lib.compression(config.model)
  h, w = (v // comp for v in locate.frame_hw(config))
  patch, width, heads = int(dit.patch_size), int(dit.width), int(dit.heads)
  off = step_benchmark(config_name, list(overrides) + ["--config.model.dit.subject_tokens=false"], repeats=repeats,
                       inner=inner)
  video_tokens_per_frame = (h // patch) * (w // patch)
  frames = off["tokens_per_s"] / off["examples_per_s"] / video_tokens_per_frame
  if abs(frames - round(frames)) > 1e-6:
    raise ValueError(f"{config_name}: {frames} frames of video tokens per example; expected a whole number")
  frames = int(round(frames))
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  channels, slots = int(config.model.vae.latent_channels), int(config.model.max_players)
  model = WanTransformer3DModel(patch_size=(1, patch, patch), num_attention_heads=heads,
                                attention_head_dim=width // heads, in_channels=channels, out_channels=channels,
                                text_dim=width, freq_dim=int(dit.freq_dim), ffn_dim=int(dit.mlp),
                                num_layers=int(dit.depth), rope_max_seq_len=1024)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  x = torch.randn(b, channels, frames, h, w)
  target = torch.randn_like(x)
  t = torch.randint(0, 1000, (b,))
  text = torch.randn(b, slots, width)

  def peer_step():
    optimizer.zero_grad(set_to_none=True)
    out = model(x, t, text, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    optimizer.step()

  peer_step()  # warm-up
  peer_s = median_seconds(peer_step, repeats=repeats, inner=inner)
  rows = [off] + [step_benchmark(config_name, list(overrides) + ["--config.model.dit.subject_tokens=true",
                                                                 f"--config.model.max_players={n}"],
                                 repeats=repeats, inner=inner) for n in subjects]
  return dict(config=config_name, overrides=list(overrides), batch=b, frames=frames,
              video_tokens=frames * video_tokens_per_frame, dtype="float32", torch=torch.__version__,
              torch_threads=torch.get_num_threads(),
              peer=dict(model="diffusers.WanTransformer3DModel", step_s=peer_s, examples_per_s=b / peer_s,
                        parameters=sum(p.numel() for p in model.parameters())),
              ap_jax=rows, speedup_vs_peer=peer_s / off["step_s"])


def peer_table(result: dict) -> str:
  lines = [f"{result['config']} shape, batch {result['batch']}, {result['video_tokens']} video tokens, "
           f"{result['dtype']}; torch {result['torch']} ({result['torch_threads']} threads)", "",
           "| model | subjects | params | step ms | examples/s | speed vs the peer |", "|---|---|---|---|---|---|"]
  peer = result["peer"]
  lines.append(f"| Wan (diffusers) | - | {peer['parameters']:,} | {1e3 * peer['step_s']:.1f} | "
               f"{peer['examples_per_s']:.1f} | 1.00x |")
  for r in result["ap_jax"]:
    subjects = next((o.split("=")[1] for o in r["overrides"] if o.startswith("--config.model.max_players=")), None)
    lines.append(f"| ap_jax | {subjects if r['subject_tokens'] else 'off'} | {r['parameters']:,} | "
                 f"{1e3 * r['step_s']:.1f} | {r['examples_per_s']:.1f} | {peer['step_s'] / r['step_s']:.2f}x |")
  return "\n".join(lines)


# The scaling sweeps: each varies one thing of the tiny config (the others stay at its values). Frames use the
# paper's clip layout (one context frame and T target frames as tokens), not the tiny recipe's one-step input.
SCALING = {
    "frames": ("frames in the clip", [2, 3, 5, 9],
               lambda n: ["--config.model.dit.previous_frame_input=false", "--config.model.dit.context_tokens=true",
                          "--config.model.flow.coord_target=velocity", "--config.model.flow.coord_prior=standard",
                          f"--config.data.clip_steps={n - 1}"]),
    "resolution": ("frame side in pixels", [32, 64, 128],
                   lambda px: [f"--config.data.grid=({px // 8}, {px // 8})"]),
    "players": ("subject slots", [2, 4, 8, 16], lambda n: [f"--config.model.max_players={n}"]),
}


def scaling_benchmark(config_name: str = "tiny", *, sweeps: Sequence[str] = tuple(SCALING), repeats: int = 3,
                      inner: int = 2) -> dict:
  """Step time, compiled memory and analytic FLOPs against frames, resolution and players, each with its fitted
  growth: the exponent k of value ~ x^k (least squares in log-log)."""
  out = {}
  for sweep in sweeps:
    label, values, overrides = SCALING[sweep]
    rows = [dict(value=v, **step_benchmark(config_name, overrides(v), repeats=repeats, inner=inner)) for v in values]
    logx = np.log([r["value"] for r in rows])
    fits = {}
    for key in ("step_s", "compiled_memory_bytes", "flops_per_step"):
      ys = [r[key] for r in rows]
      if all(y and y > 0 for y in ys):
        fits[key] = float(np.polyfit(logx, np.log(ys), 1)[0])
    out[sweep] = dict(label=label, rows=rows, growth_exponent=fits)
  return out


def scaling_table(result: dict) -> str:
  lines = []
  for sweep, r in result.items():
    lines += [f"{r['label']} (fitted growth: step time ~ x^{r['growth_exponent'].get('step_s', float('nan')):.2f}, "
              f"memory ~ x^{r['growth_exponent'].get('compiled_memory_bytes', float('nan')):.2f}, FLOPs ~ "
              f"x^{r['growth_exponent'].get('flops_per_step', float('nan')):.2f})", "",
              f"| {sweep} | step ms | GFLOP / step | compiled MiB |", "|---|---|---|---|"]
    for row in r["rows"]:
      lines.append(f"| {row['value']} | {1e3 * row['step_s']:.1f} | {row['flops_per_step'] / 1e9:.2f} | "
                   f"{_fmt(row['compiled_memory_bytes'] and row['compiled_memory_bytes'] / 2**20, '.0f')} |")
    lines.append("")
  return "\n".join(lines)


def attention_benchmark(*, batch: int = 8, length: int = 1024, heads: int = 12, head_dim: int = 128,
                        dtype: str = "bfloat16", repeats: int = 10) -> dict:
  """The masked attention of the model (subject-isolated layout, padded slots) by XLA against cuDNN's fused kernel
  (`jax.nn.dot_product_attention(implementation='cudnn')`, GPU only): the largest difference and each one's time.
  Off a GPU, or where cuDNN refuses the shapes, the cuDNN entries say why."""
  from ap_jax.model import attention as attn_lib

  rng = np.random.default_rng(0)
  slots, frames = 8, 5
  video = max(1, length // frames - slots)
  layout = attn_lib.self_attention_layout(frames, video, slots)
  player_mask = jnp.asarray(np.arange(slots)[None] < rng.integers(2, slots + 1, (batch, 1)))
  seg = attn_lib.segment_ids(layout, player_mask)
  mask = attn_lib.Mask(attn_lib.static_mask(layout, layout, subject_isolation=True), seg, seg)
  n = len(layout)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, n, heads, head_dim)), dtype) for _ in range(3))
  xla = jax.jit(lambda q, k, v: attn_lib.attention(q, k, v, mask, "xla"))
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None],
                                                               implementation="cudnn"))
  want = jax.block_until_ready(xla(q, k, v))
  out = dict(batch=batch, length=n, heads=heads, head_dim=head_dim, dtype=dtype,
             xla_s=median_seconds(lambda: jax.block_until_ready(xla(q, k, v)), repeats=repeats))
  try:
    got = jax.block_until_ready(cudnn(q, k, v))
  except Exception as e:  # no GPU, or shapes cuDNN does not take
    out.update(cudnn_s=None, max_abs_diff=None, cudnn_error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return out
  out.update(cudnn_s=median_seconds(lambda: jax.block_until_ready(cudnn(q, k, v)), repeats=repeats),
             max_abs_diff=float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))))
  return out


# --------------------------------------------------------------------------------------------------- tables


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def step_table(rows: list[dict]) -> str:
  lines = ["| config | batch | subjects | dtype | params | step ms | examples/s | tokens/s | GFLOP/s | MFU | "
           "compiled MiB | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mem = r["compiled_memory_bytes"]
    lines.append(f"| {r['config']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''} | {r['batch']} | "
                 f"{'on' if r['subject_tokens'] else 'off'} | {r['dtype']} | {r['parameters']:,} | "
                 f"{1e3 * r['step_s']:.1f} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['achieved_flops_per_s'] / 1e9:.1f} | {_fmt(r['mfu'], '.1%')} | "
                 f"{_fmt(mem and mem / 2**20, '.0f')} | {_fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**20, '.0f')} |")
  return "\n".join(lines)


def data_table(result: dict) -> str:
  lines = ["| source | workers | batch | clips/s | ms/batch | headroom over the step |", "|---|---|---|---|---|---|"]
  for r in result["pipeline"]:
    lines.append(f"| {r['source']} | {r['workers']} | {r['batch']} | {r['clips_per_s']:,.0f} | "
                 f"{r['ms_per_batch']:.1f} | {_fmt(r['headroom'], '.1f')} |")
  lines += ["", "| built-in game: episodes | grid | frame | steps | env steps/s |", "|---|---|---|---|---|"]
  for g in result["game"]:
    lines.append(f"| {g['episodes']} | {g['grid']} | {'x'.join(map(str, g['frame_hw']))} | {g['steps']} | "
                 f"{g['env_steps_per_s']:,.0f} |")
  return "\n".join(lines)


def sampling_table(rows: list[dict]) -> str:
  lines = ["| config | mesh | players | denoise steps | batch | KV cache | first rollout s | ms / generated step | "
           "frames/s | compiled fns |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['config']} | {r.get('mesh', '1 device')} | {r['players']} | {r['denoise_steps']} | "
                 f"{r['batch']} | "
                 f"{'on' if r['use_cache'] else 'off'} | {r['first_rollout_s']:.1f} | "
                 f"{1e3 * r['latency_per_step_s']:.1f} | {r['frames_per_s']:.1f} | {r['compiled_functions']} |")
  return "\n".join(lines)
