"""The sharded train state and the compiled training step.

  param_shardings(logical_axes, init, mesh, rules)   parameter shardings from logical axes (sharding rules)
  build_state(config, stage, tx, mesh, rules)         jitted init (parameters born sharded), shardings, abstract state
  batch_shapes(config, keys, mesh, rules)             abstract, batch-sharded global batch
  build_step(config, stage, tx, schedule, ...)        `jax.jit(step, in/out shardings, donate)`, compiled ahead of time
  analyse(compiled), peak_flops(device)               XLA's memory and FLOPs figures; the device's peak for MFU
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ap_jax import pytree
from ap_jax.data import locate
from ap_jax.model import config as model_config_lib
from ap_jax.model import sharding as sharding_lib
from ap_jax.train import mesh as mesh_lib
from ap_jax.train import optim as optim_lib
from ap_jax.train.stages import Stage

PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def shardings_like(tree_shapes, param_shardings, params_shapes, mesh) -> Any:
  """Shardings for an optimizer-state-like tree: a leaf whose path ends with a parameter's path and has that
  parameter's shape gets the parameter's sharding (Adam's mu and nu); anything else is replicated."""
  by_path = {}
  for (path, sh), (_, shape) in zip(jax.tree_util.tree_flatten_with_path(param_shardings)[0],
                                    jax.tree_util.tree_flatten_with_path(params_shapes)[0]):
    by_path[pytree.path_names(path)] = (sh, shape.shape)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    names = pytree.path_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
        return hit[0]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def param_shardings(logical_axes: Any, init, mesh, rules) -> Any:
  """The NamedShardings of the parameters `init(rng)` creates, from their logical axes and the sharding rules (a
  dimension the mesh does not divide stays replicated)."""
  return sharding_lib.tree_shardings(logical_axes, mesh, rules, shapes=jax.eval_shape(init, jax.random.PRNGKey(0)))


def build_state(config, stage: Stage, tx: optax.GradientTransformation, mesh, rules):
  """Returns (jitted init(rng) -> state, state shardings, abstract state). Parameters are created sharded."""
  param_shardings_ = param_shardings(stage.logical_axes, stage.init, mesh, rules)

  def init_state(rng):
    params = stage.init(rng)
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                ema=jax.tree.map(lambda p: p.astype(jnp.float32), params), rng=rng)

  shapes = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_shardings = dict(
      step=mesh_lib.replicated(mesh), params=param_shardings_,
      opt_state=shardings_like(shapes["opt_state"], param_shardings_, shapes["params"], mesh),
      ema=param_shardings_, rng=mesh_lib.replicated(mesh))
  init_fn = jax.jit(init_state, out_shardings=state_shardings)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings)
  return init_fn, state_shardings, abstract


def batch_shapes(config, keys, mesh, rules, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract global batch arrays `keys` (a stage's `batch_keys`) of the config's clips, batch-sharded; the
  batch is `data.global_batch_size` unless `batch_size` is given."""
  data = config.data
  b = int(batch_size or data.global_batch_size)
  t, p = int(data.clip_steps), int(config.model.max_players)
  h, w = locate.frame_hw(config)
  comp = model_config_lib.compression(config.model)
  latent = (b, t + 1, h // comp, w // comp, int(config.model.vae.latent_channels))
  shapes = dict(frames=((b, t + 1, h, w, 3), jnp.float32), latents=(latent, jnp.float32),
                actions=((b, t, p), jnp.int32),
                positions=((b, t + 1, p, 2), jnp.float32), orientations=((b, t + 1, p), jnp.int32),
                player_mask=((b, p), jnp.bool_))
  sharding = mesh_lib.batch_sharding(mesh, rules)
  return {k: jax.ShapeDtypeStruct(shapes[k][0], shapes[k][1], sharding=sharding) for k in keys}


def build_step(config, stage: Stage, tx, schedule, mesh, rules, state_shardings, abstract_state):
  """The jitted training step, lowered and compiled ahead of time. Returns (compiled step, analysis dict)."""
  ema_decay = float(config.optim.ema_decay)
  frozen_shardings = (sharding_lib.tree_shardings(stage.frozen_axes, mesh, rules, shapes=stage.frozen)
                      if stage.frozen is not None else None)

  def train_step(state, batch, frozen):
    rng = jax.random.fold_in(state["rng"], state["step"])

    def loss_of(params):
      return stage.loss(params, batch, rng, frozen)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    with jax.named_scope("optimizer"):  # scopes name the ops in profiles (`ap-jax bench profile`)
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
    with jax.named_scope("ema"):
      ema = optim_lib.ema_update(state["ema"], params, ema_decay, state["step"])
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads),
                   learning_rate=schedule(state["step"]))
    new_state = dict(step=state["step"] + 1, params=params, opt_state=opt_state, ema=ema, rng=state["rng"])
    return new_state, metrics

  shapes = batch_shapes(config, stage.batch_keys, mesh, rules)
  batch_shardings = {k: v.sharding for k, v in shapes.items()}
  jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings, frozen_shardings),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
  frozen_abstract = None
  if stage.frozen is not None:
    frozen_abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                   stage.frozen, frozen_shardings)
  with sharding_lib.logical_sharding(mesh, rules):
    lowered = jitted.lower(abstract_state, shapes, frozen_abstract)
  compiled = lowered.compile()
  return compiled, analyse(compiled), frozen_shardings


def analyse(compiled) -> dict:
  """Per-device memory and FLOPs of a compiled step, from XLA's own analyses."""
  out: dict[str, Any] = {}
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    out["flops_per_device"] = float(cost.get("flops", 0.0)) if cost else None
    out["bytes_accessed_per_device"] = float(cost.get("bytes accessed", 0.0)) if cost else None
  except Exception:  # some backends do not implement it
    out["flops_per_device"] = out["bytes_accessed_per_device"] = None
  try:
    mem = compiled.memory_analysis()
    out["memory_bytes_per_device"] = dict(
        arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
        temporaries=int(mem.temp_size_in_bytes), generated_code=int(mem.generated_code_size_in_bytes),
        aliased=int(getattr(mem, "alias_size_in_bytes", 0)))
    out["memory_bytes_per_device"]["total"] = (
        out["memory_bytes_per_device"]["arguments"] + out["memory_bytes_per_device"]["outputs"]
        + out["memory_bytes_per_device"]["temporaries"] - out["memory_bytes_per_device"]["aliased"])
  except Exception:
    out["memory_bytes_per_device"] = None
  return out


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, value in PEAK_FLOPS.items():
    if kind.startswith(name):
      return value
  return None
