#!/usr/bin/env bash
# The main job on its built-in default: set up (scripts/setup.sh), then a few-minute version of the
# miniature reproduction on CPU (pipelines/fmnist-quick.toml), ending with its results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/miniature.py --pipeline fmnist-quick --seeds 0 --out demo-out "$@"
