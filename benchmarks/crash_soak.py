"""Crash soak: SIGKILL a training run at random points (some while an asynchronous save is in flight), resume it
each time, and check that every logged loss equals the uninterrupted run's bit for bit.

  python benchmarks/crash_soak.py [--kills 20] [--out benchmarks/results/crash_soak.json]

Prints one row per kill (the step the run had logged, whether a save was being written, the step it resumed
from) and a verdict, and writes the same as JSON. The run is the tiny autoencoder shrunk to seconds per process
start (the same code path as `configs/tiny.py`); tests/test_train.py runs `run_soak` with two kills.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
SMALL_AE = ["--config.model.vae.channels=8", "--config.model.vae.latent_channels=4", "--config.data.clip_steps=1",
            "--config.data.global_batch_size=8", "--config.optim.warmup_steps=0", "--config.log_every=1"]


def train_command(workdir: str, total: int, extra=()) -> list[str]:
  return [sys.executable, "-m", "ap_jax", "train", "--config", f"{TINY}:autoencoder,runlocal", "--workdir", workdir,
          "--no-progress", *SMALL_AE, f"--config.total_steps={total}", *extra]


def logged_losses(workdir: str) -> dict[int, list[float]]:
  """Every logged loss per step (a resumed run logs again the steps after its checkpoint); torn lines skipped."""
  from ap_jax.train import telemetry

  path = os.path.join(workdir, "metrics.jsonl")
  out: dict[int, list[float]] = {}
  for rec in telemetry.read_metrics(path) if os.path.exists(path) else []:
    out.setdefault(int(rec["step"]), []).append(rec["loss"])
  return out


def _last_step(workdir: str) -> int:
  steps = logged_losses(workdir)
  return max(steps) if steps else 0


def _saving(workdir: str) -> bool:
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*")))


def run_soak(workdir: str, *, kills: int, total: int = 20, seed: int = 0, checkpoint_every: int = 2,
             during_save_every: int = 2, max_delay_s: float = 0.8) -> list[dict]:
  """Starts the run, kills it `kills` times, then lets it finish. Every `during_save_every`-th kill waits for a
  save in flight (Orbax's temporary folder present) and kills at once; the others wait for the run to log a new
  step and then a random delay. Returns one record per kill."""
  from ap_jax.train import checkpoint as checkpoint_lib

  rng = random.Random(seed)
  cmd = train_command(workdir, total, [f"--config.checkpoint_every={checkpoint_every}",
                                       "--config.async_checkpointing=true"])
  records = []
  for k in range(kills):
    saved = checkpoint_lib.Checkpointer(workdir, read_only=True).all_steps() if os.path.isdir(workdir) else []
    before = _last_step(workdir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    during_save = during_save_every > 0 and k % during_save_every == 0
    try:
      while proc.poll() is None:
        if during_save and _saving(workdir) and _last_step(workdir) > before:
          break
        if not during_save and _last_step(workdir) > before:
          time.sleep(rng.uniform(0.0, max_delay_s))
          break
        time.sleep(0.01)
      in_flight = _saving(workdir)
      if proc.poll() is not None:
        raise RuntimeError(f"kill {k}: the run ended before it could be killed (code {proc.returncode}): "
                           f"{proc.stderr.read()[-2000:]}")
      proc.kill()
      proc.wait()
    finally:
      if proc.poll() is None:
        proc.kill()
    records.append(dict(kill=k, resumed_from=max(saved) if saved else 0, logged_step=_last_step(workdir),
                        save_in_flight=in_flight))
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode != 0:
    raise RuntimeError(f"the final resume failed: {r.stderr[-3000:]}")
  return records


def mismatches(resumed: dict[int, list[float]], straight: dict[int, list[float]], total: int) -> list[str]:
  problems = [f"steps logged: {sorted(resumed)}"] if sorted(resumed) != list(range(1, total + 1)) else []
  for step, values in sorted(resumed.items()):
    problems += [f"step {step}: {v!r} != {straight[step][0]!r}" for v in values if v != straight.get(step, [None])[0]]
  return problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--total-steps", type=int, default=60)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "crash_soak.json"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    straight_dir, soak_dir = os.path.join(tmp, "straight"), os.path.join(tmp, "soak")
    start = time.time()
    subprocess.run(train_command(straight_dir, args.total_steps), check=True, capture_output=True)
    records = run_soak(soak_dir, kills=args.kills, total=args.total_steps, seed=args.seed)
    problems = mismatches(logged_losses(soak_dir), logged_losses(straight_dir), args.total_steps)
  print(f"{'kill':>4} {'resumed from':>12} {'logged step':>11} {'save in flight':>14}")
  for rec in records:
    print(f"{rec['kill']:>4} {rec['resumed_from']:>12} {rec['logged_step']:>11} {str(rec['save_in_flight']):>14}")
  verdict = "bit-exact" if not problems else f"{len(problems)} mismatches"
  print(f"{args.kills} kills, {sum(r['save_in_flight'] for r in records)} during a save: losses {verdict} "
        f"against the uninterrupted run ({time.time() - start:.0f}s)")
  for p in problems[:20]:
    print("  ", p)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(kills=records, total_steps=args.total_steps, seed=args.seed, bit_exact=not problems,
                   problems=problems), f, indent=2)
  return 0 if not problems else 1


if __name__ == "__main__":
  sys.exit(main())
