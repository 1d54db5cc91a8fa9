#!/usr/bin/env bash
# Run on the development machine before one device call (see benchmarks/device_run.sh): puts the wheels fastai
# needs on the GPU machine into .whl/ and HAM10000 + the lite2 weights into .carry/ (both ignored by git; name
# both in the call's `carry`). Together with the checkout this stays under the 64 MiB a call may carry.
set -euo pipefail
SHARED=${SHARED:-../shared}
mkdir -p .whl .carry
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fastai==2.8.12 fastcore==2.2.41 fasttransform==0.0.5 fastdownload==0.0.8 plum-dispatch==2.9.0 beartype==0.23.1 \
  fastprogress==1.0.3
rm -rf .carry/ham10000 && cp -r "$SHARED/data/ham10000" .carry/ham10000
cp "$SHARED/weights/tf_efficientnet_lite2.safetensors" .carry/
du -sh .whl .carry
