"""The Melting Pot comparison on one accelerator, from a bundle prepared where Melting Pot is installed.

Issue 11's comparison (full model against the global-action baseline, the paper's protocol: trained on the
config's substrates with 2 to 7 players, scored on fresh episodes of 1 to 8 players) needs more training than 2 CPU
cores give (docs/research_log.md entries 22 and 26). An accelerator machine often lacks Melting Pot itself (dmlab2d,
the Lua substrates): scoring replays every case in the true environment, and the learned detectors are fitted on
its rollouts. So the work is cut in two:

  prepare (here, with the meltingpot extra): the config's training and held-out datasets, the evaluation cases with
      their true replays (fresh 1-8 player episodes of the training substrates, the test split, the held-out
      substrates' episodes), the detectors those cases need, and optionally a trained autoencoder, in one folder:
        BUNDLE/cache/{datasets,detectors}/   an AP_JAX_CACHE holding what the config resolves to
        BUNDLE/cases.pkl.gz                   {set name: [ap_jax.eval.cases.Case]} with truth
        BUNDLE/ae/                           the autoencoder workdir (with --ae WORKDIR)
        BUNDLE/manifest.json                 config, datasets, case counts, each set's oracle ceiling
  run (on the accelerator; needs no Melting Pot): trains each arm (variant x batch x steps) side by side until a
      wall-clock deadline (then SIGTERM: the trainer saves, and the arm is scored where it stopped, marked cut), then
      scores every arm on every case set. Writes OUT/curve.json, OUT/curve.md, OUT/curve.png, OUT/logs.tar.gz.

  python launch/gpu_meltingpot.py prepare --bundle out/mp_bundle --config meltingpot:tiny --ae out/compare_mp/ae
  python launch/gpu_meltingpot.py run --bundle out/mp_bundle --out OUT --deadline-s 480 \\
      --arms full:16x2800,global_actions:16x2800,full:48x2800,global_actions:48x2800

CPU smoke test (minutes; the runlocal config, 2 episodes a count, tiny budgets):

  python launch/gpu_meltingpot.py prepare --bundle /tmp/mpb --config meltingpot:tiny,runlocal --players 2-3 \\
      --per-count 1 --eval-steps 2 --eval-episodes 1 --ae-steps 2
  python launch/gpu_meltingpot.py run --bundle /tmp/mpb --out /tmp/mpo --arms full:2x3,global_actions:2x3 \\
      --deadline-s 900 --denoise-steps 2

The bundle travels to the device machine as a carried folder (device/README.md): keep it under 64 MiB with the
wheels (`meltingpot:tiny` with 6 episodes a count was about 20 MB on the former 128 x 128 canvas).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import pickle
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_curve  # noqa: E402  (the arms' training, scoring and report, shared with the built-in game's curve)

log = logging.getLogger("gpu_meltingpot")

SETS = ("fresh", "test_split", "heldout")  # the comparison's three case sets (ap_jax.demo.run_comparison)
KEYS = gpu_curve.KEYS
DEFAULT_ARMS = "full:16x2800,global_actions:16x2800,full:48x2800,global_actions:48x2800"


def _players(text: str) -> tuple[int, int]:
  lo, _, hi = text.partition("-")
  try:
    return int(lo), int(hi or lo)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--players {text!r}: expected MIN-MAX, e.g. 1-8") from None


def prepare(args) -> None:
  """Writes the bundle (see the module docstring) into a temporary folder, then renames it into place."""
  from ap_jax import demo
  from ap_jax.data import locate
  from ap_jax.eval import cases as cases_lib
  from ap_jax.eval import learned_detector
  from ap_jax.eval import run as run_lib
  from ap_jax.train import trainer

  config = demo._config("", [], args.config)
  if config.data.source != "meltingpot":
    raise SystemExit(f"--config {args.config}: data.source is {config.data.source!r}; this script is for Melting "
                     "Pot configs (meltingpot:tiny); the built-in game's curve is launch/gpu_curve.py")
  final = os.path.abspath(args.bundle)
  tmp = final + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "cache", "datasets"))
  manifest: dict = dict(config=args.config, created=time.strftime("%Y-%m-%d %H:%M:%S"), datasets={}, sets={})
  paths = {}
  for key, heldout in (("train", False), ("heldout", True)):
    paths[key] = locate.resolve_dataset(config.data, heldout=heldout)  # generated into the cache on first use
    shutil.copytree(paths[key], os.path.join(tmp, "cache", "datasets", os.path.basename(paths[key])))
    manifest["datasets"][key] = os.path.basename(paths[key])
    log.info("dataset %s: %s", key, paths[key])
  sets = dict(fresh=cases_lib.fresh_meltingpot_cases(config, args.players, args.per_count, args.eval_steps),
              test_split=cases_lib.dataset_dir_cases(paths["train"], "test", range(args.eval_episodes), None),
              heldout=cases_lib.dataset_dir_cases(paths["heldout"], "test", range(args.eval_episodes), None))
  for name, cases in sets.items():  # scoring the true frames fits (and caches) every detector the cases need
    ceiling = run_lib.oracle(cases)
    manifest["sets"][name] = dict(cases=len(cases), players=sorted({c.num_players for c in cases}),
                                  oracle={k: ceiling.get(k) for k in KEYS})
    log.info("%s: %d cases, oracle MA %.3f SP %.3f", name, len(cases), ceiling["movement_accuracy"],
             ceiling["subject_preservation"])
  shutil.copytree(learned_detector.detector_cache_dir(), os.path.join(tmp, "cache", "detectors"),
                  ignore=lambda _, names: [n for n in names if "-%dx%d-" % tuple(locate.frame_hw(config)) not in n])
  with gzip.open(os.path.join(tmp, "cases.pkl.gz"), "wb") as f:  # pixel art: gzip takes it to about a tenth
    pickle.dump(sets, f, protocol=pickle.HIGHEST_PROTOCOL)
  if args.ae:
    shutil.copytree(args.ae, os.path.join(tmp, "ae"), ignore=shutil.ignore_patterns("tensorboard", "*.png"))
    manifest["ae"] = os.path.abspath(args.ae)
  elif args.ae_steps:
    trainer.train_stage(demo._config("autoencoder", [f"--config.total_steps={args.ae_steps}"], args.config),
                        os.path.join(tmp, "ae"), what="the autoencoder", progress=True)
    manifest["ae_steps"] = args.ae_steps
  with open(os.path.join(tmp, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
  shutil.rmtree(final, ignore_errors=True)
  os.rename(tmp, final)
  size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(final) for n in names)
  log.info("bundle %s: %.1f MB; %s", final, size / 1e6, json.dumps(manifest["sets"]))


def run(args) -> int:
  """Trains the arms on the bundle's data and scores them on its cases (see the module docstring)."""
  bundle = os.path.abspath(args.bundle)
  with open(os.path.join(bundle, "manifest.json")) as f:
    manifest = json.load(f)
  start = time.time()
  deadline = start + args.deadline_s
  work, logs = gpu_curve.set_up_run(args.out, args.work)
  # The bundle's datasets and detectors in a cache of our own (the latent cache is written there, not into the
  # bundle), for this process and the arms'.
  shutil.copytree(os.path.join(bundle, "cache"), os.path.join(work, "cache"), dirs_exist_ok=True)
  os.environ["AP_JAX_CACHE"] = os.path.join(work, "cache")
  arms = gpu_curve.parse_arms(args.arms)

  import jax

  from ap_jax import demo
  from ap_jax.train import trainer

  config_name = manifest["config"]
  report: dict = dict(devices=[str(d) for d in jax.devices()], jax=jax.__version__, python=sys.version.split()[0],
                      config=config_name, sets=manifest["sets"], seconds={},
                      protocol=dict(config=config_name, overrides=list(args.override), denoise_steps=args.denoise_steps,
                                    cases={name: s["cases"] for name, s in manifest["sets"].items()}))
  log.info("devices %s, jax %s; config %s; %d arms, deadline %.0fs", report["devices"], jax.__version__,
           config_name, len(arms), args.deadline_s)
  ae_dir = os.path.join(work, "ae")
  t0 = time.time()
  if os.path.isdir(os.path.join(bundle, "ae")) and not os.path.isdir(ae_dir):
    shutil.copytree(os.path.join(bundle, "ae"), ae_dir)
  elif not os.path.isdir(os.path.join(bundle, "ae")):
    trainer.train_stage(demo._config("autoencoder", [f"--config.total_steps={args.ae_steps}"], config_name), ae_dir,
                        what="the autoencoder", progress=False)
  report["seconds"]["autoencoder"] = time.time() - t0

  env = gpu_curve.child_environment()
  t0 = time.time()
  for arm in arms:
    arm["workdir"] = os.path.join(work, f"dit_{arm['name']}")
    arm["cmd"] = [sys.executable, "-m", "ap_jax", "train", "--config", config_name, "--workdir", arm["workdir"],
                  "--no-progress"] + gpu_curve.arm_overrides(arm, ae_dir) + list(args.override)
  cut = gpu_curve.train_arms(arms, logs, deadline - args.eval_reserve_s, env)
  report["seconds"]["train"] = time.time() - t0
  log.info("training done (%.0fs); cut at the deadline: %s", report["seconds"]["train"], cut or "none")

  t0 = time.time()
  for arm in arms:
    arm["score_cmd"] = [sys.executable, os.path.abspath(__file__), "score", "--bundle", bundle, "--workdir",
                        arm["workdir"], "--json", os.path.join(work, f"eval_{arm['name']}.json"),
                        "--denoise-steps", str(args.denoise_steps)]
  gpu_curve.score_arms(arms, work, logs, deadline, env)
  report["seconds"]["evaluate"] = time.time() - t0
  report["seconds"]["total"] = time.time() - start
  report["arms"] = arms
  write(args.out, report, logs)
  return 0


