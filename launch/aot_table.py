"""The pod table in PODS.md: `ap-jax aot` for the base config (and larger Wan-shaped models) at the paper's
setting on several TPU slices, compiled on this host with libtpu. One JSON per row under --out, then a markdown
table on stdout (and in --out/table.md).

  python launch/aot_table.py --out docs/pods            # every row (15-20 min a row on 2 busy cores; rows with a
                                                       # JSON already in --out are kept)
  python launch/aot_table.py --out /tmp/pods --rows base-v5p-64 --dry-run

The paper's setting: 512 x 512 frames (the base VAE's 8x: 64 x 64 latents, patch 2: 1,024 tokens a frame),
1 context + 4 generated latent frames (clip_steps 4), 8 subject slots, global batch 256.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PAPER = ["--config.data.grid=64,64", "--config.data.clip_steps=4", "--config.data.global_batch_size=256"]
# Wan-shaped widths: Wan2.2-TI2V-5B (dim 3072, 30 blocks, 24 heads, FFN 14336) and Wan2.1-14B (5120, 40, 40, 13824).
WAN_5B = ["--config.model.dit.width=3072", "--config.model.dit.depth=30", "--config.model.dit.heads=24",
          "--config.model.dit.mlp=14336"]
WAN_14B = ["--config.model.dit.width=5120", "--config.model.dit.depth=40", "--config.model.dit.heads=40",
           "--config.model.dit.mlp=13824"]
FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
DATA_PARALLEL = ["--config.mesh.data=-1", "--config.mesh.fsdp=1"]

# name: (model, topology, slices, overrides)
ROWS = {
    "base-v5p-8": ("base 1.3B", "v5p-8", 1, PAPER + FSDP),
    "base-v5p-64": ("base 1.3B", "v5p-64", 1, PAPER + FSDP),
    "base-v5p-256": ("base 1.3B", "v5p-256", 1, PAPER + FSDP),
    "base-v6e-64": ("base 1.3B", "v6e-64", 1, PAPER + FSDP),
    "base-v6e-256": ("base 1.3B", "v6e-256", 1, PAPER + FSDP),
    "base-2x-v5p-64": ("base 1.3B", "v5p-64", 2, PAPER + FSDP + ["--config.mesh.dcn_data=2"]),
    "5b-v5p-256": ("Wan-5B shape", "v5p-256", 1, PAPER + FSDP + WAN_5B),
    "14b-v5p-256-dp": ("Wan-14B shape", "v5p-256", 1, PAPER + DATA_PARALLEL + WAN_14B),
    "14b-v5p-256": ("Wan-14B shape", "v5p-256", 1, PAPER + FSDP + WAN_14B),
    "14b-v5p-256-tp4": ("Wan-14B shape", "v5p-256", 1, PAPER + WAN_14B + [
        "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=4"]),
    # Global batch 32 on 128 chips: the batch axes can take at most 32 ways, so the other 4 must split the model.
    "14b-v5p-256-b32-tp4": ("Wan-14B shape", "v5p-256", 1, PAPER[:2] + ["--config.data.global_batch_size=32"]
                            + WAN_14B + ["--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.tensor=4"]),
}
# The larger models' rows compile the training step only (`--no-sample`): the question there is what fits.
TRAIN_ONLY = {"5b-v5p-256", "14b-v5p-256-dp", "14b-v5p-256", "14b-v5p-256-tp4", "14b-v5p-256-b32-tp4"}


def _gib(x):
  return "-" if x is None else f"{x / 2 ** 30:.1f}"


def markdown(reports: dict[str, dict]) -> str:
  lines = ["| model | slice | chips | mesh | batch | per-chip GiB (HBM) | fits | train roofline ms | MFU bound | "
           "sample: frames/s bound (batch) |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name, (model, *_rest) in ROWS.items():
    r = reports.get(name)
    if r is None:
      continue
    t, s = r["train"], r.get("sample") or {}
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1"
    fps = f"{s['frames_per_s_bound']:.0f} ({s['batch']})" if s.get("frames_per_s_bound") else "-"
    lines.append(
        f"| {model} | {r['topology']} | {r['chips']} | {mesh} | {t.get('global_batch', '-')} | "
        f"{_gib(t['per_device_bytes'])} ({_gib(t['hbm_bytes_per_device'])}) | {'yes' if t['fits'] else '**no**'} | "
        + (f"{t['roofline_step_s'] * 1e3:.0f} ({t['bound_by']})" if t.get("roofline_step_s") else "-") + " | "
        + (f"{t['mfu_bound']:.0%}" if t.get("mfu_bound") else "-") + f" | {fps} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--rows", default="", help=f"comma-separated subset of {', '.join(ROWS)}")
  parser.add_argument("--dry-run", action="store_true", help="print the ap-jax aot command of each row")
  args = parser.parse_args(argv)
  names = [n for n in args.rows.split(",") if n] or list(ROWS)
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; expected names from {', '.join(ROWS)}")
  os.makedirs(args.out, exist_ok=True)
  if args.dry_run:
    for name in names:
      _, topology, slices, overrides = ROWS[name]
      no_sample = " --no-sample" if name in TRAIN_ONLY else ""
      print(f"ap-jax aot --config base --topology {topology} --num-slices {slices}{no_sample} {' '.join(overrides)} "
            f"--json {os.path.join(args.out, name + '.json')}")
    return 0
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      datefmt="%H:%M:%S")
  from ap_jax import aot
  from ap_jax.eval import report as report_lib
  from ap_jax.train import config_utils

  for name in names:
    path = os.path.join(args.out, name + ".json")
    if os.path.exists(path):
      logging.info("%s: kept %s", name, path)
      continue
    _, topology, slices, overrides = ROWS[name]
    start = time.time()
    config = config_utils.apply_overrides(config_utils.load_config("base"), overrides)
    report = aot.run_aot(config, aot.parse_topology(topology, slices), sample=name not in TRAIN_ONLY)
    report.update(config="base", overrides=overrides, seconds=time.time() - start)
    report_lib.write_json(report, path)
    print(aot.format_report(report), flush=True)
  reports = {}
  for name in ROWS:
    path = os.path.join(args.out, name + ".json")
    if os.path.exists(path):
      with open(path) as f:
        reports[name] = json.load(f)
  table = markdown(reports)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table)
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
