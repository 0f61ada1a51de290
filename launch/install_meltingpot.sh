#!/usr/bin/env bash
# Installs the `meltingpot` extra (dm-meltingpot, dmlab2d and what they pull in, tensorflow included) into the
# active Python environment, on a machine that can reach the package index but nothing else.
#
# Why this script exists: dm-meltingpot ships only as a source package, and its setup.py (BuildPy in
# dm-meltingpot 2.4.1) downloads the bot model assets from storage.googleapis.com while building. Offline that
# download fails and so does the install. The substrates ap_jax uses do not need the assets (they are the
# trained bot policies for scenarios). setup.py skips the download when
#   $(python -c 'import tempfile; print(tempfile.gettempdir())')/meltingpot-assets-2.3.0.tar.gz
# exists, then extracts that file into meltingpot/ and copies meltingpot/assets into the wheel. So we point
# TMPDIR at a fresh directory holding a placeholder tarball that contains a near-empty `assets/` folder (the copy
# step fails without one), and install with that TMPDIR.
#
# To install the real bot assets instead, set MELTINGPOT_ASSETS=/path/to/meltingpot-assets-2.3.0.tar.gz.
#
# Usage (from anywhere, with the target virtual environment active):
#   bash launch/install_meltingpot.sh
set -euo pipefail

ASSETS_VERSION=2.3.0  # dm-meltingpot 2.4.1's setup.py: ASSETS_VERSION
ASSETS_NAME="meltingpot-assets-${ASSETS_VERSION}.tar.gz"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"

# The extra's requirements come from setup.cfg, so the package list lives in one place.
mapfile -t REQS < <("$PYTHON" - "$ROOT/setup.cfg" <<'EOF'
import configparser, sys
cfg = configparser.ConfigParser()
cfg.read(sys.argv[1])
reqs = [r.strip() for r in cfg["options.extras_require"]["meltingpot"].splitlines() if r.strip()]
if not reqs:
  sys.exit(f"{sys.argv[1]} has no requirements under [options.extras_require] meltingpot")
print("\n".join(reqs))
EOF
)

BUILD_TMP="$(mktemp -d "${TMPDIR:-/tmp}/ap_jax_meltingpot.XXXXXX")"
trap 'rm -rf "$BUILD_TMP"' EXIT

if [[ -n "${MELTINGPOT_ASSETS:-}" ]]; then
  if [[ ! -f "$MELTINGPOT_ASSETS" ]]; then
    echo "MELTINGPOT_ASSETS=$MELTINGPOT_ASSETS is not a file; expected the path of $ASSETS_NAME" >&2
    exit 1
  fi
  cp "$MELTINGPOT_ASSETS" "$BUILD_TMP/$ASSETS_NAME"
  echo "install_meltingpot: using the bot assets from $MELTINGPOT_ASSETS"
else
  mkdir -p "$BUILD_TMP/placeholder/assets"
  cat > "$BUILD_TMP/placeholder/assets/README.txt" <<EOF
Placeholder written by ap_jax launch/install_meltingpot.sh instead of Melting Pot's bot assets
($ASSETS_NAME), which are downloaded at build time and cannot be offline. Substrates work without them;
scenarios with pretrained bots do not.
EOF
  tar -czf "$BUILD_TMP/$ASSETS_NAME" -C "$BUILD_TMP/placeholder" assets
  echo "install_meltingpot: wrote a placeholder $BUILD_TMP/$ASSETS_NAME so that building dm-meltingpot skips" \
    "its bot-asset download (it fails offline; substrates do not need the assets, scenario bots do)"
fi

PIP_ARGS=()
# A dm-meltingpot wheel cached from an earlier placeholder build would hide the real assets.
[[ -n "${MELTINGPOT_ASSETS:-}" ]] && PIP_ARGS+=(--no-cache-dir --force-reinstall --no-deps dm-meltingpot)
echo "install_meltingpot: pip install ${REQS[*]} ${PIP_ARGS[*]:-}"
TMPDIR="$BUILD_TMP" "$PYTHON" -m pip install "${REQS[@]}"
if (( ${#PIP_ARGS[@]} )); then TMPDIR="$BUILD_TMP" "$PYTHON" -m pip install "${PIP_ARGS[@]}"; fi

"$PYTHON" -c "import meltingpot.substrate, dmlab2d; print('install_meltingpot: meltingpot and dmlab2d import')"
