#!/usr/bin/env python3
"""Cloud TPU VMs with gcloud: create a slice (directly or as a queued resource), install ap_jax on every host, run
`ap-jax train` (or any ap-jax command) on all hosts at once, follow its log, stop it, delete the slice.

  python launch/tpu_vm.py create  --name ap --zone us-east5-a --accelerator v5p-64 [--queued] [--spot]
  python launch/tpu_vm.py install --name ap --zone us-east5-a
  python launch/tpu_vm.py train   --name ap --zone us-east5-a --config base --workdir gs://BUCKET/runs/base \\
      [--data-dir gs://BUCKET/data/builtin] [-- --config.total_steps=100000 ...]
  python launch/tpu_vm.py mount   --name ap --zone us-east5-a --bucket BUCKET     # optional: at /mnt/gcs
  python launch/tpu_vm.py logs    --name ap --zone us-east5-a          # worker 0's log, followed
  python launch/tpu_vm.py stop    --name ap --zone us-east5-a          # SIGTERM: every host saves and exits
  python launch/tpu_vm.py delete  --name ap --zone us-east5-a [--queued]
  python launch/tpu_vm.py run     --name ap --zone us-east5-a -- ap-jax bench sampling --sampling-config base

Every subcommand takes `--dry-run`: it prints the exact commands, one per line, and runs nothing. `--project P`
goes to every gcloud call.

Multi-host: the same command runs on every worker (`--worker=all`); JAX finds the other hosts from the TPU VM's
metadata, so no coordinator flags are passed. Each host reads its own shard of the data (Grain, per process),
process 0 writes logs and checkpoints; `--workdir` and `--data-dir` must be paths every host sees: `gs://` URLs,
which ap_jax reads and writes directly (Orbax checkpoints, ArrayRecord reads, metrics and TensorBoard files through
etils.epath; the TPU VM's service account needs read and write on the bucket), or a shared filesystem such as the
bucket mounted at /mnt/gcs by Cloud Storage FUSE (`mount`). TensorBoard reads `WORKDIR/tensorboard`
(`tensorboard --logdir gs://BUCKET/runs` works from any machine with credentials).

Preemption (spot or queued capacity taken back): the TPU runtime sends SIGTERM; `ap-jax train` finishes its step,
saves a checkpoint with the data iterator and exits. Re-create the slice, `install`, and run the same `train`
command: it resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REMOTE_DIR = "~/ap_jax"
LOG = "~/ap_jax_logs/train.log"
MOUNT = "/mnt/gcs"
# TPU VM software versions per generation (Cloud TPU docs, "TPU software versions").
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}


def runtime_for(accelerator: str) -> str:
  generation = accelerator.split("-")[0]
  if generation not in RUNTIMES:
    raise SystemExit(f"accelerator {accelerator!r}: expected a Cloud TPU type such as v5p-64, v5litepod-16 or "
                     f"v6e-64 (generations {sorted(RUNTIMES)}), or pass --runtime")
  return RUNTIMES[generation]


def _gcloud(args, *rest: str) -> list[str]:
  project = ["--project", args.project] if args.project else []
  return ["gcloud", "compute", "tpus", *rest, "--zone", args.zone, *project]


def _ssh(args, command: str, worker: str = "all") -> list[str]:
  return _gcloud(args, "tpu-vm", "ssh", args.name) + [f"--worker={worker}", "--command", command]


def train_command(config: str, workdir: str, data_dir: str | None, overrides: list[str]) -> list[str]:
  """The ap-jax command every host runs."""
  data = ["--config.data.source=dir", f"--config.data.dir={data_dir}"] if data_dir else []
  return ["ap-jax", "train", "--config", config, "--workdir", workdir, "--no-progress", *data, *overrides]


def background(command: list[str]) -> str:
  """`command` started detached in the checkout's venv on a host, its output in LOG (ssh returns at once)."""
  return (f"cd {REMOTE_DIR} && . .venv/bin/activate && mkdir -p ~/ap_jax_logs && "
          f"nohup {shlex.join(command)} > {LOG} 2>&1 < /dev/null &")


