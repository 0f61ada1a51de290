"""`ap-jax bench scaling`: the training step's time, compiled memory and analytic FLOPs against frames, resolution
and players, each with its fitted growth."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ap_jax.bench import common
from ap_jax.bench.step import step_benchmark

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
                   f"{common.fmt(row['compiled_memory_bytes'] and row['compiled_memory_bytes'] / 2**20, '.0f')} |")
    lines.append("")
  return "\n".join(lines)
