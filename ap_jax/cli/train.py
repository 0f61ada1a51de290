"""`ap-jax train` (one stage), `ap-jax demo` (the main job) and `ap-jax compare` (the variants, trained and
scored)."""

from __future__ import annotations

import json

from ap_jax import fs
from ap_jax.cli import args as args_lib


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
    fs.write_atomic(fs.join(args.workdir, "summary.json"), json.dumps(summary, indent=2, default=str))
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
  p.add_argument("--eval-players", type=args_lib.players, default=(1, 8))
  p.add_argument("--train-players", type=args_lib.players, default=(2, 7),
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
