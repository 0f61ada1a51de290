"""The `ap-jax` command line (also `python -m ap_jax`).

Each subcommand is a function `cmd_<name>(args)` with an `add_<name>(subparsers)` that declares its flags, so
later subcommands (train, sample, eval, bench, aot) are one pair each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger("ap_jax")


def _players(text: str) -> tuple[int, int]:
  try:
    if "-" in text:
      lo, hi = (int(v) for v in text.split("-", 1))
    else:
      lo = hi = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--players {text!r}: expected MIN-MAX (e.g. 2-4) or a single count") from None
  return lo, hi


def _hw(text: str) -> tuple[int, int]:
  try:
    parts = [int(v) for v in text.lower().split("x")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected HxW (e.g. 8x8) or one number") from None
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected HxW with positive sizes")
  return parts[0], parts[1]


# ------------------------------------------------------------------------------------------------ data


def add_data(sub):
  p = sub.add_parser("data", help="generate multi-player rollouts into a TFDS ArrayRecord dataset",
                     description="Generate rollouts of the built-in game or Melting Pot substrates (random or "
                     "sticky-random play) and write them as a TFDS dataset in ArrayRecord format with "
                     "train/validation/test splits by episode seed. The dataset appears at --out only when complete.")
  p.add_argument("--source", choices=("builtin", "meltingpot"), default="builtin")
  p.add_argument("--substrates", default="",
                 help="comma-separated Melting Pot substrates (meltingpot) or layouts (builtin: "
                 "open,rooms,corridors,random); empty = all")
  p.add_argument("--episodes", type=int, default=1000, help="episodes over all splits (80/10/10)")
  p.add_argument("--steps", type=int, default=16, help="actions per episode (frames = steps + 1)")
  p.add_argument("--players", type=_players, default=(2, 4), help="player count range MIN-MAX per episode")
  p.add_argument("--grid", type=_hw, default=(8, 8), help="built-in map size in cells, HxW")
  p.add_argument("--cell-size", type=int, default=8, help="built-in pixels per cell (Melting Pot uses 8)")
  p.add_argument("--canvas", type=_hw, default=(256, 256), help="Melting Pot frame canvas in pixels, HxW")
  p.add_argument("--policy", choices=("uniform", "sticky"), default="sticky")
  p.add_argument("--sticky-p", type=float, default=0.7, help="probability of repeating the last action")
  p.add_argument("--seed", type=int, default=0, help="base seed: episode seeds are derived from it per split")
  p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                 help="processes generating Melting Pot episodes")
  p.add_argument("--out", required=True, help="dataset directory to create")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  p.set_defaults(func=cmd_data)


def cmd_data(args) -> int:
  from ap_jax.data import dataset, tfds_builder

  spec = tfds_builder.GenerationSpec(
      source=args.source, substrates=tuple(s for s in args.substrates.split(",") if s), episodes=args.episodes,
      steps=args.steps, players=args.players, grid_hw=args.grid, cell_size=args.cell_size,
      canvas_hw=args.canvas, policy=args.policy, sticky_p=args.sticky_p, seed=args.seed, workers=args.workers)
  start = time.time()
  log.info("generating %d %s episodes of %d steps into %s", spec.episodes, spec.source, spec.steps, args.out)
  path = dataset.build(spec, args.out, overwrite=args.overwrite)
  info = dataset.read_info(path)
  sizes = {s: info.num_episodes(s) for s in sorted(info.split_files)}
  elapsed = time.time() - start
  print(f"wrote {path}: {sizes} episodes in {elapsed:.1f}s "
        f"({spec.episodes * spec.steps / elapsed:.0f} env steps/s including encoding)")
  return 0


# ------------------------------------------------------------------------------------------------ show


def add_show(sub):
  p = sub.add_parser("show", help="render a recorded episode with its labels drawn over, as MP4 or GIF",
                     description="Render episode K of a dataset split with each player's recorded position "
                     "(ring in its colour), facing (line) and next action drawn over the frames.")
  p.add_argument("dataset", help="dataset directory written by `ap-jax data`")
  p.add_argument("--split", default="train")
  p.add_argument("--episode", type=int, default=0, help="episode index K within the split")
  p.add_argument("--scale", type=int, default=4, help="pixel upscaling for viewing")
  p.add_argument("--fps", type=float, default=4.0)
  p.add_argument("--out", required=True, help="output .mp4 or .gif")
  p.set_defaults(func=cmd_show)


def cmd_show(args) -> int:
  from ap_jax import viz
  from ap_jax.data import dataset

  source = dataset.open_split(args.dataset, args.split)
  if not 0 <= args.episode < len(source):
    raise ValueError(f"--episode {args.episode}: split {args.split!r} of {args.dataset} has episodes "
                     f"0 to {len(source) - 1}")
  episode = source[args.episode]
  frames = viz.annotate_episode(episode, scale=args.scale)
  viz.write_video(frames, args.out, fps=args.fps)
  print(f"wrote {args.out}: episode {args.episode} (seed {episode['seed']}, {episode['substrate']}, "
        f"{episode['actions'].shape[1]} players, {len(frames)} frames)")
  return 0


# ------------------------------------------------------------------------------------------------ train


def add_train(sub):
  p = sub.add_parser("train", help="train the autoencoder or the denoiser (sharded, resumable, multi-host)",
                     description="Train the stage the config names (autoencoder or denoiser) in --workdir, "
                     "resuming from its newest good checkpoint. Extra --config.KEY=VALUE arguments override "
                     "config keys. SIGTERM / Ctrl-C finish the step, save and exit.")
  p.add_argument("--config", required=True,
                 help="config name or file, optionally with arguments: NAME[:ARGS] for a config shipped with the "
                      "package (tiny:autoencoder,batch=32), or a file (configs/tiny.py[:ARGS])")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard logs, loss.png")
  p.add_argument("--fresh", action="store_true",
                 help="start over even if the workdir holds a checkpoint (old checkpoints are moved aside)")
  p.add_argument("--coordinator", default=None, help="multi-host: coordinator host:port (not needed on TPU VMs)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
  p.set_defaults(func=cmd_train, accepts_config_overrides=True)


def cmd_train(args) -> int:
  from ap_jax.train import config_utils, distributed, trainer

  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  config = config_utils.apply_overrides(config_utils.load_config(args.config), args.overrides)
  summary = trainer.train(config, args.workdir, fresh=args.fresh, progress=not args.no_progress)
  import jax

  if jax.process_index() == 0:
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=str)
    print(f"trained {summary['stage']} to step {summary['end_step']} in {args.workdir}"
          + (f" (stopped by {summary['stopped_by']})" if summary["stopped_by"] else ""))
  return 0


# ------------------------------------------------------------------------------------------------ demo


def add_demo(sub):
  p = sub.add_parser("demo", help="the main job on the built-in game (README's first command)",
                     description="Generate built-in game data, train the tiny autoencoder and denoiser, sample a "
                     "4-player rollout video, evaluate against the true game, and print movement accuracy and "
                     "subject preservation. Resumable: run it again to continue. About 20 minutes on 2 CPU cores.")
  p.add_argument("--out", default="out/demo", help="output directory (data, workdirs, video, results.json)")
  p.add_argument("--episodes", type=int, default=2000, help="episodes in the built-in dataset")
  p.add_argument("--ae-steps", type=int, default=1200, help="autoencoder training steps")
  p.add_argument("--dit-steps", type=int, default=2800, help="denoiser training steps")
  p.add_argument("--eval-episodes", type=int, default=24, help="held-out test episodes to evaluate")
  p.add_argument("--eval-steps", type=int, default=16, help="generated steps per evaluated episode")
  p.add_argument("--denoise-steps", type=int, default=10, help="sampler steps per generated frame")
  p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
  p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
  from ap_jax import demo

  demo.run_demo(args.out, episodes=args.episodes, ae_steps=args.ae_steps, dit_steps=args.dit_steps,
                eval_episodes=args.eval_episodes, eval_steps=args.eval_steps, denoise_steps=args.denoise_steps,
                progress=not args.no_progress)
  return 0


def add_compare(sub):
  p = sub.add_parser("compare", help="train and evaluate the full model, the baseline and the ablations",
                     description="The paper's comparison on the built-in game: the full model, global action "
                     "conditioning (no subject tokens), and the ablations (no subject isolation, no masked "
                     "cross-attention, frame-wise cross-attention, no RoPE on subject tokens), trained at equal "
                     "steps on the same data (2 to 7 players by default) with one shared autoencoder, each "
                     "evaluated on fresh episodes with 1 to 8 players. With --config meltingpot:tiny, the same on "
                     "that config's Melting Pot substrates, scored on its test split and on the substrates it holds "
                     "out of training. Writes comparison.json and comparison.md. Resumable per variant.")
  p.add_argument("--out", default="out/compare")
  p.add_argument("--config", default="tiny",
                 help="tiny (the built-in game) or a Melting Pot config, e.g. meltingpot:tiny (its substrates; "
                      "scored on its test split and its held-out substrates)")
  p.add_argument("--variants", default="", help="comma-separated subset (default: all)")
  p.add_argument("--episodes", type=int, default=2000)
  p.add_argument("--ae-steps", type=int, default=800, help="autoencoder training steps (the demo's)")
  p.add_argument("--dit-steps", type=int, default=2800, help="denoiser training steps per variant (the demo's)")
  p.add_argument("--eval-players", type=_players, default=(1, 8))
  p.add_argument("--train-players", type=_players, default=(2, 7),
                 help="player count range of the training episodes (the paper's protocol: 2-7)")
  p.add_argument("--episodes-per-count", type=int, default=6)
  p.add_argument("--eval-episodes", type=int, default=24,
                 help="Melting Pot: episodes of the test split, and of the held-out substrates, per variant")
  p.add_argument("--eval-steps", type=int, default=8)
  p.add_argument("--denoise-steps", type=int, default=10)
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
  from ap_jax import demo

  demo.run_comparison(args.out, episodes=args.episodes, ae_steps=args.ae_steps, dit_steps=args.dit_steps,
                      variants=[v for v in args.variants.split(",") if v] or None, eval_players=args.eval_players,
                      train_players=args.train_players, episodes_per_count=args.episodes_per_count,
                      eval_steps=args.eval_steps, denoise_steps=args.denoise_steps, config=args.config,
                      eval_episodes=args.eval_episodes, progress=not args.no_progress)
  return 0


# ------------------------------------------------------------------------------------------------ sample


def _mesh_spec(text: str) -> str:
  """argparse type of --mesh: the text, once `mesh.parse_mesh_spec` accepts it."""
  from ap_jax.train import mesh as mesh_lib

  try:
    mesh_lib.parse_mesh_spec(text)
  except mesh_lib.MeshError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return text


def _add_sampler_flags(p, workdir_required: bool = True):
  p.add_argument("--workdir", required=workdir_required,
                 help="denoiser workdir (`ap-jax train`); its config names the data")
  p.add_argument("--sampler", choices=("euler", "heun"), default="euler", help="ODE sampler per chunk")
  p.add_argument("--denoise-steps", type=int, default=20, help="sampler steps per chunk")
  p.add_argument("--chunk", type=int, default=None,
                 help="frames generated per chunk; default: the training layout (clip_steps frames, or 1 for a "
                      "model trained with independent frame times)")
  p.add_argument("--window", type=int, default=None,
                 help="most frames the model attends over (cache + chunk); default: the training clip length")
  p.add_argument("--context-noise", type=float, default=None,
                 help="flow time of generated frames as context (0 = clean; default: the training config's "
                      "sampling.context_noise)")
  p.add_argument("--guidance", type=float, default=1.0,
                 help="classifier-free guidance scale on actions (1 = off; needs flow.action_dropout > 0)")
  p.add_argument("--no-reencode", dest="reencode", action="store_false",
                 help="append each chunk to the KV cache and trim it, instead of re-encoding the kept frames as a "
                      "fresh clip start (the default, exactly the training layout)")
  p.add_argument("--snap-px", type=float, default=None,
                 help="snap fed-back coordinates to the centres of cells of this many pixels (0 = off; default: "
                      "the sampling.snap_px of the training config)")
  p.add_argument("--seed", type=int, default=0, help="sampling noise seed")
  p.add_argument("--mesh", type=_mesh_spec, default=None,
                 help="sample on a device mesh, e.g. data=8 or data=2,tensor=4 (default: one device)")


def _load_for_sampling(args):
  """(TrainedModel, sampler keyword arguments) from the common flags."""
  from ap_jax.train import mesh as mesh_lib, restore

  mesh = mesh_lib.mesh_from_spec(args.mesh) if args.mesh else None
  trained = restore.load_trained(args.workdir, mesh)
  kwargs = dict(sampler=args.sampler, denoise_steps=args.denoise_steps, chunk=args.chunk, guidance=args.guidance,
                context_noise=args.context_noise, reencode=args.reencode)
  if args.snap_px is not None:
    kwargs["snap_px"] = args.snap_px
  if args.window is not None:
    kwargs["window"] = args.window
  if mesh is not None:
    kwargs.update(mesh=mesh, rules=mesh_lib.rules_from_config(trained.config))
  return trained, kwargs


def add_sample(sub):
  p = sub.add_parser("sample", help="generate a rollout video from a dataset episode or an action file",
                     description="Generate --steps frames autoregressively (KV cache, sliding window, predicted "
                     "coordinates fed back) from a dataset episode's first frame (--episode SPLIT:K, the training "
                     "config's dataset) or from the true game's reset for an action file's seed (--actions). "
                     "Writes the video (generated beside the true game, predicted positions, actions, a green/red "
                     "mark per player for whether the action was carried out) and a JSON file beside it.")
  _add_sampler_flags(p)
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--episode", help="SPLIT:K, episode K of a split of the training dataset (e.g. test:0)")
  what.add_argument("--actions", help="JSON action file (format: ap_jax/eval/action_files.py) with a seed")
  p.add_argument("--steps", type=int, default=None, help="steps to generate (default: all the actions)")
  p.add_argument("--out", required=True, help="output .mp4 or .gif; the JSON goes beside it")
  p.add_argument("--scale", type=int, default=4, help="pixel upscaling for viewing")
  p.add_argument("--fps", type=float, default=4.0)
  p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
  from ap_jax import sample as sample_lib
  from ap_jax import viz
  from ap_jax.eval import action_files, metrics, render, report
  from ap_jax.eval import cases as cases_lib
  from ap_jax.eval import run as run_lib

  if os.path.splitext(args.out)[1].lower() not in (".mp4", ".gif"):
    raise ValueError(f"--out {args.out!r}: expected a path ending in .mp4 or .gif")
  if args.actions:
    action_files.load_action_file(args.actions)  # a bad file fails before the model loads
  trained, kwargs = _load_for_sampling(args)
  if args.episode:
    split, sep, index = args.episode.rpartition(":")
    if not sep or not split or not index.isdigit():
      raise ValueError(f"--episode {args.episode!r}: expected SPLIT:K, e.g. test:0")
    case = cases_lib.dataset_cases(trained.config, split, [int(index)], args.steps)[0]
  else:
    case = cases_lib.case_from_action_file(trained.config, args.actions, args.steps)
  sampler = sample_lib.Sampler.from_trained(trained, **kwargs)
  frames, positions, timing = run_lib.run_cases(sampler, [case], seed=args.seed, batch_size=1)
  video, records = render.render(case, frames[0], positions[0], scale=args.scale)
  viz.write_video(video, args.out, fps=args.fps)
  summary = None
  if case.truth is not None and case.truth.get("source") == "builtin":
    summary = metrics.aggregate([metrics.score_rollout(frames[0], case.truth, pred_positions=positions[0])])
    summary = {k: summary[k] for k in metrics.METRICS if k in summary}
  json_path = os.path.splitext(args.out)[0] + ".json"
  report.write_json(dict(
      workdir=os.path.abspath(args.workdir), model_step=trained.step, case=case.name, seed_of_episode=case.seed,
      **case.info, players=case.num_players, colors=case.colors, video=os.path.abspath(args.out),
      sampling=run_lib.sampler_settings(sampler, args.seed), metrics=summary,
      timing=timing, steps=records),
      json_path)
  fps = timing.get("steady_frames_per_s")
  print(f"wrote {args.out} and {json_path}: {case.name}, {case.num_players} players, {case.actions.shape[0]} steps "
        f"in {timing['seconds_sampling']:.1f}s" + (f" ({fps:.1f} frames/s after compilation)" if fps else "")
        + ("" if summary is None else f"; movement accuracy {summary['movement_accuracy']:.3f}, subject "
           f"preservation {summary['subject_preservation']:.3f}"))
  return 0


# ------------------------------------------------------------------------------------------------ eval


def add_eval(sub):
  p = sub.add_parser("eval", help="score a trained model against the true game on held-out episodes",
                     description="Generate rollouts for held-out episodes (a split of the training dataset, or with "
                     "--players fresh built-in episodes of each player count from held-out seeds), replay the same "
                     "actions in the true game, and score movement accuracy, subject preservation, tracking error, "
                     "PSNR and SSIM, broken down by substrate, player count and step. Writes --out and prints a "
                     "table. With --oracle, score a dataset's own true frames instead (the metrics' ceiling).")
  _add_sampler_flags(p, workdir_required=False)
  p.add_argument("--oracle", action="store_true",
                 help="score the true frames of --data's episodes as if generated (no model): the ceiling of the "
                      "metric pipeline, with the detectors' accuracy per substrate")
  p.add_argument("--data", default=None,
                 help="dataset directory (`ap-jax data`) whose --split to score, instead of the training config's "
                      "(e.g. Melting Pot substrates held out of training; frames of the model's size); needed with "
                      "--oracle")
  p.add_argument("--autoencoder", default=None,
                 help="with --oracle: score a trained autoencoder's reconstructions of the true frames (its workdir): "
                      "the ceiling of any denoiser that renders through it")
  p.add_argument("--heldout", action="store_true",
                 help="score the Melting Pot substrates the config holds out of training (data.heldout_substrates; "
                      "their dataset is generated into the cache on first use) instead of the training ones")
  p.add_argument("--split", default="test", help="dataset split (ignored with --players)")
  p.add_argument("--episodes", type=int, default=16,
                 help="episodes from the split, or per player count with --players")
  p.add_argument("--steps", type=int, default=None,
                 help="steps per rollout (default: the episodes' length; with --players, data.steps)")
  p.add_argument("--players", type=_players, default=None,
                 help="MIN-MAX: fresh episodes with each of these player counts instead of the split (the "
                      "built-in game, or the Melting Pot substrates the model was trained on)")
  p.add_argument("--batch-size", type=int, default=8, help="rollouts generated together")
  p.add_argument("--out", required=True, help="results JSON")
  p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
  from ap_jax.data import locate
  from ap_jax.eval import cases as cases_lib
  from ap_jax.eval import report
  from ap_jax.eval import run as run_lib

  if args.episodes < 1:
    raise ValueError(f"--episodes {args.episodes}, expected at least 1")
  start = time.time()
  if args.oracle:
    if not args.data:
      raise ValueError("--oracle scores a dataset's true frames: give the dataset with --data DIR")
    if args.players is not None:
      raise ValueError("--oracle reads --data's episodes; --players (fresh built-in episodes) does not apply")
    reconstruct = run_lib.autoencoder_reconstructor(args.autoencoder) if args.autoencoder else None
    cases = cases_lib.dataset_dir_cases(args.data, args.split, range(args.episodes), args.steps)
    results = run_lib.oracle(cases, reconstruct)
    results["data"] = os.path.abspath(args.data)
    results["autoencoder"] = os.path.abspath(args.autoencoder) if args.autoencoder else None
  else:
    if not args.workdir:
      raise ValueError("eval needs --workdir (a trained denoiser), or --oracle --data DIR to score true frames")
    if args.autoencoder:
      raise ValueError("--autoencoder goes with --oracle (a denoiser workdir names its own autoencoder)")
    trained, kwargs = _load_for_sampling(args)
    chosen = [flag for flag, on in (("--players", args.players is not None), ("--data", bool(args.data)),
                                    ("--heldout", args.heldout)) if on]
    if len(chosen) > 1:
      raise ValueError(f"{' and '.join(chosen)} each choose the episodes to score: give one of them")
    if args.heldout:
      args.data = locate.resolve_dataset(trained.config.data, heldout=True)
    if args.data:
      cases = cases_lib.dataset_dir_cases(args.data, args.split, range(args.episodes), args.steps)
      cases_lib.check_frame_size(trained.config, cases)
    elif args.players is not None:
      steps = args.steps if args.steps is not None else int(trained.config.data.steps)
      cases = cases_lib.fresh_cases(trained.config, args.players, args.episodes, steps)
    else:
      cases = cases_lib.dataset_cases(trained.config, args.split, range(args.episodes), args.steps)
    run_lib.check_scorable(cases)
    results = run_lib.evaluate(trained, cases, seed=args.seed, batch_size=args.batch_size, **kwargs)
    results["workdir"] = os.path.abspath(args.workdir)
    results["data"] = os.path.abspath(args.data) if args.data else None
    results["heldout"] = bool(args.heldout)
  results["timing"]["seconds_total"] = time.time() - start
  results["split"] = None if args.players is not None else args.split
  results["players"] = None if args.players is None else list(args.players)
  report.write_json(results, args.out)
  print(report.markdown_table(results))
  print(f"wrote {args.out}: {len(cases)} episodes in {results['timing']['seconds_total']:.1f}s")
  return 0


# ------------------------------------------------------------------------------------------------ aot


def add_aot(sub):
  p = sub.add_parser("aot", help="compile a config's training and sampling steps for a TPU slice, on this machine",
                     description="Build the config's real training step (and, for a denoiser, one sampling "
                     "evaluation) with abstract inputs for a TPU pod slice described by libtpu, compile it with "
                     "XLA's TPU compiler on this host, and print per-device memory (arguments, outputs, "
                     "temporaries) against the chip's HBM, FLOPs per step and the roofline bound on step time and "
                     "MFU. Needs libtpu (the tpu extra). Exits 1 when the step does not fit. Extra "
                     "--config.KEY=VALUE arguments override config keys (the mesh: --config.mesh.fsdp=-1 ...).")
  p.add_argument("--config", required=True, help="config name or file, optionally with arguments: base[:ARGS]")
  p.add_argument("--topology", required=True,
                 help="Cloud TPU slice (v5p-8, v5p-64, v5e-16, v6e-256) or GENERATION:SHAPE (v5p:2x4x4)")
  p.add_argument("--num-slices", type=int, default=1,
                 help="slices over the data-center network; set the mesh's dcn_* sizes to match")
  p.add_argument("--sample-batch", type=int, default=None,
                 help="rollouts per sampling evaluation (default: one per batch shard)")
  p.add_argument("--denoise-steps", type=int, default=10, help="ODE steps per generated frame, for frames/s")
  p.add_argument("--no-sample", action="store_true", help="compile the training step only")
  p.add_argument("--no-train", action="store_true",
                 help="compile the sampling step only (an inference slice; with --sample-batch)")
  p.add_argument("--unroll-costs", action="store_true",
                 help="count a scanned block stack's FLOPs and bytes from the step unrolled at depths 1 and 2 (XLA "
                      "counts a loop body once; two more compiles)")
  p.add_argument("--json", default=None, help="write the report here")
  p.set_defaults(func=cmd_aot, accepts_config_overrides=True)


def cmd_aot(args) -> int:
  from ap_jax import aot
  from ap_jax.eval import report as report_lib
  from ap_jax.train import config_utils

  config = config_utils.apply_overrides(config_utils.load_config(args.config), args.overrides)
  topology = aot.parse_topology(args.topology, args.num_slices)
  report = aot.run_aot(config, topology, sample=not args.no_sample, train=not args.no_train,
                       sample_batch=args.sample_batch,
                       denoise_steps=args.denoise_steps, unroll_costs=args.unroll_costs)
  report["config"] = args.config
  report["overrides"] = list(args.overrides)
  print(aot.format_report(report))
  if args.json:
    report_lib.write_json(report, args.json)
    print(f"wrote {args.json}")
  fits = [report[k]["fits"] for k in ("train", "sample") if k in report]
  return 0 if all(f is not False for f in fits) else 1


# ------------------------------------------------------------------------------------------------ main

# ------------------------------------------------------------------------------------------------ bench


def add_bench(sub):
  p = sub.add_parser("bench", help="benchmarks: training step, input pipeline, sampling (tables + JSON)",
                     description="Measure on this machine what a training step, the input pipeline and sampling "
                     "cost (ap_jax/bench.py says what each reports). Prints tables; --json writes every row.")
  p.add_argument("what", choices=("step", "data", "sampling", "peer", "attention", "scaling", "profile", "all"))
  p.add_argument("--config", default="tiny", help="peer, profile, scaling: the config measured (peer: the shape "
                 "both models take)")
  p.add_argument("--configs", default="tiny,small", help="step: comma-separated config names or files")
  p.add_argument("--sampling-config", default="tiny", help="sampling: the config whose model is timed")
  p.add_argument("--meshes", default=None,
                 help="sampling: semicolon-separated meshes to run each setting on, e.g. 'data=8;data=4,tensor=2' "
                      "(an empty item: one device); with --batches, the sharded inference sweep")
  p.add_argument("--batches", default=None, help="sampling: comma-separated rollout batches (with --players, "
                 "--denoise-steps) instead of the default one-at-a-time sweep")
  p.add_argument("--players", type=int, default=7, help="sampling with --batches: players per rollout")
  p.add_argument("--denoise-steps", type=int, default=10, help="sampling with --batches: ODE steps per frame")
  p.add_argument("--batch", type=int, default=16, help="data: batch size (the step is timed at this batch too)")
  p.add_argument("--workers", default="0,1,2,4", help="data: Grain worker process counts")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="fewer repeats and batches (a smoke run)")
  p.add_argument("--trace-dir", default=None,
                 help="profile: keep the JAX profiler trace here (open it in TensorBoard or Perfetto)")
  p.add_argument("--top", type=int, default=20, help="profile: rows of the kinds-of-op table")
  p.add_argument("--json", default=None, help="write the results here")
  p.set_defaults(func=cmd_bench, accepts_config_overrides=True)


def cmd_bench(args) -> int:
  from ap_jax import bench
  from ap_jax.eval import report as report_lib

  repeats = 2 if args.quick else args.repeats
  result: dict = dict(machine=bench.machine())
  print(f"machine: {json.dumps(result['machine'])}")
  step_rows = []
  if args.what in ("step", "all", "data"):
    configs = [c for c in args.configs.split(",") if c] if args.what != "data" else ["tiny"]
    for name in configs:
      overrides = list(args.overrides) + ([f"--config.data.global_batch_size={args.batch}"]
                                          if args.what == "data" else [])
      step_rows.append(bench.step_benchmark(name, overrides, repeats=repeats, inner=2 if args.quick else 5))
    result["step"] = step_rows
    print("\ntraining step (denoiser)\n" + bench.step_table(step_rows))
  if args.what in ("data", "all"):
    tiny = next((r for r in step_rows if r["config"] == "tiny" and r["batch"] == args.batch), None)
    result["data"] = bench.data_benchmark(batch=args.batch, workers=[int(w) for w in args.workers.split(",")],
                                          batches=10 if args.quick else 40, episodes=60 if args.quick else 300,
                                          game_episodes=16 if args.quick else 256,
                                          step_s=tiny["step_s"] if tiny else None)
    print("\ninput pipeline (clips/s; headroom: pipeline rate over the tiny step's consumption at this batch)\n"
          + bench.data_table(result["data"]))
  if args.what in ("sampling", "all"):
    meshes = args.meshes.split(";") if args.meshes is not None else [None]
    grid = None
    if args.batches:
      grid = [dict(players=args.players, denoise_steps=args.denoise_steps, batch=int(b), use_cache=True)
              for b in args.batches.split(",")]
    result["sampling"] = bench.sampling_benchmark(args.sampling_config, args.overrides, grid=grid,
                                                  steps=4 if args.quick else 8, repeats=1 if args.quick else 3,
                                                  meshes=meshes)
    print("\nsampling (random weights)\n" + bench.sampling_table(result["sampling"]))
  if args.what in ("scaling", "all"):
    result["scaling"] = bench.scaling_benchmark(args.config, repeats=2 if args.quick else 3,
                                                inner=1 if args.quick else 2)
    print("\nscaling (training step)\n" + bench.scaling_table(result["scaling"]))
  if args.what == "profile":  # not in "all": it attributes time, it measures no speed of its own
    result["profile"] = bench.profile_benchmark(args.config, args.overrides, steps=2 if args.quick else 5,
                                                trace_dir=args.trace_dir, top=args.top)
    print("\nwhere the training step's time goes (XLA op times from the profiler trace)\n"
          + bench.profile_table(result["profile"]))
  if args.what == "attention":  # not in "all": it says something only on a GPU
    result["attention"] = bench.attention_benchmark()
    print("\nattention, XLA against cuDNN\n" + json.dumps(result["attention"], indent=1))
  if args.what in ("peer", "all"):
    result["peer"] = bench.peer_benchmark(args.config, args.overrides, repeats=repeats,
                                          inner=1 if args.quick else 3)
    result["speedup_vs_peer"] = result["peer"]["speedup_vs_peer"]
    print("\nagainst the peer (forward, loss, backward, AdamW)\n" + bench.peer_table(result["peer"]))
  if args.json:
    report_lib.write_json(result, args.json)
    print(f"\nwrote {args.json}")
  return 0


COMMANDS = [add_data, add_show, add_train, add_sample, add_eval, add_demo, add_compare, add_bench, add_aot]


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="ap-jax", description="ap_jax: ActionParty in JAX, a video world model that controls many players "
      "at once. Subcommands generate data, inspect it, train, sample and evaluate.")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for add in COMMANDS:
    add(sub)
  return parser


class _Terminated(BaseException):
  """SIGTERM outside a training loop (which saves and stops on its own)."""


def _raise_terminated(signum, frame):
  del signum, frame
  raise _Terminated()


def _absl_flags_parsed() -> None:
  """Grain reads absl flags (in its worker processes, for example), which are parsed only by absl.app programs:
  ap-jax parses its own command line, so absl's flags keep their defaults and are marked as parsed."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args, unknown = parser.parse_known_args(argv)
  overrides = [u for u in unknown if u.startswith("--config.")]
  rest = [u for u in unknown if not u.startswith("--config.")]
  if rest or (overrides and not getattr(args, "accepts_config_overrides", False)):
    parser.error(f"unrecognized arguments: {' '.join(rest or overrides)}")
  args.overrides = overrides
  _absl_flags_parsed()
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  # SIGTERM outside training stops with a message (training replaces the handler with a save-then-stop flag).
  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
  try:
    return int(args.func(args) or 0)
  except (KeyboardInterrupt, _Terminated) as e:
    name = "SIGTERM" if isinstance(e, _Terminated) else "SIGINT"
    print(f"ap-jax {args.command}: stopped by {name} (outside training: nothing to save; datasets and "
          "checkpoints are written atomically, so the same command starts again cleanly)", file=sys.stderr)
    return 128 + (signal.SIGTERM if name == "SIGTERM" else signal.SIGINT)
  except Exception as e:
    from ap_jax.train import checkpoint as _checkpoint
    from ap_jax.train import errors as _errors

    if isinstance(e, _errors.Stopped):
      print(f"ap-jax {args.command}: {e}", file=sys.stderr)
      return 128 + int(getattr(signal, e.signal_name, signal.SIGTERM))
    if not isinstance(e, (ValueError, FileExistsError, FileNotFoundError, _errors.TrainError,
                          _checkpoint.CheckpointError)):
      raise

    print(f"ap-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
  sys.exit(main())
