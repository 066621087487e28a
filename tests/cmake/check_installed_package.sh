#!/usr/bin/env bash
# Installs a flash_kda CMake build into a temporary prefix, then configures, builds and runs the C++
# example against it through find_package(flash_kda) — what a project that depends on flash_kda does.
#   tests/cmake/check_installed_package.sh <build dir> <source dir>
set -euo pipefail
build=${1:?usage: check_installed_package.sh <build dir> <source dir>}
source_dir=${2:?usage: check_installed_package.sh <build dir> <source dir>}
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT
cmake --install "$build" --prefix "$prefix/install" >/dev/null
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$source_dir/examples/cpp" -B "$prefix/example" "${generator[@]}" -DCMAKE_PREFIX_PATH="$prefix/install" >/dev/null
cmake --build "$prefix/example" >/dev/null
"$prefix/example/flash_kda_example"
