#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for `bench/bench_gpu_path.py`, into .whl/ (git-ignored).
# Run here, where pip reaches PyPI; then carry .whl to the GPU machine and run
# scripts/gpu_run.sh there. That machine has Python 3.12 with CUDA torch, transformers,
# numpy, scikit-image and OpenCV 5, and nothing can be fetched from it. The versions are this
# checkout's environment's (PYTHON, default .venv/bin/python), so the GPU runs what CI tested.
# OpenCV 4 (62 MB) does not fit the 64 MiB a device call carries: the benchmark gives the
# avatar's face box instead of detecting it.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
names=(av diffusers importlib_metadata pydantic pydantic_core pydantic-settings annotated-types
       typing-inspection python-dotenv soundfile cffi pycparser soxr)
pins=()
for name in "${names[@]}"; do
    pins+=("$name==$("$py" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name")")
done
rm -rf .whl
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest .whl "${pins[@]}"
du -sh .whl
