#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.py installs on a GPU image that has torch, transformers, peft and accelerate
# but no trl / datasets / fastapi (the device image runs Python 3.12 on x86-64 and cannot reach an index).
# gpu_check installs only the wheels whose distribution is missing there or older than the wheel, so fetching a
# package the image already has is harmless; mind the 64 MiB a device call may carry (pyarrow alone is ~40 MiB:
# delete its wheel if the image's pyarrow is new enough for datasets).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip download --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d bench/wheels \
    trl datasets dill multiprocess xxhash pyarrow \
    fastapi starlette pydantic pydantic-core annotated-types typing-inspection opentelemetry-api \
    "$@"
ls -la bench/wheels
