#!/usr/bin/env bash
# The wheels a GPU machine without package access needs for benchmarks/gpu_suite.sh, into .whl/ (git-ignored).
# Run where pip reaches the registries, from the project root:
#     bash benchmarks/gpu_wheels.sh            # PY_VERSION=3.12 by default: the GPU image's python3
# The GPU image is assumed to hold torch (CUDA), numpy, tokenizers, safetensors, transformers, pyarrow, pyyaml,
# tqdm, psutil, py-cpuinfo, msgpack, ninja and matplotlib; it lacks DeepSpeed (and its pydantic, hjson) and
# zstandard. DeepSpeed ships only a source archive: it becomes a pure-Python wheel whose ops compile on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
DS_VERSION=$(sed -n 's/.*"deepspeed>=\([0-9.]*\).*/\1/p' setup.py)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir -p .whl
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation "deepspeed==${DS_VERSION}" -w .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platforms[@]}" -d .whl "$@"
}
get hjson annotated-types typing-inspection "typing-extensions>=4.14" zstandard pydantic
# pydantic pins pydantic-core exactly: take the pin from the wheel just downloaded
core=$(unzip -p .whl/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
get "pydantic-core==${core}"
ls .whl
