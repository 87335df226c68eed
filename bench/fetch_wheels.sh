#!/usr/bin/env bash
# Downloads the peers' wheels for the H200 machine (Python 3.12, no network there) into .whl/, on a machine
# that has network: `bash bench/fetch_wheels.sh`. bench/gpu_session.sh installs them with --no-deps and
# reports each peer by name when it cannot load. Only the packages themselves travel (the machine has torch,
# triton and transformers); verl's fused kernel needs more of verl's dependencies than travel, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in liger-kernel trl cut-cross-entropy verl==0.9.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$spec" || echo "could not download $spec"
done
ls -la .whl
