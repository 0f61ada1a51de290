"""The compute curve on one accelerator: the full model and the global-action baseline at several training budgets.

Answers issue 9's question, is the recipe or the budget the limit? On the comparison's protocol (`ap-jax compare`:
trained on built-in episodes of 2 to 7 players, scored on fresh episodes of 1 to 8 players, 8 steps each), it
trains every arm (variant x batch x steps, each with its own full schedule) side by side on one device, one process
per arm, until they finish or a wall-clock deadline (then SIGTERM: the trainer saves and exits, and the arm is
scored at the step it reached, marked as cut). Then it scores each arm in its own process and writes:

  OUT/curve.json   per arm: variant, batch, steps planned and reached, training FLOPs (analytic), step time,
                   movement accuracy, subject preservation, tracking, PSNR, SSIM, by player count, by step
  OUT/curve.md     the same as a table, with holding the initial frame as the floor
  OUT/curve.png    movement accuracy and subject preservation against training FLOPs, one line per variant
  OUT/logs.tar.gz  every process's log

  python launch/gpu_curve.py --out OUT [--deadline-s 420] [--arms full:16x2800,global_actions:16x2800,...]

The first arm sizes equal the CPU recipe (`ap-jax compare`: batch 16 x 2,800 steps after an 800-step
autoencoder), so the smallest point checks the accelerator run against the CPU's numbers (README). A CPU smoke
test, with tiny budgets:

  python launch/gpu_curve.py --out /tmp/curve --episodes 60 --ae-steps 4 --arms full:4x6,global_actions:4x6 \
      --eval-per-count 1 --eval-steps 2 --deadline-s 600

Set XLA_PYTHON_CLIENT_PREALLOCATE=false on a GPU so the processes share its memory (the script sets it for its
children). A GPU run is not part of CI; the numbers it printed are in docs/research_log.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

log = logging.getLogger("gpu_curve")

# (variant, batch, steps): 1x is the CPU recipe (batch 16 x 2,800); then 3x, 9x and 27x its training compute.
DEFAULT_ARMS = ("full:16x2800,global_actions:16x2800,full:48x2800,global_actions:48x2800,"
                "full:48x8400,global_actions:48x8400,full:144x8400,global_actions:144x8400")
KEYS = ("movement_accuracy", "subject_preservation", "tracking_error_px", "psnr", "ssim")


def parse_arms(text: str) -> list[dict]:
  """`VARIANT:BATCHxSTEPS[:sSEED]` items, comma-separated (seed: the training seed, default the config's): one
  config over several seeds, e.g. `full:16x2800:s0,full:16x2800:s1`, since one seed's rollout scores spread more
  than many single changes move them (docs/research_log.md entry 31)."""
  from ap_jax import demo

  arms = []
  for item in text.split(","):
    try:
      variant, size, *rest = item.strip().split(":")
      batch, steps = (int(v) for v in size.split("x"))
      if len(rest) > 1 or (rest and not (rest[0].startswith("s") and rest[0][1:].isdigit())):
        raise ValueError(item)
    except ValueError:
      raise SystemExit(f"--arms item {item!r}: expected VARIANT:BATCHxSTEPS or VARIANT:BATCHxSTEPS:sSEED, e.g. "
                       f"full:16x2800 or full:16x2800:s1") from None
    if variant not in demo.VARIANTS:
      raise SystemExit(f"--arms item {item!r}: unknown variant {variant!r}, expected one of {', '.join(demo.VARIANTS)}")
    seed = int(rest[0][1:]) if rest else None
    arms.append(dict(name=f"{variant}_b{batch}_s{steps}" + ("" if seed is None else f"_seed{seed}"), variant=variant,
                     batch=batch, steps=steps, seed=seed))
  names = [a["name"] for a in arms]
  if len(set(names)) != len(names):
    raise SystemExit(f"--arms {text!r}: an arm is named twice; give repeats a seed each (VARIANT:BATCHxSTEPS:sSEED)")
  return arms


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True)
  p.add_argument("--work", default=None, help="working folder (data, workdirs); default OUT/work")
  p.add_argument("--deadline-s", type=float, default=420.0, help="wall clock for the whole run, evaluation included")
  p.add_argument("--eval-reserve-s", type=float, default=110.0, help="seconds kept for scoring after training")
  p.add_argument("--arms", default=DEFAULT_ARMS)
  p.add_argument("--episodes", type=int, default=2000)
  p.add_argument("--ae-steps", type=int, default=800)
  p.add_argument("--learning-rate", type=float, default=None, help="default: the config's (4e-3)")
  p.add_argument("--eval-per-count", type=int, default=6)
  p.add_argument("--eval-steps", type=int, default=8)
  p.add_argument("--denoise-steps", type=int, default=10)
  args = p.parse_args(argv)
  start = time.time()
  deadline = start + args.deadline_s
  work, logs = set_up_run(args.out, args.work)
  arms = parse_arms(args.arms)

  import jax

  from ap_jax import demo
  from ap_jax.train import trainer

  report: dict = dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__, python=sys.version.split()[0],
                      protocol=dict(train_players=list(demo.COMPARE_PLAYERS), eval_players=[1, 8],
                                    episodes_per_count=args.eval_per_count, eval_steps=args.eval_steps,
                                    denoise_steps=args.denoise_steps, episodes=args.episodes,
                                    ae_steps=args.ae_steps),
                      seconds={})
  log.info("devices %s, jax %s; %d arms, deadline %.0fs", report["devices"], jax.__version__, len(arms),
           args.deadline_s)
  t0 = time.time()
  data_dir = demo.build_data(work, args.episodes, demo.COMPARE_PLAYERS)
  report["seconds"]["data"] = time.time() - t0
  log.info("data ready (%.0fs)", report["seconds"]["data"])
  t0 = time.time()
  data = ["--config.data.source=dir", f"--config.data.dir={data_dir}"]
  ae_dir = os.path.join(work, "ae")
  trainer.train_stage(demo._config("autoencoder", data + [f"--config.total_steps={args.ae_steps}"]), ae_dir,
                      what="the autoencoder", progress=False)
  report["seconds"]["autoencoder"] = time.time() - t0
  log.info("autoencoder trained (%.0fs)", report["seconds"]["autoencoder"])

  child_env = child_environment()
  t0 = time.time()
  for arm in arms:
    arm["workdir"] = os.path.join(work, f"dit_{arm['name']}")
    overrides = data + arm_overrides(arm, ae_dir)
    if args.learning_rate:
      overrides.append(f"--config.optim.learning_rate={args.learning_rate}")
    arm["cmd"] = [sys.executable, "-m", "ap_jax", "train", "--config", demo.TINY, "--workdir", arm["workdir"],
                  "--no-progress"] + overrides
  cut = train_arms(arms, logs, deadline - args.eval_reserve_s, child_env)
  report["seconds"]["train"] = time.time() - t0
  log.info("training done (%.0fs); cut at the deadline: %s", report["seconds"]["train"], cut or "none")

  t0 = time.time()
  for arm in arms:
    arm["score_cmd"] = [sys.executable, os.path.abspath(__file__), "--score", arm["workdir"],
                        os.path.join(work, f"eval_{arm['name']}.json"), str(args.eval_per_count),
                        str(args.eval_steps), str(args.denoise_steps)]
  score_arms(arms, work, logs, deadline, child_env)
  report["seconds"]["evaluate"] = time.time() - t0
  report["seconds"]["total"] = time.time() - start
  report["arms"] = arms
  write(args.out, report, logs)
  return 0


def set_up_run(out: str, work: str | None) -> tuple[str, str]:
  """Makes OUT, the working folder (default OUT/work) and its logs/; logs to the console and logs/main.log.
  Returns (work, logs)."""
  os.makedirs(out, exist_ok=True)
  work = os.path.abspath(work or os.path.join(out, "work"))
  logs = os.path.join(work, "logs")
  os.makedirs(logs, exist_ok=True)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S",
                      handlers=[logging.StreamHandler(), logging.FileHandler(os.path.join(logs, "main.log"))])
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
  return work, logs


def child_environment() -> dict:
  """The environment of the arms' processes: the project on the path, GPU memory shared between processes."""
  return dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=os.pathsep.join(
      [ROOT] + [v for v in os.environ.get("PYTHONPATH", "").split(os.pathsep) if v]))


