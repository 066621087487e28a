#!/usr/bin/env bash
# Set-up and main job: installs everything flash_kda needs (torch 2.11.0 built for CUDA 13.0, the CUTLASS
# headers, the build and test tools, GoogleTest, FLA's fla-core and flash-linear-attention), installs the
# flash_kda package from this checkout and runs `flash-kda info` and `flash-kda check` (the operator against
# the fp64 gold on whatever device is there). Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
# fla-core (flash-linear-attention's kernels, pure Python) is what the FLA backend tests run against;
# flash-linear-attention adds its layers (with transformers), for the KimiDeltaAttention layer test.
"$python" -m pip install --upgrade-strategy only-if-needed \
  "torch==2.11.0" numpy pytest "scikit-build-core>=0.10" ninja "cmake>=3.24" \
  "fla-core==0.6.0" "flash-linear-attention==0.6.0"
# CUTLASS/CuTe headers: a dependency, never vendored; the wheel's other requirements are not needed.
"$python" -m pip install --no-deps "nvidia-cutlass>=4.2"

# GoogleTest for the C++ suite (Debian's package).
if [ ! -e /usr/include/gtest/gtest.h ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq libgtest-dev
fi

# Builds for this machine's Hopper GPU, or for sm_90a where there is none (FLASH_KDA_CUDA_ARCHS overrides).
"$python" -m pip install --no-build-isolation .

flash-kda info
flash-kda check
