#!/usr/bin/env bash
# The README's main command: make a virtual environment, install edgeship into it, then run
# `edgeship demo`: an embedded broker, a signed repository, the quantized digits bundle, a server
# and three device agents that install v1, move to v2 and answer predictions.
# Arguments go to `edgeship demo` (e.g. --broker mqtt://127.0.0.1:1883 --keep --json).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${EDGESHIP_VENV:-.venv}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgeship needs Python >= 3.10")'
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== creating $VENV and installing edgeship[packager] (first run only)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[packager]'
  touch "$stamp"
fi
exec "$VENV/bin/edgeship" demo "$@"
