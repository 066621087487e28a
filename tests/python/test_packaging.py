"""Packaging: a wheel built from this checkout installs and imports where no CUDA toolkit is (nvcc hidden
from PATH here), the library needs nothing of the toolkit at run time, "native" architectures resolve to
the local Hopper GPU, and `flash-kda info` reports the compiled architectures and each GPU's support.

The resolution rules themselves are unit-tested by CTest (tests/cmake/test_cuda_architectures.cmake).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import flash_kda
from conftest import requires_sm90
from flash_kda import _native

ROOT = Path(__file__).resolve().parents[2]
# What a Linux build of the library may link against: the C/C++ runtime only. The CUDA runtime is
# linked statically and finds the driver (libcuda) with dlopen when a GPU is first used.
_SYSTEM_LIBRARIES = {
    "libstdc++.so.6", "libm.so.6", "libgcc_s.so.1", "libc.so.6", "ld-linux-x86-64.so.2", "libdl.so.2",
    "libpthread.so.0", "librt.so.1",
}  # fmt: skip


def _needed_libraries(library: Path) -> set[str]:
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not found")
    dynamic = subprocess.run([readelf, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return {line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line}


def test_library_needs_no_cuda_toolkit_at_run_time() -> None:
    needed = _needed_libraries(_native.LIBRARY_PATH)
    assert needed <= _SYSTEM_LIBRARIES, f"{_native.LIBRARY_PATH} links {sorted(needed - _SYSTEM_LIBRARIES)}"


def _without_nvcc(environ: dict[str, str]) -> dict[str, str]:
    """The environment of a machine without a CUDA toolkit, as far as a process can tell."""
    env = {k: v for k, v in environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "FLASH_KDA_LIBRARY")}
    env["PATH"] = os.pathsep.join(
        d for d in environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "nvcc").exists()
    )
    return env


_IMPORT_CHECK = """
import shutil, sys
import torch, flash_kda
from flash_kda import cli
assert shutil.which("nvcc") is None, "nvcc is still on PATH"
print("imported from", flash_kda.__file__)
cli.main(["info"])
q, k, v, g = (torch.randn(1, 20, 2, 128).bfloat16() for _ in range(4))
out, state = flash_kda.chunk_kda(
    q, k, v, g, torch.randn(1, 20, 2).bfloat16(), output_final_state=True, use_qk_l2norm_in_kernel=True,
    use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, safe_gate=True, lower_bound=-5.0,
    A_log=torch.zeros(2), dt_bias=torch.zeros(256))
assert torch.isfinite(out).all() and state.shape == (1, 2, 128, 128)
print("chunk_kda ran")
"""


@pytest.mark.skipif(
    importlib.util.find_spec("scikit_build_core") is None
    or shutil.which("cmake") is None
    or (importlib.util.find_spec("cutlass_library") is None and not os.environ.get("CUTLASS_INCLUDE_DIR")),
    reason="needs scikit-build-core, cmake and the CUTLASS headers (scripts/setup.sh installs them)",
)
def test_wheel_builds_installs_and_imports_without_nvcc(tmp_path: Path) -> None:
    """`pip wheel` with FLASH_KDA_CUDA_ARCHS=90a (as for a wheel that travels), then install and import with
    nvcc hidden. Without nvcc on this machine the CPU-only library (FLASH_KDA_ENABLE_CUDA=OFF) is built."""
    with_cuda = shutil.which("nvcc") is not None
    build_env = {
        **os.environ,
        "FLASH_KDA_CUDA_ARCHS": "90a",
        "FLASH_KDA_ENABLE_CUDA": "ON" if with_cuda else "OFF",
    }
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w",
         str(tmp_path / "dist"), "-C", f"build-dir={tmp_path / 'build'}"],
        capture_output=True, text=True, timeout=1200, check=False, env=build_env,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("flash_kda-*.whl")
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl"), wheel.name  # one wheel for every Python 3
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("flash_kda/libflash_kda.so", "flash_kda/chunk.py", "flash_kda/fla_backend.py"):
        assert member in names, f"{member} missing from {wheel.name}"

    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    env = _without_nvcc(os.environ)
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _IMPORT_CHECK],  # a crash prints where it happened
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"imported from {site}" in run.stdout
    assert ("CUDA archs  90a" if with_cuda else "CUDA archs  none (CPU-only build)") in run.stdout, run.stdout
    assert "chunk_kda ran" in run.stdout
    assert _needed_libraries(site / "flash_kda" / "libflash_kda.so") <= _SYSTEM_LIBRARIES


def _info_rows() -> dict[str, str]:
    """`flash-kda info` as {key: value} (it prints each key padded, two spaces, then the value)."""
    run = subprocess.run(
        [sys.executable, "-m", "flash_kda", "info"], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in run.stdout.splitlines())


def test_info_reports_architectures_and_gpu_support() -> None:
    rows = _info_rows()
    archs = flash_kda.cuda_architectures()
    assert rows["CUDA archs"] == (", ".join(archs) if archs else "none (CPU-only build)")
    if not torch.cuda.is_available():
        assert rows["GPU"] == "none visible"
    for index in range(torch.cuda.device_count()):
        assert rows[f"GPU {index}"].endswith(": supported") or ": not supported: " in rows[f"GPU {index}"]
    assert "FLA" in rows


@requires_sm90
def test_info_says_this_gpu_is_supported() -> None:
    assert _info_rows()["GPU 0"].endswith("sm_90: supported")


@requires_sm90
@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_native_architectures_are_this_gpus() -> None:
    """On an H100/H200, the default FLASH_KDA_CUDA_ARCHS=native resolves to 90a from the GPU itself."""
    env = {k: v for k, v in os.environ.items() if k != "FLASH_KDA_CUDA_ARCHS"}
    run = subprocess.run(
        ["cmake", "-P", str(ROOT / "cmake" / "print_cuda_architectures.cmake")],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "flash_kda CUDA architectures: 90a (native: this machine's GPUs)" in run.stdout + run.stderr
