"""`ap-jax sample` (one rollout as a video) and `ap-jax eval` (rollouts scored against the true game), and the
sampler flags they share."""

from __future__ import annotations

import argparse
import os
import time

from ap_jax import fs
from ap_jax.cli import args as args_lib


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
      workdir=fs.absolute(args.workdir), model_step=trained.step, case=case.name, seed_of_episode=case.seed,
      **case.info, players=case.num_players, colors=case.colors, video=fs.absolute(args.out),
      sampling=run_lib.sampler_settings(sampler, args.seed), metrics=summary,
      timing=timing, steps=records),
      json_path)
  fps = timing.get("steady_frames_per_s")
  print(f"wrote {args.out} and {json_path}: {case.name}, {case.num_players} players, {case.actions.shape[0]} steps "
        f"in {timing['seconds_sampling']:.1f}s" + (f" ({fps:.1f} frames/s after compilation)" if fps else "")
        + ("" if summary is None else f"; movement accuracy {summary['movement_accuracy']:.3f}, subject "
           f"preservation {summary['subject_preservation']:.3f}"))
  return 0


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
  p.add_argument("--players", type=args_lib.players, default=None,
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
    results["data"] = fs.absolute(args.data)
    results["autoencoder"] = fs.absolute(args.autoencoder) if args.autoencoder else None
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
    results["workdir"] = fs.absolute(args.workdir)
    results["data"] = fs.absolute(args.data) if args.data else None
    results["heldout"] = bool(args.heldout)
  results["timing"]["seconds_total"] = time.time() - start
  results["split"] = None if args.players is not None else args.split
  results["players"] = None if args.players is None else list(args.players)
  report.write_json(results, args.out)
  print(report.markdown_table(results))
  print(f"wrote {args.out}: {len(cases)} episodes in {results['timing']['seconds_total']:.1f}s")
  return 0
