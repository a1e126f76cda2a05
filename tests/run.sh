#!/usr/bin/env bash
# The README's test command: make a virtual environment with edgeship[dev], make sure a
# Mosquitto binary is there (tests start their own brokers on loopback), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${EDGESHIP_TEST_VENV:-.venv-test}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "edgeship needs Python >= 3.10")'
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "== creating $VENV and installing edgeship[dev]"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
exec "$VENV/bin/python" -m pytest "$@"
