#!/usr/bin/env bash
# TPU VM launcher: runs one ap-jax command on every host of a TPU VM slice with gcloud, after installing ap_jax
# from this checkout on each host. JAX finds the other hosts by itself on TPU VMs (no coordinator flags).
#
#   launch/tpu_vm.sh NAME ZONE [--project P] -- ap-jax train --config configs/base.py --workdir gs://B/runs/base
#
# Steps: copy the working tree to every worker (gcloud compute tpus tpu-vm scp --worker=all), create a venv
# there and `pip install -e .` with jax[tpu], then run the command on all workers at once. Checkpoints and data
# belong on a bucket (gs://...) or a shared disk so that every host sees the same workdir. Preemption: TPU VMs
# send SIGTERM; `ap-jax train` finishes the step, saves and exits, and the same command resumes it.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '2,12p' "$0"; exit 2
fi
NAME="$1"; ZONE="$2"; shift 2
PROJECT_ARGS=()
if [[ "${1:-}" == "--project" ]]; then PROJECT_ARGS=(--project "$2"); shift 2; fi
[[ "${1:-}" == "--" ]] && shift
CMD="$*"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR='~/ap_jax'
TPU=(gcloud compute tpus tpu-vm "${PROJECT_ARGS[@]}")

echo "[tpu_vm] copying $ROOT to $NAME:$REMOTE_DIR on all workers"
tar --exclude=.venv --exclude=.git --exclude=runs --exclude=out -czf /tmp/ap_jax_src.tgz -C "$ROOT" .
"${TPU[@]}" scp /tmp/ap_jax_src.tgz "$NAME":/tmp/ap_jax_src.tgz --zone "$ZONE" --worker=all
SETUP="mkdir -p $REMOTE_DIR && tar -xzf /tmp/ap_jax_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && \
  (test -x .venv/bin/python || python3 -m venv .venv) && . .venv/bin/activate && \
  pip install -q -U pip && pip install -q -e . 'jax[tpu]'"
echo "[tpu_vm] installing on all workers"
"${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command "$SETUP"
echo "[tpu_vm] running on all workers: $CMD"
"${TPU[@]}" ssh "$NAME" --zone "$ZONE" --worker=all --command "cd $REMOTE_DIR && . .venv/bin/activate && $CMD"