def arm_label(arm: dict) -> str:
  """The arm's variant, with its training seed where the arm names one (a table's first column)."""
  return arm["variant"] + ("" if arm.get("seed") is None else f" (seed {arm['seed']})")


def arm_overrides(arm: dict, ae_dir: str) -> list[str]:
  """The denoiser overrides of one arm: its variant, budget, one checkpoint at the end, data read in-process."""
  from ap_jax import demo

  return demo.VARIANTS[arm["variant"]] + [
      f"--config.autoencoder_workdir={ae_dir}", f"--config.total_steps={arm['steps']}",
      f"--config.data.global_batch_size={arm['batch']}", "--config.log_every=100",
      f"--config.checkpoint_every={max(arm['steps'], 1)}", "--config.keep_checkpoints=1",
      "--config.data.worker_count=0"] + ([] if arm.get("seed") is None else [f"--config.seed={arm['seed']}"])


def train_arms(arms: list[dict], logs: str, train_deadline: float, env: dict) -> list[str]:
  """Runs every arm's `cmd` side by side, one process each, until all finish or `train_deadline` (then SIGTERM:
  the trainer saves and exits). Sets each arm's `train_rc` and `cut`; returns the names of the arms cut."""
  procs = {arm["name"]: subprocess.Popen(arm["cmd"], env=env, stderr=subprocess.STDOUT,
                                         stdout=open(os.path.join(logs, f"train_{arm['name']}.log"), "w"))
           for arm in arms}
  log.info("training %d arms until they finish or %.0fs from now", len(arms), train_deadline - time.time())
  while time.time() < train_deadline and any(p.poll() is None for p in procs.values()):
    time.sleep(1)
  cut = [name for name, p in procs.items() if p.poll() is None]
  for name in cut:
    procs[name].send_signal(signal.SIGTERM)
  for name, p in procs.items():
    try:
      p.wait(timeout=60)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
  for arm in arms:
    arm["train_rc"] = procs[arm["name"]].returncode
    arm["cut"] = arm["name"] in cut
  return cut


