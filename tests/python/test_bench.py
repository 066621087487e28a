"""The benchmark tool's bookkeeping (what runs without a GPU): cases, bytes floor, report."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flash_kda import bench

# Floor column of ../shared/kda/TARGETS.md (ms at 3.0 TB/s), in the order of its table.
TARGETS_FLOOR_MS = [0.340, 0.361, 0.370, 0.227, 0.241, 0.246, 0.025, 0.449, 0.538, 0.451]


def test_cases_and_floor_match_targets() -> None:
    assert len(bench.TARGET_CASES) == len(TARGETS_FLOOR_MS)
    for case, floor in zip(bench.TARGET_CASES, TARGETS_FLOOR_MS, strict=True):
        assert case.floor_bytes() / bench.TARGETS_COPY_BANDWIDTH * 1e3 == pytest.approx(floor, abs=1.5e-3), case.name


def test_markdown_reports_speedup_and_floor_fraction() -> None:
    case = bench.TARGET_CASES[0]
    floor_ms = case.floor_bytes() / bench.TARGETS_COPY_BANDWIDTH * 1e3
    rows = [bench.Row(case, ours_ms=2 * floor_ms, fla_ms=6 * floor_ms, floor_ms=floor_ms)]
    text = bench.markdown(rows, {"GPU": "Test GPU", "commit": "abc"}, "fp32", 100, bench.TARGETS_COPY_BANDWIDTH)
    line = next(row for row in text.splitlines() if row.startswith(f"| {case.name} "))
    assert "| 3.00× |" in line and "| 50% |" in line  # FLA / ours, floor / ours
    # achieved GB/s: the floor's bytes over our time, i.e. half the copy bandwidth here
    assert f"| {bench.TARGETS_COPY_BANDWIDTH / 2e9:.0f} |" in line
    assert "3.00 TB/s" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_bench_without_gpu_says_so() -> None:
    result = subprocess.run([sys.executable, "-m", "flash_kda", "bench"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "needs a CUDA GPU" in result.stderr
