#!/usr/bin/env bash
# Fetch pinned wheels of everything bench/gpu_check.py may need on a GPU image that has torch (and perhaps
# transformers / peft / accelerate) but no trl, datasets or fastapi and cannot reach an index (Python 3.12, x86-64).
#
# The pins are the dependency closure of trl, datasets, transformers, peft, accelerate, fastapi and httpx without
# torch, read from the installed distributions' own metadata (Requires-Dist) of the versions this project runs and
# tests: trl 1.16.0 needs accelerate, datasets>=4.7, huggingface_hub, jinja2, numpy, pandas>=2.1.1, psutil>=5.9.4,
# pyarrow>=21, pyyaml, transformers; datasets 5.2.0 needs dill<0.4.2, multiprocess<0.70.20, xxhash, pyarrow>=24,
# fsspec<=2026.9.0, huggingface-hub>=1.31 (which needs hf-xet, httpx2, click), pandas, tqdm.
# gpu_check installs, with --no-index --no-deps, only the wheels whose distribution is missing there or does not
# satisfy a requirement of what is being installed, so fetching a package the image already has is harmless.
#
# Size: pyarrow (~45 MB), numpy (~17 MB), pandas (~12 MB) and transformers (~12 MB) are most of it. A device call
# carries at most 64 MiB of ignored paths: leave out what the image has. The H200 image seen on 2026-12-04 had numpy
# 2.5.2, pandas 3.0.6 and pyarrow 25.0.1, so SKIP="numpy pandas pyarrow" bench/fetch_gpu_wheels.sh (34 MiB) was enough.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
PINS=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 pyarrow==26.0.1
  pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0 psutil==7.2.2 numpy==2.4.6
  huggingface-hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2 httpcore2==2.16.2 click==8.5.1 truststore==0.10.5
  fsspec==2026.9.0 filelock==4.3.1 tqdm==4.70.1 pyyaml==6.0.4 jinja2==3.1.6 markupsafe==3.0.4 packaging==26.3
  transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 regex==2026.11.19
  typer==0.29.2 rich==15.0.0 shellingham==1.5.4 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
  peft==0.21.2 accelerate==1.15.0
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2
  anyio==4.16.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 idna==3.20 certifi==2026.10.19.post1
)
WANT=()
for pin in "${PINS[@]}"; do
  name="${pin%%==*}"
  if [[ " ${SKIP:-} " == *" $name "* ]]; then continue; fi
  WANT+=("$pin")
done
mkdir -p bench/wheels
"$PY" -m pip download --no-deps --python-version 3.12 --implementation cp --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d bench/wheels "${WANT[@]}" "$@"
total=$(du -cm bench/wheels/*.whl | tail -1 | cut -f1)
echo "bench/wheels: $(ls bench/wheels/*.whl | wc -l) wheels, ${total} MiB"
if [ "$total" -gt 60 ]; then
  echo "more than a device call carries (64 MiB): SKIP what the GPU image already has (see the top of this script)" >&2
fi
