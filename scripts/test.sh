#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff, mypy: configured in pyproject.toml, the whole tree) and
# run the whole test suite, slow tests included. A lint finding stops the run before the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if ! ruff check .; then
  echo "error: ruff check found the problems above (many fix with 'ruff check --fix .'); tests not run" >&2
  exit 1
fi
if ! mypy; then
  echo "error: mypy found the type errors above; tests not run" >&2
  exit 1
fi
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
