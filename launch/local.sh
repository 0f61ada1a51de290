#!/usr/bin/env bash
# Local launcher: sets up a virtual environment in .venv (on a fresh machine with only Python 3.11+) and runs
# one of the project's jobs in it.
#
#   bash launch/local.sh demo [ARGS]   install, then `ap-jax demo` (the main job on the built-in game)
#   bash launch/local.sh test [ARGS]   install with the dev, meltingpot, bench and tpu extras, then the test suite
#   bash launch/local.sh test-beam     in .venv-beam, with the beam extra: the Beam generation test (CI runs it)
#   bash launch/local.sh setup         install only (the base package and the dev extra)
#   bash launch/local.sh ap-jax ARGS   install, then any ap-jax command
#
# Environment: PYTHON (interpreter that creates the venv, default python3), VENV (default .venv),
# AP_JAX_SKIP_MELTINGPOT=1 to test without Melting Pot (its tests then skip), AP_JAX_SKIP_BENCH=1 without the
# bench extra (torch, diffusers: the peer benchmark's test then skips), AP_JAX_SKIP_TPU=1 without the tpu extra
# (libtpu: the ahead-of-time TPU compile tests then skip).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
JOB="${1:-demo}"
shift || true

log() { echo "[launch/local.sh $(date +%H:%M:%S)] $*"; }

setup() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating virtual environment $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  log "installing ap_jax and its dependencies into $VENV"
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[dev]"
}

# setup_extra NAME SKIP_VARIABLE IMPORTS INSTALL...: installs an optional extra unless SKIP_VARIABLE=1 (its tests
# then skip) or IMPORTS already import.
setup_extra() {
  local name=$1 skip=$2 imports=$3
  shift 3
  if [[ "${!skip:-0}" == "1" ]]; then
    log "$skip=1: not installing $name; the tests that need it will skip"
  elif python -c "import $imports" 2>/dev/null; then
    log "$name already installed"
  else
    log "installing $name"
    "$@"
  fi
}

setup_meltingpot() {
  setup_extra "the meltingpot extra (dm-meltingpot, dmlab2d, tensorflow)" AP_JAX_SKIP_MELTINGPOT \
    "meltingpot.substrate, dmlab2d" bash launch/install_meltingpot.sh
}

install_bench() {
  # torch pinned to the CPU build this machine image carries (an unpinned torch pulls a CUDA build of GBs).
  python -m pip install -q "torch==2.13.0" && python -m pip install -q -e ".[bench]"
}

setup_tpu() {
  setup_extra "the tpu extra (libtpu: ahead-of-time TPU compiles)" AP_JAX_SKIP_TPU libtpu \
    python -m pip install -q -e ".[tpu]"
}

setup_bench() {
  setup_extra "the bench extra (torch 2.13.0 CPU build, diffusers)" AP_JAX_SKIP_BENCH "torch, diffusers" install_bench
}

case "$JOB" in
  setup)
    setup ;;
  demo)
    setup
    log "running ap-jax demo $*"
    ap-jax demo "$@" ;;
  test)
    setup
    setup_meltingpot
    setup_bench
    setup_tpu
    log "running the test suite"
    # -n 2: both cores; tests that need a device count set it in a subprocess or via conftest.
    python -m pytest -q -n 2 --durations=15 "$@" ;;
  test-beam)
    # The Beam generation test in a venv of its own (.venv-beam): apache-beam caps protobuf below 7 and pillow
    # below 13, which would downgrade the main venv's.
    VENV="${VENV_BEAM:-$ROOT/.venv-beam}"
    setup
    log "installing the beam extra"
    python -m pip install -q -e ".[dev,beam]"
    python -c "import apache_beam" || { echo "apache-beam did not install" >&2; exit 1; }
    log "running the Beam generation test"
    python -m pytest -q -m slow tests/test_data.py -k beam -p no:cacheprovider "$@" ;;
  ap-jax)
    setup
    ap-jax "$@" ;;
  *)
    echo "unknown job '$JOB': expected demo, test, test-beam, setup or ap-jax" >&2
    exit 2 ;;
esac
