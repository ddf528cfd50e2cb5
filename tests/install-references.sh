#!/usr/bin/env bash
# vector-quantize-pytorch releases the tests compare with, each in a folder of its own under .reference/ (they
# share a package name with the test extra's 1.14.17): 1.20.0 and 1.27.0 (checkpoint formats), 1.32.0 (the
# newest, with its two extra dependencies).  --no-deps: they run on the environment's torch, einops and einx.
set -euo pipefail
cd "$(dirname "$0")/.."
for release in 1.20.0 1.27.0; do
    pip install --quiet --no-deps --target ".reference/vqp-$release" "vector-quantize-pytorch==$release"
done
pip install --quiet --no-deps --target .reference/vqp-1.32.0 vector-quantize-pytorch==1.32.0 loguru torch-einops-utils
