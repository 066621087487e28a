"""The `flash-kda` command, run as `python -m flash_kda` in a subprocess (same environment)."""

from __future__ import annotations

import subprocess
import sys

import flash_kda


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flash_kda", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_info() -> None:
    result = run_cli("info")
    assert result.returncode == 0, result.stdout + result.stderr
    assert flash_kda.__version__ in result.stdout
    assert "CUDA archs" in result.stdout and "torch" in result.stdout


def test_check_cpu() -> None:
    result = run_cli("check", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("PASS")


def test_check_cpu_varlen() -> None:
    result = run_cli("check", "--device", "cpu", "--heads", "1", "--seqlens", "17,0,5")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "varlen [17, 0, 5]" in result.stdout and result.stdout.rstrip().endswith("PASS")


def test_check_rejects_bad_seqlens() -> None:
    result = run_cli("check", "--device", "cpu", "--seqlens", "3,x")
    assert result.returncode == 2
    assert "--seqlens" in result.stderr
