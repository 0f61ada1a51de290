"""Optimiser from config: AdamW, warmup then cosine or warmup-stable-decay, clipping, decay masks, EMA.

Weight decay spares norms, biases, embeddings' scalar gains and every 1-D parameter: decaying a norm scale
towards zero fights the normalisation, and decaying biases buys nothing. In stacked (scanned) blocks a leading
`layers` axis is not a feature axis, so the rule looks at the parameter's name as well as its rank.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ap_jax import pytree

NO_DECAY_NAMES = ("bias", "scale", "norm", "modulation", "gamma", "beta")


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup over `warmup_steps` (none when 0), then cosine decay, warmup-stable-decay or constant."""
  warmup = int(opt.warmup_steps)
  peak, final = float(opt.learning_rate), float(opt.learning_rate) * float(opt.final_lr_fraction)
  rest = max(1, total_steps - warmup)
  if opt.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=final / peak if peak else 0.0)
  elif opt.schedule == "wsd":  # warmup-stable-decay: flat, then linear decay over the last decay_fraction
    decay_steps = max(1, int(total_steps * opt.decay_fraction))
    stable = max(0, rest - decay_steps)
    main = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay_steps)],
                                [stable])
  elif opt.schedule == "constant":
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f"optim.schedule = {opt.schedule!r}, expected 'cosine', 'wsd' or 'constant'")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params):
  """True where weight decay applies: matrices and conv kernels, not norms, biases or gains."""

  def decide(path, leaf):
    names = pytree.path_names(path)
    if any(any(tag in name.lower() for tag in NO_DECAY_NAMES) for name in names[-1:]):
      return False
    core_rank = leaf.ndim - (1 if "blocks" in names else 0)
    return core_rank >= 2

  return jax.tree_util.tree_map_with_path(decide, params)


def build_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                                optax.Schedule]:
  schedule = learning_rate_schedule(opt, total_steps)
  chain = []
  if opt.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain), schedule


def ema_update(ema, params, decay: float, step: jax.Array):
  """EMA of the parameters for sampling. The decay warms up as (1 + step) / (10 + step) until it reaches `decay`
  (TensorFlow's ExponentialMovingAverage num_updates rule), so the EMA tracks a short run instead of averaging
  in its early, bad weights: with the plain 1 - 1/(step + 1) warm-up the EMA is the uniform mean of every step
  so far until step 1/(1 - decay) (on a 2,600-step tiny denoiser, sampling from that EMA scored subject
  preservation 0.364 against 0.450 with the raw weights)."""
  s = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
  return jax.tree.map(lambda e, p: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype),
                      ema, params)
