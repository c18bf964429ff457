#!/usr/bin/env bash
# Install the service into .venv (base install: no torch) and start it with the default
# weight-free engine and the built-in avatar. Settings come from the environment or .env.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/python run_server.py