def add_training_figures(arm: dict) -> None:
  """The arm's FLOPs per step, device and median step time from its summary.json, and its training FLOPs."""
  summary_path = os.path.join(arm["workdir"], "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    times = [h["step_time_s"] for h in summary.get("history", [])[1:]]
    arm.update(flops_per_step=summary.get("flops_per_step"), device=summary.get("device"),
               step_time_s=sorted(times)[len(times) // 2] if times else None)
  if arm.get("reached_step") and arm.get("flops_per_step"):
    arm["train_flops"] = arm["reached_step"] * arm["flops_per_step"]


def score_arms(arms: list[dict], work: str, logs: str, deadline: float, env: dict) -> None:
  """Runs every arm's `score_cmd` side by side (each writes WORK/eval_NAME.json), waits until `deadline` plus a
  minute, and merges each result and the arm's training figures into the arm."""
  evals = {arm["name"]: subprocess.Popen(arm["score_cmd"], env=env, stderr=subprocess.STDOUT,
                                         stdout=open(os.path.join(logs, f"eval_{arm['name']}.log"), "w"))
           for arm in arms}
  for arm in arms:
    p = evals[arm["name"]]
    try:
      p.wait(timeout=max(30.0, deadline + 60 - time.time()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
    arm["eval_rc"] = p.returncode
    path = os.path.join(work, f"eval_{arm['name']}.json")
    if os.path.exists(path):
      with open(path) as f:
        arm.update(json.load(f))
    add_training_figures(arm)


def score(workdir: str, path: str, per_count: int, steps: int, denoise_steps: int) -> None:
  """Scores a trained arm on fresh 1-8 player episodes (the comparison's cases and seeds)."""
  logging.basicConfig(level=logging.INFO)
  from ap_jax.eval import cases as cases_lib
  from ap_jax.eval import report as report_lib
  from ap_jax.eval import run as run_lib
  from ap_jax.train import restore

  t0 = time.time()
  trained = restore.load_trained(workdir)
  cases = cases_lib.fresh_builtin_cases(trained.config, (1, 8), per_count, steps)
  results = run_lib.evaluate(trained, cases, seed=0, batch_size=8, denoise_steps=denoise_steps)
  out = {k: results.get(k) for k in KEYS}
  out.update(reached_step=int(trained.step),
             by_players={n: v.get("movement_accuracy") for n, v in results["by_players"].items()},
             by_step={n: v.get("movement_accuracy") for n, v in results.get("by_step", {}).items()},
             hold_initial_frame={k: results["baselines"]["hold_initial_frame"].get(k) for k in KEYS},
             eval_s=time.time() - t0)
  report_lib.write_json(out, path)
  print(json.dumps(out), flush=True)


def markdown(report: dict) -> str:
  def fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) and abs(v) >= 1e4 else
                                  f"{v:.{digits}f}" if isinstance(v, float) else str(v))

  lines = [f"Devices: {', '.join(report['devices'])}; jax {report['jax']}. Protocol: {report['protocol']}.", "",
           "| arm | batch | steps reached / planned | training FLOPs | step s | MA | SP | track px | PSNR | SSIM |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  hold = None
  for arm in report["arms"]:
    hold = hold or arm.get("hold_initial_frame")
    reached = arm.get("reached_step")
    cut = " (cut)" if arm.get("cut") else ""
    lines.append(f"| {arm_label(arm)} | {arm['batch']} | {fmt(reached)} / {arm['steps']}{cut}"
                 f" | {fmt(arm.get('train_flops'))} | {fmt(arm.get('step_time_s'), 4)} | "
                 + " | ".join(fmt(arm.get(k)) for k in ("movement_accuracy", "subject_preservation")) + " | "
                 + f"{fmt(arm.get('tracking_error_px'), 2)} | {fmt(arm.get('psnr'), 2)} | {fmt(arm.get('ssim'))} |")
  if hold:
    lines.append(f"| hold the initial frame | | | | | {fmt(hold.get('movement_accuracy'))} | "
                 f"{fmt(hold.get('subject_preservation'))} | | {fmt(hold.get('psnr'), 2)} | {fmt(hold.get('ssim'))} |")
  lines.append("")
  lines.append(f"Seconds: {json.dumps({k: round(v) for k, v in report['seconds'].items()})}")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str, title: str = "fresh built-in episodes, 1-8 players (trained on 2-7)") -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, title in ((axes[0], "movement_accuracy", "movement accuracy"),
                         (axes[1], "subject_preservation", "subject preservation")):
    for i, variant in enumerate(dict.fromkeys(a["variant"] for a in report["arms"])):
      color = f"C{i}"
      points = sorted(((a["train_flops"], a[key], a) for a in report["arms"]
                       if a["variant"] == variant and a.get("train_flops") and a.get(key) is not None),
                      key=lambda p: p[0])
      done = [(x, y) for x, y, a in points if not a.get("cut")]
      if done:  # runs that finished their schedule: the curve
        ax.plot([x for x, _ in done], [y for _, y in done], marker="o", color=color, label=variant)
      cut = [(x, y) for x, y, a in points if a.get("cut")]
      if cut:  # runs stopped at the deadline, mid-schedule (learning rate not decayed): hollow, unjoined
        ax.scatter([x for x, _ in cut], [y for _, y in cut], facecolors="none", edgecolors=color,
                   label=f"{variant} (cut at the deadline)")
      for x, y, a in points:
        ax.annotate(f"b{a['batch']}x{a.get('reached_step')}", (x, y), fontsize=7, textcoords="offset points",
                    xytext=(3, 3))
    holds = [a["hold_initial_frame"][key] for a in report["arms"] if a.get("hold_initial_frame")]
    if holds:
      ax.axhline(holds[0], color="gray", linestyle="--", label="hold the initial frame")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (denoiser, analytic)")
    ax.set_title(title)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(out: str, report: dict, logs: str, *, markdown_text: str | None = None, **plot_kwargs) -> None:
  """OUT/curve.json, curve.md (`markdown_text`, default the curve's table), curve.png and logs.tar.gz."""
  from ap_jax.eval import report as report_lib

  report_lib.write_json(report, os.path.join(out, "curve.json"))
  text = markdown_text if markdown_text is not None else markdown(report)
  with open(os.path.join(out, "curve.md"), "w") as f:
    f.write(text)
  print(text, flush=True)
  try:
    plot(report, os.path.join(out, "curve.png"), **plot_kwargs)
  except Exception as e:  # the table and JSON are the record; a missing plot must not lose them
    log.warning("plot failed: %s: %s", type(e).__name__, e)
  with tarfile.open(os.path.join(out, "logs.tar.gz"), "w:gz") as tar:
    tar.add(logs, arcname="logs")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "--score":
    score(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
  else:
    sys.exit(main())
