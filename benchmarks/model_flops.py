"""Parameter counts and analytic FLOPs per training step of each model config; optionally cross-checked
against XLA's compiled cost analysis.

  python benchmarks/model_flops.py [--batch 1] [--frames 5] [--xla] [--out model_flops.json]

Prints a table and writes JSON. Frame sizes per config: tiny 64x64 (the built-in game), small 128x128, base
512x512 (the paper's rendering). FLOPs are per training step of the denoiser (forward + backward, dense
attention) and of the VAE (per frame), at the given batch of clips of `frames` frames (1 context + 4 generated).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ap_jax.model import config as config_lib  # noqa: E402
from ap_jax.model import dit, flops, layers, vae  # noqa: E402

FRAME_HW = {"tiny": (64, 64), "small": (128, 128), "base": (512, 512)}


def xla_train_step_flops(cfg, batch: int, frames: int, latent_hw) -> float:
  """Compiled cost of one unrolled training step, extrapolated from depth 1 and 2 (a scanned body is counted
  once by XLA, so the unrolled model is the reference)."""
  out = {}
  for depth in (1, 2):
    c = cfg.copy_and_resolve_references()
    c.dit.update(dict(depth=depth, scan_layers=False, remat_policy="none"))
    p_max = c.max_players
    batch_spec = {
        "latents": jax.ShapeDtypeStruct((batch, frames) + tuple(latent_hw) + (c.vae.latent_channels,), jnp.float32),
        "positions": jax.ShapeDtypeStruct((batch, frames, p_max, 2), jnp.float32),
        "actions": jax.ShapeDtypeStruct((batch, frames - 1, p_max), jnp.int32),
        "player_mask": jax.ShapeDtypeStruct((batch, p_max), jnp.bool_),
    }
    params = jax.eval_shape(lambda c=c: dit.init(jax.random.key(0), c))
    step = lambda p, b, r, c=c: jax.value_and_grad(dit.loss_fn, has_aux=True)(p, c, b, r)
    cost = jax.jit(step).lower(params, batch_spec, jax.eval_shape(lambda: jax.random.key(0))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out[depth] = float(cost["flops"])
  return out[1] + (cfg.dit.depth - 1) * (out[2] - out[1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1, help="clips per step")
  parser.add_argument("--frames", type=int, default=5, help="latent frames per clip (actions + 1)")
  parser.add_argument("--xla", action="store_true", help="also compile tiny and small and report XLA's count")
  parser.add_argument("--out", default="model_flops.json")
  args = parser.parse_args(argv)

  rows = []
  for name in config_lib.MODEL_NAMES:
    cfg = config_lib.get_model_config(name)
    cfg.dit.remat_policy = "none"  # count the model's work, not the recompute (reported separately below)
    frame_hw = FRAME_HW[name]
    lat = flops.latent_hw(cfg, frame_hw)
    tokens = (lat[0] // cfg.dit.patch_size) * (lat[1] // cfg.dit.patch_size)
    fwd = flops.denoiser_forward_flops(cfg, args.batch, args.frames, lat)
    row = {
        "config": name,
        "frame_hw": list(frame_hw),
        "latent_hw": list(lat),
        "video_tokens_per_frame": tokens,
        "sequence_length": args.frames * (tokens + cfg.max_players),
        "dit_params": layers.count_params(jax.eval_shape(lambda: dit.init(jax.random.key(0), cfg))),
        "vae_params": layers.count_params(jax.eval_shape(lambda: vae.vae_init(jax.random.key(0), cfg))),
        "dit_forward_flops": fwd["total"],
        "dit_train_step_flops": flops.denoiser_train_step_flops(cfg, args.batch, args.frames, lat),
        "dit_attention_fraction": (fwd["self_attn_scores"] + fwd["cross_attn_scores"] + fwd["softmax"]) / fwd["total"],
        "vae_train_step_flops_per_frame": flops.vae_train_step_flops(cfg, 1, frame_hw),
        "vae_encode_flops_per_frame": flops.vae_forward_flops(cfg, 1, frame_hw, decoder=False),
    }
    cfg.dit.remat_policy = "full"
    row["dit_train_step_flops_full_remat"] = flops.denoiser_train_step_flops(cfg, args.batch, args.frames, lat)
    if args.xla and name in ("tiny", "small"):
      cfg.dit.remat_policy = "none"
      cfg.dit.dtype = "float32"
      t0 = time.time()
      row["xla_train_step_flops"] = xla_train_step_flops(cfg, args.batch, args.frames, lat)
      row["xla_ratio"] = row["dit_train_step_flops"] / row["xla_train_step_flops"]
      row["xla_compile_s"] = round(time.time() - t0, 1)
    rows.append(row)

  print(f"batch {args.batch} clip(s) x {args.frames} frames; FLOPs per training step (fwd+bwd, dense attention)")
  header = f"{'config':<6} {'frame':>9} {'seq len':>7} {'DiT params':>11} {'VAE params':>11} {'DiT step':>10} " \
           f"{'attn %':>6} {'VAE step/frame':>14} {'XLA ratio':>9}"
  print(header)
  print("-" * len(header))
  for r in rows:
    ratio = f"{r['xla_ratio']:.3f}" if "xla_ratio" in r else "-"
    print(f"{r['config']:<6} {r['frame_hw'][0]:>4}x{r['frame_hw'][1]:<4} {r['sequence_length']:>7} "
          f"{r['dit_params'] / 1e6:>10.2f}M {r['vae_params'] / 1e6:>10.2f}M {r['dit_train_step_flops'] / 1e9:>9.1f}G "
          f"{100 * r['dit_attention_fraction']:>5.1f}% {r['vae_train_step_flops_per_frame'] / 1e9:>13.2f}G {ratio:>9}")
  with open(args.out, "w") as f:
    json.dump({"batch": args.batch, "frames": args.frames, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
