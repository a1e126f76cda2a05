#!/usr/bin/env bash
# The README's main command: make a virtual environment, install edgeship into it,
# then build, inspect and verify the signed bundle of the example digits model.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${EDGESHIP_VENV:-.venv}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgeship needs Python >= 3.10")'
if [ ! -x "$VENV/bin/edgeship" ]; then
  echo "== creating $VENV and installing edgeship[packager] (first run only)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[packager]'
fi
export PATH="$PWD/$VENV/bin:$PATH"
exec bash examples/digits/build.sh "$@"
