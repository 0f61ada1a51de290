"""`ap-jax aot`: compile a config's training step and sampling step for a TPU pod slice, on this machine.

With the `libtpu` package installed (the `tpu` extra), `jax.experimental.topologies.get_topology_desc` describes
the devices of a TPU slice that is not here, and `jit(...).lower(...).compile()` over a mesh of them runs XLA's
real TPU compiler on the CPU host. The compiled executable then states its per-device memory (arguments, outputs,
temporaries) and XLA's count of FLOPs and bytes per device, from which this module derives:

  fits             the step's peak per-device bytes against the chip's HBM
  roofline step    max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) per device: a lower bound on the step time
                   that ignores communication (collectives over ICI and DCN) and imperfect overlap
  MFU bound        the model's analytic FLOPs per step (ap_jax.model.flops, 2 per multiply-add, no recompute)
                   over (chips x peak x roofline step): no run on that slice can do better

The training step is the trainer's own (`stages.build_stage`, `state.build_state / build_step`: the same shardings,
donation and optimizer); the inputs are abstract (shapes and shardings, no data, no checkpoint), so the base config
compiles for a 256-chip slice in minutes here. The sampling step is one denoiser evaluation of a generation window
(context frame + `clip_steps` frames, the sampler's re-encoded layout) at `--sample-batch`, the unit an ODE step
repeats; frames per second follow from the denoising steps per frame.

Slices are named as Cloud TPU names them (`v5p-64`: 32 chips, 2 TensorCores each, in the name; `v6e-16`: 16
chips) or by topology (`v5p:2x4x4`). Several slices over the data-center network: `--num-slices N` with
`--config.mesh.dcn_data=N` (or another `dcn_*` axis), as maxtext's `dcn_data_parallelism`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ap_jax.model import dit as dit_lib
from ap_jax.model import flops as flops_lib
from ap_jax.model import sharding as sharding_lib
from ap_jax.model import vae as vae_lib
from ap_jax.train import mesh as mesh_lib
from ap_jax.train import optim as optim_lib
from ap_jax.data import locate
from ap_jax.train import stages as stages_lib
from ap_jax.train import state as state_lib

log = logging.getLogger("ap_jax.aot")

# libtpu takes a lock file (/tmp/libtpu_lockfile) so that two processes cannot drive one TPU. Compiling for a
# described topology drives none, and another JAX process on this host (a training run, a test worker) may hold the
# lock, so compiles here do not take it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 1024 ** 3


class AotError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip generation: what libtpu calls it and its public per-chip figures."""
  device_kind: str  # jax Device.device_kind of its cores
  hbm_bytes: int
  peak_flops: float  # bfloat16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  cores_in_name: int  # TensorCores per chip counted in the slice name (v5p-8 = 4 chips)
  slice_shapes: dict  # chips -> topology


_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8",
       1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# Per chip: peak bfloat16 FLOP/s and HBM bandwidth as Cloud TPU publishes them (system architecture pages); HBM