def score(args) -> None:
  """Scores one trained arm on each of the bundle's case sets; writes the fresh set's metrics at the top level (the
  keys `gpu_curve` reads) and each set's under its name."""
  logging.basicConfig(level=logging.INFO)
  os.environ.setdefault("AP_JAX_CACHE", os.path.join(os.path.abspath(args.bundle), "cache"))  # run sets its own
  from ap_jax.eval import report as report_lib
  from ap_jax.eval import run as run_lib
  from ap_jax.train import restore

  t0 = time.time()
  with gzip.open(os.path.join(args.bundle, "cases.pkl.gz"), "rb") as f:
    sets = pickle.load(f)
  trained = restore.load_trained(args.workdir)
  out: dict = dict(reached_step=int(trained.step))
  for name in SETS:
    results = run_lib.evaluate(trained, sets[name], seed=0, batch_size=8, denoise_steps=args.denoise_steps)
    out[name] = {k: results.get(k) for k in KEYS}
    out[name]["by_players"] = {n: v.get("movement_accuracy") for n, v in results["by_players"].items()}
    out[name]["hold_initial_frame"] = {k: results["baselines"]["hold_initial_frame"].get(k) for k in KEYS}
  out.update({k: out["fresh"][k] for k in KEYS})
  out["hold_initial_frame"] = out["fresh"]["hold_initial_frame"]
  out["eval_s"] = time.time() - t0
  report_lib.write_json(out, args.json)
  print(json.dumps(out), flush=True)


