"""ctypes binding of libflash_kda's C ABI (include/flash_kda/c_api.h).

The library is a plain shared library that knows nothing about torch or CPython, so one build serves every
torch and Python version. This module mirrors flash_kda::ForwardProblem (strided tensor views plus
options) as ctypes structures, fills one from torch tensors and hands it to the C entry points. Every
argument check lives in C++ (validate_forward); a failure comes back as a message and is raised here as
FlashKDAError.

The library sits next to this file as libflash_kda.so; the environment variable FLASH_KDA_LIBRARY
overrides the path, e.g. to run from a CMake build tree:
    PYTHONPATH=python FLASH_KDA_LIBRARY=build/libflash_kda.so python -m flash_kda info
"""

from __future__ import annotations

import ctypes
import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "LIBRARY_PATH",
    "BetaMode",
    "FlashKDAError",
    "ForwardOptions",
    "ForwardProblem",
    "GateMode",
    "Problem",
    "StateLayout",
    "Target",
    "TensorView",
    "cuda_architectures",
    "cuda_forward",
    "cuda_workspace_bytes",
    "library_version",
    "make_problem",
    "reference_forward",
    "reference_forward_chunked",
    "validate",
]

ABI_VERSION = 1  # flash_kda::kAbiVersion that the structures below mirror
_MAX_RANK = 4  # flash_kda::kMaxRank
_ERROR_BUFFER_BYTES = 4096


class FlashKDAError(ValueError):
    """An invalid call to flash_kda; the message names the offending argument."""


# ---- mirrors of the enums and structs in include/flash_kda/flash_kda.hpp ------------------------------
class GateMode(enum.IntEnum):
    NONE = 0
    LOWER_BOUND = 1
    SOFTPLUS = 2


class BetaMode(enum.IntEnum):
    NONE = 0
    SIGMOID = 1
    TWO_SIGMOID = 2


class StateLayout(enum.IntEnum):
    KEY_FIRST = 0
    VALUE_FIRST = 1


class Target(enum.IntEnum):
    REFERENCE = 0
    CUDA = 1


_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bfloat16: 0,
    torch.float16: 1,
    torch.float32: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
}
_DEVICE_CODES: dict[str, int] = {"cpu": 0, "cuda": 1}


class TensorView(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("rank", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * _MAX_RANK),
        ("strides", ctypes.c_int64 * _MAX_RANK),
    ]


class ForwardOptions(ctypes.Structure):
    _fields_ = [
        ("scale", ctypes.c_double),
        ("l2norm_qk", ctypes.c_int32),
        ("gate", ctypes.c_int32),
        ("lower_bound", ctypes.c_float),
        ("beta", ctypes.c_int32),
        ("state_layout", ctypes.c_int32),
    ]


# Order matters: it is the member order of flash_kda::ForwardProblem.
_TENSOR_FIELDS = (
    "q", "k", "v", "g", "beta", "out", "A_log", "dt_bias", "initial_state", "final_state", "cu_seqlens",
)  # fmt: skip


class ForwardProblem(ctypes.Structure):
    _fields_ = [
        ("abi_version", ctypes.c_int32),
        ("device", ctypes.c_int32),
        ("device_index", ctypes.c_int32),
        *[(name, TensorView) for name in _TENSOR_FIELDS],
        ("options", ForwardOptions),
    ]


@dataclass(frozen=True)
class Problem:
    """A filled ForwardProblem plus the tensors its views point into.

    Holding the tensors keeps their memory alive for as long as the C library may read or write it.
    """

    struct: ForwardProblem
    tensors: tuple[torch.Tensor, ...]


# Filling a ForwardProblem through ctypes, field by field, costs ~3 µs per tensor view (~35 µs per call,
# more than a small GPU forward takes). Instead every member before `options` is written by one
# struct.pack, whose format is derived from the ctypes mirror above (native alignment reproduces C's
# layout), and the options are appended as the bytes of their ctypes struct.
def _pack_format(ctype: type) -> str:
    if issubclass(ctype, ctypes.Structure):
        align = {1: "b", 2: "h", 4: "i", 8: "q"}[ctypes.alignment(ctype)]
        return "".join(_pack_format(field_type) for _, field_type, *_ in ctype._fields_) + f"0{align}"
    if issubclass(ctype, ctypes.Array):
        return f"{ctype._length_}{_pack_format(ctype._type_)}"
    return ctype._type_  # a simple ctypes type's code is its struct module code


_HEAD_PACKER = struct.Struct(
    "@"
    + "".join(_pack_format(field_type) for name, field_type in ForwardProblem._fields_ if name != "options")
)
if _HEAD_PACKER.size != ForwardProblem.options.offset:
    raise ImportError("flash_kda: the packed ForwardProblem layout differs from its ctypes mirror")
_ABSENT_VIEW = (0,) * (3 + 2 * _MAX_RANK)  # data == nullptr: absent
_PADDING = tuple((0,) * n for n in range(_MAX_RANK + 1))


def _view_values(name: str, tensor: torch.Tensor | None) -> tuple[int, ...]:
    """TensorView's members in order: data, dtype, rank, sizes[4], strides[4]."""
    if tensor is None:
        return _ABSENT_VIEW
    code = _DTYPE_CODES.get(tensor.dtype)
    if code is None:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
        raise FlashKDAError(f"{name}: dtype {tensor.dtype} is not one flash_kda handles ({supported})")
    shape = tensor.shape
    rank = len(shape)
    if rank > _MAX_RANK:
        raise FlashKDAError(f"{name}: expected at most {_MAX_RANK} dimensions, got {rank}")
    pad = _PADDING[_MAX_RANK - rank]
    return (tensor.data_ptr(), code, rank, *shape, *pad, *tensor.stride(), *pad)