# as the TPU compiler states it available to a program ("exceeds available HBM (95.74G)" for v5p, 15.75G for v5e,
# 31.25G for v6e; libtpu 0.0.42).
CHIPS = {
    "v5p": Chip("TPU v5", int(95.74 * GIB), 459e12, 2765e9, 2, _3D),
    "v5e": Chip("TPU v5 lite", int(15.75 * GIB), 197e12, 819e9, 1, _2D),
    "v6e": Chip("TPU v6 lite", int(31.25 * GIB), 918e12, 1640e9, 1, _2D),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str
  shape: str  # chips per dimension, e.g. "2x4x4"
  num_slices: int = 1

  @property
  def chip(self) -> Chip:
    return CHIPS[self.generation]

  @property
  def chips_per_slice(self) -> int:
    return math.prod(int(v) for v in self.shape.split("x"))

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def name(self) -> str:
    per_slice = f"{self.generation}-{self.chips_per_slice * self.chip.cores_in_name}"
    return per_slice + (f" x {self.num_slices} slices" if self.num_slices > 1 else "") + f" ({self.shape})"


def parse_topology(text: str, num_slices: int = 1) -> Topology:
  """`v5p-64` (Cloud TPU's slice name) or `v5p:2x4x4` (generation:topology)."""
  if num_slices < 1:
    raise AotError(f"--num-slices {num_slices}, expected at least 1")
  match = re.fullmatch(r"(v5p|v5e|v6e)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", text.strip())
  if not match:
    raise AotError(f"--topology {text!r}: expected a slice name such as v5p-64, v5e-16 or v6e-256, or "
                   f"GENERATION:SHAPE such as v5p:2x4x4 (generations: {', '.join(CHIPS)})")
  generation, count, shape = match.groups()
  chip = CHIPS[generation]
  if shape is None:
    cores = int(count)
    chips = cores // chip.cores_in_name
    if cores % chip.cores_in_name or chips not in chip.slice_shapes:
      sizes = ", ".join(f"{generation}-{c * chip.cores_in_name}" for c in chip.slice_shapes)
      raise AotError(f"--topology {text!r}: no {generation} slice of that size; expected one of {sizes}")
    shape = chip.slice_shapes[chips]
  dims = len(shape.split("x"))
  if dims != (3 if chip.slice_shapes is _3D else 2):
    raise AotError(f"--topology {text!r}: {generation} topologies have {3 if dims == 2 else 2} dimensions")
  return Topology(generation, shape, num_slices)


def topology_devices(topology: Topology) -> list:
  """The devices of the slice(s), from libtpu's topology description (nothing runs on them)."""
  try:
    from jax.experimental import topologies
    import libtpu  # noqa: F401  (the TPU compiler)
  except ImportError as e:
    raise AotError(f"ahead-of-time TPU compilation needs libtpu ({e}); install it with "
                   "`pip install 'ap_jax[tpu]'` (CPU hosts too: it only compiles here)") from e
  bounds = (1, 1, 1) if topology.chips_per_slice < 4 else (2, 2, 1)
  desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{topology.generation}:{topology.shape}",
                                      chip_config_name="default", chips_per_host_bounds=bounds,
                                      num_slices=topology.num_slices)
  devices = list(desc.devices)
  kind = devices[0].device_kind
  if kind != topology.chip.device_kind:
    raise AotError(f"libtpu describes {topology.name} with devices of kind {kind!r}, expected "
                   f"{topology.chip.device_kind!r}")
  return devices


def _abstract_autoencoder(config) -> Any:
  return jax.eval_shape(lambda: vae_lib.vae_init(jax.random.PRNGKey(0), config.model))


