#!/usr/bin/env bash
# Install the service into .venv and start it. With the defaults: the weight-free engine and
# the built-in avatar, no model files. With ENGINE=musetalk (or auto), in the environment or
# in .env, it also installs the neural engine's extra (torch pinned, then diffusers and
# transformers). Every other setting comes from the environment or .env (.env.example).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
engine="${ENGINE:-}"
if [ -z "$engine" ] && [ -f .env ]; then
  engine=$(sed -n 's/^ENGINE=//p' .env | tail -n 1)
fi
case "${engine,,}" in
  musetalk|auto)
    $py -m pip install -q torch==2.13.0   # pinned first: an open range pulls another build
    $py -m pip install -q -e '.[musetalk]' ;;
  *)
    $py -m pip install -q -e . ;;
esac
exec $py run_server.py
