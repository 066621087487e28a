"""The README's examples run as written: each Python block in a fresh interpreter (on the GPU where one is
supported, else on the CPU reference, as the examples choose), the C++ block through the compiler."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _blocks(language: str) -> list[str]:
    return [code for lang, code in _BLOCK.findall((ROOT / "README.md").read_text()) if lang == language]


PYTHON_BLOCKS = _blocks("python")


def test_readme_has_the_three_python_examples() -> None:
    calls = ["from fla.ops.kda import chunk_kda", "flash_kda.chunk_kda(", "flash_kda.fwd("]
    assert len(PYTHON_BLOCKS) == len(calls)
    for block, call in zip(PYTHON_BLOCKS, calls, strict=True):
        assert call in block


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)), ids=["fla", "chunk_kda", "fwd"])
def test_python_example_runs(index: int) -> None:
    code = PYTHON_BLOCKS[index]
    needs_fla = "import fla" in code or "from fla" in code
    if needs_fla and importlib.util.find_spec("fla") is None:
        pytest.skip("needs flash-linear-attention (pip install fla-core)")
    # The child imports flash_kda as this process does (PYTHONPATH and FLASH_KDA_LIBRARY are inherited).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False, env=env
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    if index == 0:  # FLA's routing log shows the call reached flash_kda's backend
        assert re.search(r"\[FLA Backend\] \S*chunk_kda -> flash_kda_native$", run.stderr, re.MULTILINE), (
            run.stderr
        )


def test_cpp_example_compiles() -> None:
    (code,) = _blocks("cpp")
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    run = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'include'}",
         "-x", "c++", "-"],
        input=code, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