def compile_train_step(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """The trainer's step for `config` on `mesh`, compiled from abstract state and batch."""
  rules = mesh_lib.rules_from_config(config)
  mesh_lib.check_batch(int(config.data.global_batch_size), mesh, rules)
  frozen, meta = None, {}
  if config.stage == "denoiser":  # the frozen autoencoder as shapes; latent statistics do not change shapes
    frozen, meta = _abstract_autoencoder(config), dict(latent_shift=0.0, latent_scale=1.0)
  stage = stages_lib.build_stage(config, frozen=frozen, meta=meta)
  tx, schedule = optim_lib.build_optimizer(config.optim, int(config.total_steps))
  _, state_shardings, abstract_state = state_lib.build_state(config, stage, tx, mesh, rules)
  start = time.time()
  compiled, analysis, _ = state_lib.build_step(config, stage, tx, schedule, mesh, rules, state_shardings,
                                             abstract_state)
  return dict(analysis, compile_s=time.time() - start, model_flops=stages_lib.analytic_step_flops(config, stage),
              global_batch=int(config.data.global_batch_size), tokens_per_example=stages_lib.tokens_per_example(
                  config, stage), compiled=compiled, stage=stage)


def compile_sample_step(config: ml_collections.ConfigDict, mesh, batch: int) -> dict[str, Any]:
  """One denoiser evaluation over a generation window (context + clip_steps frames) at `batch`, with the
  parameters sharded as in training: the unit the sampler's ODE steps repeat."""
  if config.stage != "denoiser":
    raise AotError("the sampling step needs a denoiser config (stage 'denoiser')")
  rules = mesh_lib.rules_from_config(config)
  mesh_lib.check_batch(batch, mesh, rules)
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  init = lambda key: dit_lib.init(key, model_config)
  params_shape = jax.eval_shape(init, jax.random.PRNGKey(0))
  param_shardings = state_lib.param_shardings(dit_lib.param_logical_axes(model_config), init, mesh, rules)
  h, w = locate.frame_hw(config)
  frames = int(config.data.clip_steps) + 1
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  keys = ("latents", "actions", "positions", "player_mask") + (
      ("orientations",) if model_config.dit.get("state_facing", False) else ())
  abstract_batch = state_lib.batch_shapes(config, keys, mesh, rules, batch_size=batch)

  def evaluate(params, batch_, rng):
    inputs, _, _ = dit_lib.training_inputs(model_config, batch_, rng)
    return dit_lib.apply(params, model_config, inputs)

  abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), params_shape,
                                 param_shardings)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=mesh_lib.replicated(mesh))
  jitted = jax.jit(evaluate, out_shardings=batch_sharding)
  start = time.time()
  with sharding_lib.logical_sharding(mesh, rules):
    compiled = jitted.lower(abstract_params, abstract_batch, rng).compile()
  latent_hw = flops_lib.latent_hw(model_config, (h, w))
  dit_frames = frames - (0 if model_config.dit.get("context_tokens", True) else 1)
  model_flops = flops_lib.denoiser_forward_flops(model_config, batch, dit_frames, latent_hw)["total"]
  return dict(state_lib.analyse(compiled), compile_s=time.time() - start, model_flops=model_flops, batch=batch,
              generated_frames=batch * int(config.data.clip_steps), compiled=compiled)


def _with_depth(config: ml_collections.ConfigDict, depth: int) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.dit.depth = depth
  config.model.dit.scan_layers = False
  return config


def unrolled_costs(config: ml_collections.ConfigDict, compile_fn) -> dict[str, Any]:
  """XLA's per-device FLOPs and bytes of a scanned block stack. XLA's cost analysis counts a loop body once, so a
  scanned stack of D blocks reads as about one block. The same step unrolled at depths 1 and 2 gives the cost of
  everything around the blocks (a) and of one block (b); the cost is a + b D exactly, since the blocks are equal."""
  depth = int(config.model.dit.depth)
  one, two = (compile_fn(_with_depth(config, d)) for d in (1, 2))
  out = dict(cost_method=f"unrolled at depths 1 and 2, extrapolated to {depth} (a scanned stack's loop body is "
                         "counted once by XLA)")
  for key in ("flops_per_device", "bytes_accessed_per_device"):
    a, b = one.get(key), two.get(key)
    out[key] = None if a is None or b is None else a + (b - a) * (depth - 1)
  return out