def plan(args, tarball: str) -> list[list[str]]:
  """The commands a subcommand runs, in order."""
  what = args.what
  if what == "create":
    runtime = args.runtime or runtime_for(args.accelerator)
    if args.queued:
      cmd = _gcloud(args, "queued-resources", "create", args.name) + [
          "--node-id", args.name, "--accelerator-type", args.accelerator, "--runtime-version", runtime]
    else:
      cmd = _gcloud(args, "tpu-vm", "create", args.name) + [
          "--accelerator-type", args.accelerator, "--version", runtime]
    return [cmd + (["--spot"] if args.spot else [])]
  if what == "install":
    setup = (f"mkdir -p {REMOTE_DIR} && tar -xzf /tmp/ap_jax_src.tgz -C {REMOTE_DIR} && cd {REMOTE_DIR} && "
             "(test -x .venv/bin/python || python3 -m venv .venv) && . .venv/bin/activate && "
             "pip install -q -U pip && pip install -q -e '.[tpu,gcs]'")
    return [["tar", "-czf", tarball, "--exclude=.venv", "--exclude=.git", "--exclude=out", "--exclude=runs",
             "-C", str(ROOT), "."],
            _gcloud(args, "tpu-vm", "scp", tarball, f"{args.name}:/tmp/ap_jax_src.tgz") + ["--worker=all"],
            _ssh(args, setup)]
  if what == "mount":  # Cloud Storage FUSE from Google's apt repository, the bucket at MOUNT on every host
    mount = ("command -v gcsfuse >/dev/null || { "
             "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | "
             "sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null && "
             "echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt "
             "gcsfuse-$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
             "sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; } && "
             f"sudo mkdir -p {MOUNT} && sudo chown $USER {MOUNT} && "
             f"(mountpoint -q {MOUNT} || gcsfuse --implicit-dirs {shlex.quote(args.bucket)} {MOUNT})")
    return [_ssh(args, mount)]
  if what == "train":
    return [_ssh(args, background(train_command(args.config, args.workdir, args.data_dir, args.command)))]
  if what == "run":
    if not args.command:
      raise SystemExit("run: put the command after `--`, e.g. -- ap-jax bench sampling")
    return [_ssh(args, background(args.command))]
  if what == "logs":
    return [_ssh(args, f"tail -n 200 -F {LOG}", worker="0")]
  if what == "stop":  # the trainer saves on SIGTERM and exits
    return [_ssh(args, "pkill -TERM -f 'ap-jax' || true")]
  if what == "delete":
    if args.queued:
      return [_gcloud(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"]]
    return [_gcloud(args, "tpu-vm", "delete", args.name) + ["--quiet"]]
  raise SystemExit(f"unknown subcommand {what!r}")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("what", choices=("create", "install", "mount", "train", "run", "logs", "stop", "delete"))
  parser.add_argument("--name", required=True, help="the TPU VM (and queued resource) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--accelerator", default="v5p-64", help="create: Cloud TPU type (v5p-64, v6e-64, ...)")
  parser.add_argument("--runtime", default=None, help="create: TPU software version (default: per generation)")
  parser.add_argument("--queued", action="store_true", help="create/delete: through a queued resource")
  parser.add_argument("--spot", action="store_true", help="create: spot capacity (preemptible)")
  parser.add_argument("--bucket", default=None, help=f"mount: the GCS bucket to mount at {MOUNT} on every host")
  parser.add_argument("--config", default="base", help="train: config name or file")
  parser.add_argument("--workdir", default=None, help="train: a path every host sees (gs://BUCKET/runs/NAME)")
  parser.add_argument("--data-dir", default=None, help="train: a stored dataset (gs://BUCKET/data/NAME); default: "
                      "the config's")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  args = parser.parse_args(own)
  args.command = rest
  if args.what == "mount" and not args.bucket:
    parser.error("mount needs --bucket BUCKET")
  if args.what == "train":
    if not args.workdir:
      parser.error("train needs --workdir (gs://BUCKET/runs/NAME, or a path on a filesystem every host mounts)")
    bad = [o for o in rest if not o.startswith("--config.")]
    if bad:
      parser.error(f"train: after `--` only --config.KEY=VALUE overrides, got {bad}")
  with tempfile.TemporaryDirectory() as tmp:
    commands = plan(args, str(Path(tmp) / "ap_jax_src.tgz"))
    for cmd in commands:
      print(shlex.join(cmd), flush=True)
      if not args.dry_run:
        code = subprocess.call(cmd)
        if code:
          print(f"[tpu_vm] failed with exit code {code}: {shlex.join(cmd)}", file=sys.stderr)
          return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
