"""The `ap-jax` command line (also `python -m ap_jax`): the parser, logging, signals and clean errors.

Each subcommand is a function `cmd_<name>(args)` with an `add_<name>(subparsers)` that declares its flags, one
module per group: `data` (data, show), `train` (train, demo, compare), `rollouts` (sample, eval), `perf` (bench,
aot). The command modules import only the standard library at the top; each command imports jax and the rest of
ap_jax when it runs, so `ap-jax --help` is fast and the signal handlers are in place before anything heavy loads.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ap_jax.cli.data import add_data, add_show
from ap_jax.cli.perf import add_aot, add_bench
from ap_jax.cli.rollouts import add_eval, add_sample
from ap_jax.cli.train import add_compare, add_demo, add_train

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
