#!/usr/bin/env python3
"""Local multi-process launcher: N processes of one `ap-jax` command on this machine, each with its own CPU
devices, joined by `jax.distributed` as the hosts of a pod would be. It tests multi-host code paths (per-host data
shards, process 0 writing, agreement on stopping, checkpoints restored on every process) without a pod.

  python launch/multiprocess.py --processes 2 --devices-per-process 4 -- \\
      ap-jax train --config tiny:runlocal --workdir runs/mp2

Each process gets `JAX_PLATFORMS=cpu`, `XLA_FLAGS=--xla_force_host_platform_device_count=D` and
`AP_JAX_COORDINATOR` / `AP_JAX_NUM_PROCESSES` / `AP_JAX_PROCESS_ID` (read by `ap_jax.train.distributed`, the same
settings as `ap-jax train --coordinator --num-processes --process-id`). Output lines are prefixed with `[pN]`.
SIGINT and SIGTERM are passed on to every process (the trainer saves and stops); the launcher exits with the first
non-zero exit code, or 0. `--dry-run` prints each process's environment and command and starts nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_envs(processes: int, devices_per_process: int, port: int) -> list[dict[str, str]]:
  """The variables each process gets on top of this one's environment."""
  return [{"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "AP_JAX_COORDINATOR": f"127.0.0.1:{port}", "AP_JAX_NUM_PROCESSES": str(processes),
           "AP_JAX_PROCESS_ID": str(i)} for i in range(processes)]


def _pump(stream, prefix: str) -> None:
  for line in iter(stream.readline, ""):
    sys.stdout.write(f"{prefix} {line}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   usage="%(prog)s [--processes N] [--devices-per-process D] [--port P] "
                                   "[--dry-run] -- COMMAND ...")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=4)
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--dry-run", action="store_true", help="print each process's environment and command")
  args = parser.parse_args(own)
  if not command:
    parser.error("no command: put it after `--`, e.g. -- ap-jax train --config tiny:runlocal --workdir runs/mp")
  if args.processes < 1:
    parser.error(f"--processes {args.processes}: expected at least 1")
  if args.devices_per_process < 1:
    parser.error(f"--devices-per-process {args.devices_per_process}: expected at least 1")
  port = args.port or free_port()
  envs = process_envs(args.processes, args.devices_per_process, port)
  if args.dry_run:
    for i, env in enumerate(envs):
      print(f"[p{i}] " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(command))
    return 0
  procs = [subprocess.Popen(command, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1) for env in envs]
  pumps = [threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]"), daemon=True) for i, p in enumerate(procs)]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGINT, forward)
  signal.signal(signal.SIGTERM, forward)
  codes = [p.wait() for p in procs]
  for t in pumps:
    t.join(timeout=5)
  failed = [(i, c) for i, c in enumerate(codes) if c != 0]
  for i, c in failed:
    print(f"[multiprocess] process {i} exited with {c}", file=sys.stderr)
  return failed[0][1] if failed else 0


if __name__ == "__main__":
  sys.exit(main())
