#!/usr/bin/env bash
# On a lent GPU machine, in the repository root, with .whl carried (scripts/gpu_wheels.sh):
# installs the wheels beside the machine's own packages, runs `bench/bench_gpu_path.py` (its
# arguments: none for the full run), and leaves its JSON, its log and the updated
# docs/bench_musetalk.md in $OUT (default /tmp/gpu-out) to bring back:
#
#   device run, carry [".whl"]:  bash scripts/gpu_run.sh
#
# WHEELS (default .whl) and SITE (where they go, default /tmp/site) are for the test that runs
# this script on the tiny model in CI (test/test_bench_gpu_path.py).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}
wheels=${WHEELS:-.whl}
site=${SITE:-/tmp/site}
mkdir -p "$out"
if ! compgen -G "$wheels/*.whl" > /dev/null; then
  echo "gpu_run: no wheels in $wheels: run 'bash scripts/gpu_wheels.sh' on the machine with" \
       "PyPI first and carry $wheels" >&2
  exit 1
fi
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$wheels"/*.whl || exit 1
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  nproc; python3 -c 'import torch, transformers, cv2; print(torch.__version__,
  torch.cuda.is_available(), transformers.__version__, cv2.__version__)'; } 2>&1 | tee "$out/machine.txt"
timeout "${GPU_RUN_TIMEOUT_S:-540}" python3 bench/bench_gpu_path.py --json "$out/gpu_path.json" "$@" \
    2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
cp docs/bench_musetalk.md "$out/" 2>/dev/null
exit "$rc"
