#!/usr/bin/env bash
# The main job on its built-in default: set up (scripts/setup.sh), then a small real pipeline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python scripts/demo.py "$@"