def make_problem(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    options: ForwardOptions,
) -> Problem:
    """Describes the tensors (by data pointer, dtype, sizes, strides) and options to the C library.

    None is an absent view. The device is q's: the caller has checked that every tensor lives there
    (C++ cannot see devices).
    """
    device = _DEVICE_CODES.get(q.device.type)
    if device is None:
        raise FlashKDAError(f"q: flash_kda runs on CPU or CUDA tensors, got a tensor on {q.device}")
    tensors = (q, k, v, g, beta, out, A_log, dt_bias, initial_state, final_state, cu_seqlens)
    values = [ABI_VERSION, device, q.device.index or 0]
    for name, tensor in zip(_TENSOR_FIELDS, tensors, strict=True):
        values.extend(_view_values(name, tensor))
    packed = _HEAD_PACKER.pack(*values) + bytes(options)
    return Problem(ForwardProblem.from_buffer_copy(packed), tuple(t for t in tensors if t is not None))


# ---- loading ----------------------------------------------------------------------------------------
def _library_path() -> Path:
    override = os.environ.get("FLASH_KDA_LIBRARY")
    return Path(override).absolute() if override else Path(__file__).with_name("libflash_kda.so")


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise ImportError(
            f"flash_kda: cannot load the native library {path}: {e}. Install the package "
            "(pip install .), or build the library with CMake and point FLASH_KDA_LIBRARY at libflash_kda.so."
        ) from e

    problem_p = ctypes.POINTER(ForwardProblem)
    err_args = [ctypes.c_char_p, ctypes.c_size_t]
    signatures: dict[str, tuple[list, type | None]] = {
        "flash_kda_abi_version": ([], ctypes.c_int32),
        "flash_kda_problem_size": ([], ctypes.c_size_t),
        "flash_kda_version": ([], ctypes.c_char_p),
        "flash_kda_cuda_architectures": ([], ctypes.c_char_p),
        "flash_kda_validate": ([problem_p, ctypes.c_int32, *err_args], ctypes.c_int),
        "flash_kda_reference_forward": ([problem_p, *err_args], ctypes.c_int),
        "flash_kda_reference_forward_chunked": ([problem_p, ctypes.c_int32, *err_args], ctypes.c_int),
        "flash_kda_cuda_workspace_bytes": (
            [problem_p, ctypes.POINTER(ctypes.c_size_t), *err_args],
            ctypes.c_int,
        ),
        "flash_kda_cuda_forward": (
            [problem_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, *err_args],
            ctypes.c_int,
        ),
    }
    for name, (argtypes, restype) in signatures.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise ImportError(f"flash_kda: {path} does not export {name}; is it a flash_kda library?") from e
        fn.argtypes = argtypes
        fn.restype = restype

    # The binding writes ForwardProblem byte for byte: a library from another build must be refused
    # before it reads a struct of a different layout.
    abi = lib.flash_kda_abi_version()
    size = lib.flash_kda_problem_size()
    if abi != ABI_VERSION or size != ctypes.sizeof(ForwardProblem):
        raise ImportError(
            f"flash_kda: {path} has ABI version {abi} and sizeof(ForwardProblem) = {size}, but this Python "
            f"package expects ABI version {ABI_VERSION} and {ctypes.sizeof(ForwardProblem)} bytes; the "
            "package and the library come from different builds (rebuild, or fix FLASH_KDA_LIBRARY)."
        )
    return lib


LIBRARY_PATH: Path = _library_path()
_lib = _load(LIBRARY_PATH)


def _call(fn: Callable[..., int], *args: object) -> None:
    err = ctypes.create_string_buffer(_ERROR_BUFFER_BYTES)
    if fn(*args, err, _ERROR_BUFFER_BYTES) != 0:
        raise FlashKDAError(err.value.decode("utf-8", errors="replace"))


# ---- thin wrappers over the C entry points ------------------------------------------------------------
def validate(problem: Problem, target: Target) -> None:
    """Runs C++ validate_forward for the given implementation; raises FlashKDAError on the first problem."""
    _call(_lib.flash_kda_validate, ctypes.byref(problem.struct), int(target))


def reference_forward(problem: Problem) -> None:
    """The fp64 token-by-token recurrence on the CPU (writes out and final_state)."""
    _call(_lib.flash_kda_reference_forward, ctypes.byref(problem.struct))


def reference_forward_chunked(problem: Problem, chunk_size: int) -> None:
    """The fp32 chunked formulation on the CPU (writes out and final_state)."""
    _call(_lib.flash_kda_reference_forward_chunked, ctypes.byref(problem.struct), chunk_size)


def cuda_workspace_bytes(problem: Problem) -> int:
    """Bytes of device scratch memory cuda_forward needs for this problem (validates it for the GPU)."""
    nbytes = ctypes.c_size_t(0)
    _call(_lib.flash_kda_cuda_workspace_bytes, ctypes.byref(problem.struct), ctypes.byref(nbytes))
    return nbytes.value


def cuda_forward(problem: Problem, stream_ptr: int, workspace_ptr: int, nbytes: int) -> None:
    """Enqueues the GPU forward on the cudaStream_t `stream_ptr`; never synchronises or allocates."""
    _call(
        _lib.flash_kda_cuda_forward,
        ctypes.byref(problem.struct),
        stream_ptr or None,
        workspace_ptr or None,
        nbytes,
    )


def cuda_architectures() -> list[str]:
    """The CUDA architectures compiled into the library (e.g. ["90a"]); empty for a CPU-only build."""
    archs = _lib.flash_kda_cuda_architectures().decode()
    return [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]


def library_version() -> str:
    """The version the C library was built as (normally equal to flash_kda.__version__)."""
    return _lib.flash_kda_version().decode()