def roofline(analysis: dict, chip: Chip, chips: int) -> dict[str, Any]:
  """Fit, roofline step time and MFU bound from a compiled step's per-device figures.

  XLA's cost analysis counts a loop body once: a scanned block stack, and the windowed-einsum loops the TPU SPMD
  partitioner makes for FSDP matmuls, are undercounted (measured: a 30-block scanned base step reads as 1/13 of its
  analytic FLOPs). So the compute term uses the larger of the analytic model FLOPs per chip and XLA's count, and the
  memory term XLA's bytes (a lower bound for the same reason). Both terms are lower bounds on the step time, so
  their maximum is too, and the MFU bound an upper bound on any run's MFU."""
  memory = analysis.get("memory_bytes_per_device") or {}
  per_device = memory.get("total")
  xla_flops = analysis.get("flops_per_device")
  bytes_accessed = analysis.get("bytes_accessed_per_device")
  model = analysis.get("model_flops")
  flops = max(model / chips if model else 0.0, xla_flops or 0.0) or None
  out: dict[str, Any] = dict(per_device_bytes=per_device, hbm_bytes_per_device=chip.hbm_bytes,
                             fits=None if per_device is None else bool(per_device <= chip.hbm_bytes),
                             xla_flops_per_device=xla_flops, bytes_accessed_per_device=bytes_accessed,
                             flops_per_step=model, compute_s=None if not flops else flops / chip.peak_flops,
                             memory_s=None if not bytes_accessed else bytes_accessed / chip.hbm_bandwidth)
  times = [v for v in (out["compute_s"], out["memory_s"]) if v]
  out["roofline_step_s"] = max(times) if times else None
  out["bound_by"] = None if not times else ("compute" if out["roofline_step_s"] == out["compute_s"]
                                            else "memory bandwidth")
  out["mfu_bound"] = (model / (chips * chip.peak_flops * out["roofline_step_s"])
                      if model and out["roofline_step_s"] else None)
  return out


def _out_of_memory(error: Exception, chip: Chip) -> dict[str, Any] | None:
  """The TPU compiler refuses a program that cannot fit ("RESOURCE_EXHAUSTED: Ran out of memory on HBM ...
  (20.52G) exceeds available HBM (15.75G)"): a report of that instead of a crash; None for other errors."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  match = re.search(r"\(([\d.]+)G\) exceeds", text)
  needed = float(match.group(1)) * GIB if match else None
  return dict(fits=False, per_device_bytes=needed, hbm_bytes_per_device=chip.hbm_bytes, flops_per_step=None,
              roofline_step_s=None, mfu_bound=None, error=text.strip().splitlines()[0][:500])


def _compile_step(fn, chip: Chip) -> dict[str, Any]:
  try:
    return fn()
  except Exception as e:  # the compiler's out-of-memory refusal is a result; anything else is an error
    report = _out_of_memory(e, chip)
    if report is None:
      raise
    log.info("the compiler refused the step: %s", report["error"])
    return report


def run_aot(config: ml_collections.ConfigDict, topology: Topology, *, sample: bool = True, train: bool = True,
            sample_batch: int | None = None, denoise_steps: int = 10, unroll_costs: bool = False) -> dict[str, Any]:
  """Compiles the training step (and, for a denoiser, the sampling step) for `topology`; returns the report.
  `train=False` compiles the sampling step alone (an inference slice), whose figures then head the report.
  `unroll_costs`: count a scanned stack's cost from two small unrolled compiles (`unrolled_costs`)."""
  if not train and not (sample and config.stage == "denoiser"):
    raise AotError("nothing to compile: the training step is off, and only a denoiser has a sampling step")
  devices = topology_devices(topology)
  try:
    mesh = mesh_lib.build_mesh(config.mesh, devices)
  except mesh_lib.MeshError as e:
    raise AotError(f"{topology.name}: {e}") from e
  report: dict[str, Any] = dict(topology=topology.name, generation=topology.generation, shape=topology.shape,
                                num_slices=topology.num_slices, chips=topology.chips, device_kind=devices[0].device_kind,
                                mesh={k: int(v) for k, v in mesh.shape.items()}, config_stage=config.stage,
                                model=config.get("model_name"), attention_impl=config.model.dit.attention_impl,
                                frame_hw=list(locate.frame_hw(config)), clip_steps=int(config.data.clip_steps),
                                max_players=int(config.model.max_players), jax=jax.__version__)
  scanned = (unroll_costs and config.stage == "denoiser" and config.model.dit.scan_layers
             and int(config.model.dit.depth) > 2)
  if train:
    log.info("compiling the %s training step for %s, mesh %s", config.stage, topology.name, mesh_lib.describe(mesh))
    step = _compile_step(lambda: compile_train_step(config, mesh), topology.chip)
    if "error" in step:
      report["train"] = step
      sample = False
    else:
      step["cost_method"] = "XLA cost analysis of the compiled step"
    if scanned and "error" not in step:
      log.info("counting the scanned blocks' cost: the training step unrolled at depths 1 and 2")
      step.update(unrolled_costs(config, lambda c: compile_train_step(c, mesh)))
    if "error" not in step:
      step.update(roofline(step, topology.chip, topology.chips))
      report["train"] = {k: v for k, v in step.items() if k not in ("compiled", "stage")}
  if sample and config.stage == "denoiser":
    batch = sample_batch or mesh_lib.batch_shards(mesh, mesh_lib.rules_from_config(config))
    log.info("compiling the sampling step (one denoiser evaluation, batch %d)", batch)
    samp = _compile_step(lambda: compile_sample_step(config, mesh, batch), topology.chip)
    if "error" not in samp:
      samp["cost_method"] = "XLA cost analysis of the compiled step"
      if scanned:
        samp.update(unrolled_costs(config, lambda c: compile_sample_step(c, mesh, batch)))
      samp.update(roofline(samp, topology.chip, topology.chips))
    if samp.get("roofline_step_s"):
      samp["denoise_steps"] = denoise_steps
      samp["frames_per_s_bound"] = samp["generated_frames"] / (denoise_steps * samp["roofline_step_s"])
    report["sample"] = {k: v for k, v in samp.items() if k != "compiled"}
  # The report's headline keys are the training step's (the sampling step's when it was compiled alone).
  head = report["train"] if train else report["sample"]
  for key in ("per_device_bytes", "hbm_bytes_per_device", "fits", "flops_per_step", "roofline_step_s", "mfu_bound"):
    report[key] = head.get(key)
  return report


