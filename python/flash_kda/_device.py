"""Whether this build of flash_kda can run its CUDA kernel on a given GPU.

The kernel is Hopper-only (sm_90a instructions), so a GPU qualifies when it is sm_90 and the library was
compiled with 90a among its architectures (FLASH_KDA_CUDA_ARCHS).
"""

from __future__ import annotations

import torch

from . import _native

# Per device index: None (supported) or the reason. Asked on every call of FLA's backend verifier, while
# the answer cannot change within a process.
_UNSUPPORTED: dict[int, str | None] = {}


def gpu_support(index: int = 0) -> tuple[bool, str]:
    """Whether this library can run its kernel on GPU `index`, and why not."""
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return False, f"not supported: the kernel needs sm_90 (Hopper), this GPU is sm_{major}{minor}"
    if "90a" not in _native.cuda_architectures():
        return False, "not supported: the library was built without sm_90a code (see FLASH_KDA_CUDA_ARCHS)"
    return True, "supported"


def unsupported_device_reason(device: torch.device) -> str | None:
    """None when flash_kda runs on `device` (the CPU runs the fp64 reference), else the reason."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"flash_kda runs on CPU or CUDA tensors, got tensors on {device}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _UNSUPPORTED:
        supported, verdict = gpu_support(index)
        _UNSUPPORTED[index] = (
            None if supported else f"cuda:{index} ({torch.cuda.get_device_name(index)}): {verdict}"
        )
    return _UNSUPPORTED[index]
