#!/usr/bin/env bash
# Install the service with Ray Serve into .venv and run it on Ray: start Ray on this machine
# (its own servers on 127.0.0.1 only) or join RAY_ADDRESS, then deploy the session replicas
# (/musetalk/...: the WebSocket protocol and WebRTC signaling) and the REST front (the rest)
# behind Serve's proxy on HOST:PORT. Settings from the environment or .env:
#   REPLICAS (fixed count) or MIN_REPLICAS/MAX_REPLICAS (autoscaling on open sessions),
#   MAX_SESSIONS (per replica), REPLICA_GPUS (1 per replica for MuseTalk), REPLICA_CPUS,
#   DRAIN_TIMEOUT_S, MAX_QUEUED_SESSIONS, and every service setting (.env.example).
# SIGTERM or Ctrl-C: replicas drain (up to DRAIN_TIMEOUT_S), then Serve stops, and Ray too if
# this script started it; a second signal stops at once. SIGTERM this process only, not its
# process group (Ray's own servers are in it): systemd KillMode=mixed (docs/DEPLOYMENT.md).
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
    $py -m pip install -q -e '.[musetalk,cluster]' ;;
  *)
    $py -m pip install -q -e '.[cluster]' ;;
esac
exec $py -m websocket_service.cluster
