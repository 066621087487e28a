#!/usr/bin/env bash
# Tests: builds the library, the C++ tests and the example with CMake, runs them with CTest (including the
# find_package(flash_kda) check of the installed CMake package), then runs the Python suite against that
# build. GPU tests skip themselves, with the reason, when no supported GPU is present.
# Needs what scripts/setup.sh installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
build=${FLASH_KDA_BUILD_DIR:-build}
jobs=${FLASH_KDA_JOBS:-2}

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j "$jobs"
ctest --test-dir "$build" --output-on-failure -j "$jobs"

# The Python package from this source tree, on the library just built.
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export FLASH_KDA_LIBRARY="$PWD/$build/libflash_kda.so"
"$python" -m pytest tests/python -rs "$@"