def markdown(report: dict) -> str:
  """The curve's table (fresh 1-8 players) and each arm's test-split and held-out-substrate scores."""
  text = gpu_curve.markdown(report)
  lines = ["", "Each arm on the dataset's test split and on the held-out substrates (MA / SP):", "",
           "| arm | batch | steps | test split MA | SP | held-out MA | SP |", "|---|---|---|---|---|---|---|"]

  def fmt(v):
    return "-" if v is None else f"{v:.3f}"

  for arm in report["arms"]:
    test, held = arm.get("test_split", {}), arm.get("heldout", {})
    lines.append(f"| {gpu_curve.arm_label(arm)} | {arm['batch']} | {arm.get('reached_step', '-')} | "
                 f"{fmt(test.get('movement_accuracy'))} | {fmt(test.get('subject_preservation'))} | "
                 f"{fmt(held.get('movement_accuracy'))} | {fmt(held.get('subject_preservation'))} |")
  hold = next((a for a in report["arms"] if a.get("test_split")), None)
  if hold:
    t, h = hold["test_split"]["hold_initial_frame"], hold["heldout"]["hold_initial_frame"]
    lines.append(f"| hold the initial frame | | | {fmt(t.get('movement_accuracy'))} | "
                 f"{fmt(t.get('subject_preservation'))} | {fmt(h.get('movement_accuracy'))} | "
                 f"{fmt(h.get('subject_preservation'))} |")
  lines += ["", "Oracle (the true frames scored as a rollout) per set: " + "; ".join(
      f"{name} MA {fmt(s['oracle'].get('movement_accuracy'))} SP {fmt(s['oracle'].get('subject_preservation'))}"
      for name, s in report["sets"].items())]
  return text + "\n".join(lines) + "\n"


