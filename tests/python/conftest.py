"""Shared test helpers. Test modules import them with `from conftest import ...` (pytest puts this folder
on sys.path).

Run from a CMake build tree without installing:
    PYTHONPATH=python FLASH_KDA_LIBRARY=build/libflash_kda.so pytest -q tests/python
"""

from __future__ import annotations

import pytest
import torch

import flash_kda


def sm90_available() -> bool:
    """A Hopper GPU is visible and the library carries sm_90a code for it."""
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() == (9, 0)
        and "90a" in flash_kda.cuda_architectures()
    )


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm_90)")
requires_sm90 = pytest.mark.skipif(
    not sm90_available(),
    reason="needs an sm_90 GPU and a library built with FLASH_KDA_CUDA_ARCHS containing 90a",
)


def bf16_rounding_bound(gold: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |x − gold| when x is gold (computed in fp64) rounded once to bfloat16.

    bf16 keeps 8 significant bits, so round-to-nearest moves a value by at most 2⁻⁸ of itself. The slack
    (1e-6 relative, plus a floor far below any output) covers a gold and an x computed in fp64 with
    different summation orders.
    """
    magnitude = gold.abs().to(torch.float64)
    return magnitude * (2.0**-8 + 1e-6) + 1e-12 * float(magnitude.max().clamp_min(1.0))


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_sm90)]