def _gib(x) -> str:
  return "-" if x is None else f"{x / GIB:.2f} GiB"


def format_report(report: dict[str, Any]) -> str:
  lines = [f"{report['topology']}: {report['chips']} chips of {report['device_kind']}, mesh "
           + " x ".join(f"{k}={v}" for k, v in report["mesh"].items()) + f"; {report['model']} {report['config_stage']}, "
           f"{report['frame_hw'][0]}x{report['frame_hw'][1]} frames, attention {report['attention_impl']}"]
  for name in ("train", "sample"):
    r = report.get(name)
    if not r:
      continue
    if "error" in r:
      lines.append(f"  {name:6s} DOES NOT FIT: the TPU compiler needs {_gib(r['per_device_bytes'])} of "
                   f"{_gib(r['hbm_bytes_per_device'])} HBM per device ({r['error']})")
      continue
    mem = r.get("memory_bytes_per_device") or {}
    lines.append(
        f"  {name:6s} per device: {_gib(r['per_device_bytes'])} of {_gib(r['hbm_bytes_per_device'])} HBM "
        f"({'fits' if r['fits'] else 'DOES NOT FIT'}; arguments {_gib(mem.get('arguments'))}, outputs "
        f"{_gib(mem.get('outputs'))}, temporaries {_gib(mem.get('temporaries'))}, aliased {_gib(mem.get('aliased'))})")
    if r.get("roofline_step_s"):
      lines.append(
          f"         model {r['flops_per_step']:.3e} FLOPs per step (XLA counts {r['xla_flops_per_device'] or 0:.3e} "
          f"per device), XLA {r['bytes_accessed_per_device'] or 0:.3e} bytes per device; roofline "
          f"{r['roofline_step_s'] * 1e3:.1f} ms ({r['bound_by']}-bound), MFU at most {r['mfu_bound']:.0%}; "
          f"compiled in {r['compile_s']:.0f}s")
    if name == "sample" and r.get("frames_per_s_bound"):
      lines.append(f"         batch {r['batch']}: at most {r['frames_per_s_bound']:.0f} generated frames/s with "
                   f"{r['denoise_steps']} denoising steps per frame")
  return "\n".join(lines)