def write(out: str, report: dict, logs: str) -> None:
  gpu_curve.write(out, report, logs, markdown_text=markdown(report),
                  title=f"{report['config']}: fresh episodes of the training substrates, 1-8 players")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  pre = sub.add_parser("prepare", help="write the bundle (needs the meltingpot extra)")
  pre.add_argument("--bundle", required=True)
  pre.add_argument("--config", default="meltingpot:tiny")
  pre.add_argument("--players", type=_players, default=(1, 8), help="fresh episodes' player counts, MIN-MAX")
  pre.add_argument("--per-count", type=int, default=6, help="fresh episodes per player count")
  pre.add_argument("--eval-steps", type=int, default=20, help="actions per fresh episode (the paper's 20)")
  pre.add_argument("--eval-episodes", type=int, default=24, help="test-split and held-out episodes, whole")
  pre.add_argument("--ae", default=None, help="a trained autoencoder workdir to carry (else --ae-steps, or train "
                                               "it on the accelerator)")
  pre.add_argument("--ae-steps", type=int, default=0, help="train the autoencoder here this many steps")
  r = sub.add_parser("run", help="train and score the arms (on the accelerator)")
  r.add_argument("--bundle", required=True)
  r.add_argument("--out", required=True)
  r.add_argument("--work", default=None, help="working folder (workdirs, logs); default OUT/work")
  r.add_argument("--arms", default=DEFAULT_ARMS)
  r.add_argument("--deadline-s", type=float, default=480.0, help="wall clock for the whole run, scoring included")
  r.add_argument("--eval-reserve-s", type=float, default=150.0, help="seconds kept for scoring after training")
  r.add_argument("--ae-steps", type=int, default=4000, help="autoencoder steps when the bundle carries none")
  r.add_argument("--denoise-steps", type=int, default=10)
  r.add_argument("--override", action="append", default=[], metavar="--config.KEY=VALUE",
                 help="a denoiser config override for every arm (repeatable), e.g. "
                      "--override=--config.model.flow.subject_loss_weight=0")
  s = sub.add_parser("score", help=argparse.SUPPRESS)
  s.add_argument("--bundle", required=True)
  s.add_argument("--workdir", required=True)
  s.add_argument("--json", required=True)
  s.add_argument("--denoise-steps", type=int, default=10)
  args = p.parse_args(argv)
  if args.command == "prepare":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's per-save chatter
    prepare(args)
    return 0
  if args.command == "score":
    score(args)
    return 0
  return run(args)


if __name__ == "__main__":
  sys.exit(main())
