#!/usr/bin/env bash
# Install everything the tests need (system packages, .venv with the neural extra on a
# CPU torch, the pipecat extra, Ray Serve for the cluster test, WebRTC and browser tooling)
# and run lint plus the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# the pipecat extra (pipecat-ai 1.x) needs Python 3.11+; the service alone runs on 3.10
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "the tests need Python 3.11+ (pipecat-ai); found $(python3 -V)" >&2; exit 1; }
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
# torch first and pinned: a CPU build; an open range would pull a multi-GB CUDA build
$py -m pip install -q torch==2.13.0
$py -m pip install -q -e '.[musetalk,test,pipecat,cluster]'

$py -m ruff check websocket_service test bench scripts run_server.py start_pipecat_server.py
$py -m mypy websocket_service
$py -m pytest "$@"
