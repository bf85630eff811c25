#!/usr/bin/env bash
# Create .venv and install the project with its test extras; idempotent, safe to re-run.
# Also installs Debian's dataset-fashion-mnist (real labelled images for tests and the demo)
# when running as root on a Debian/Ubuntu machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# torch/torchvision pinned to the versions the project is tested with (>= 2.11 works too).
PINS='"torch==2.14.1" "torchvision==0.29.1"'
# The install is editable, so only a change of the dependencies (pyproject.toml, the pins) needs
# pip again; a stamp of both skips the ~10 s of pip's checks on every test run.
STAMP=.venv/.installed
WANT="$(cat pyproject.toml; echo "$PINS")"
WANT=$(printf '%s' "$WANT" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || ! python -c "import tec_cache, tec_train" 2>/dev/null; then
  eval python -m pip install -q --disable-pip-version-check "$PINS"
  python -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$WANT" > "$STAMP"
fi
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu)" >&2
  fi
fi
