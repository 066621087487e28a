"""The torch operators flash_kda::fwd and flash_kda::chunk_kda_forward, and the checks only Python can make.

flash_kda::fwd is FlashKDA's call, whose contract fixes the options (q/k normalised inside, lower-bound
gate, sigmoid beta, V-first state). flash_kda::chunk_kda_forward takes the same tensors plus the options
FLA's chunk_kda varies within what the kernel computes: L2 norm on or off, beta = 2·sigmoid
(allow_neg_eigval), K-first or V-first state; A_log and dt_bias may be absent. flash_kda.chunk_kda calls it.

Registering through torch.library (schema with mutation annotations on `out` and `final_state`, a fake
implementation) is what lets torch.compile trace through the call and CUDA graphs capture it. The
kernels themselves are C++ (see _native); everything C++ can check from a ForwardProblem it checks.
What it cannot see is checked here:
- devices: C++ receives raw pointers, so tensors on different devices would go unnoticed;
- full contiguity of the data tensors (C++ accepts strided views; FlashKDA's contract is contiguous);
- on CUDA, the values of cu_seqlens. C++ only reads them on the CPU (for the reference); reading device
  memory from the host means a synchronisation, so here torch reduces them on the device and copies three
  numbers back. That check is skipped while a CUDA graph is being captured (a synchronisation would break
  the capture) and while torch.compile traces (nothing concrete to read): then cu_seqlens must be right.
  It runs once per cu_seqlens tensor and version (CheckedCuSeqlens), not on every call.
"""

from __future__ import annotations

import collections
import contextlib
import numbers
import weakref

import torch

from . import _native
from ._native import FlashKDAError

FWD_PARAMETERS = (
    "q", "k", "v", "g", "beta", "scale", "out", "A_log", "dt_bias", "lower_bound",
    "initial_state", "final_state", "cu_seqlens",
)  # fmt: skip
_SCALARS = ("scale", "lower_bound")
_OPTIONAL_TENSORS = ("initial_state", "final_state", "cu_seqlens")
_CONTIGUOUS = ("q", "k", "v", "g", "beta", "out", "initial_state", "final_state")
# (position, name, must be contiguous) of every tensor argument; these run on every call, so the loops
# below work from precomputed tables (half the cost of testing each argument's name).
_TENSOR_SLOTS = tuple(
    (i, name, name in _CONTIGUOUS) for i, name in enumerate(FWD_PARAMETERS) if name not in _SCALARS
)
_SCALAR_SLOTS = tuple((FWD_PARAMETERS.index(name), name) for name in _SCALARS)


def checked_arguments(args: tuple[object, ...]) -> tuple[object, ...]:
    """The arguments of flash_kda.fwd (in FWD_PARAMETERS order), with scale and lower_bound as floats.

    Raises FlashKDAError for a non-tensor where a tensor belongs or a non-number scalar: checked before
    the operator so the message names the argument instead of being the dispatcher's schema mismatch.
    """
    if len(args) != len(FWD_PARAMETERS):
        raise TypeError(f"expected {len(FWD_PARAMETERS)} arguments, got {len(args)}")
    for i, name, _ in _TENSOR_SLOTS:
        value = args[i]
        if not isinstance(value, torch.Tensor) and (value is not None or name not in _OPTIONAL_TENSORS):
            expected = "a torch.Tensor or None" if name in _OPTIONAL_TENSORS else "a torch.Tensor"
            raise FlashKDAError(f"{name}: expected {expected}, got {type(value).__name__}")
    checked = list(args)
    for i, name in _SCALAR_SLOTS:
        value = args[i]
        if type(value) is not float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise FlashKDAError(f"{name}: expected a float, got {type(value).__name__}")
            checked[i] = float(value)
    return tuple(checked)


def _check_tensors(args: tuple[object, ...]) -> None:
    """Same device as q for every tensor; full contiguity where FlashKDA requires it (metadata only)."""
    device = args[0].device
    for i, name, contiguous in _TENSOR_SLOTS:
        value = args[i]
        if value is None:
            continue
        if value.device != device:
            raise FlashKDAError(
                f"{name}: expected a tensor on {device} (the device of q), got one on {value.device}"
            )
        if contiguous and not value.is_contiguous():
            raise FlashKDAError(f"{name}: expected a contiguous tensor")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, tokens: int) -> None:
    """Checks cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == tokens, with one device-to-host copy.

    cu_seqlens has passed C++ validation (integer dtype, rank 1, at least one element).
    """
    steps = torch.diff(cu_seqlens)
    smallest_step = steps.min() if steps.numel() > 0 else torch.zeros_like(cu_seqlens[0])
    first, last, step = torch.stack((cu_seqlens[0], cu_seqlens[-1], smallest_step)).tolist()
    if first != 0:
        raise FlashKDAError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {first}")
    if step < 0:
        raise FlashKDAError(f"cu_seqlens: expected non-decreasing values, found a step of {step}")
    if last != tokens:
        raise FlashKDAError(
            f"cu_seqlens: expected cu_seqlens[-1] == {tokens} (the token count of q), got {last}"
        )


class CheckedCuSeqlens:
    """The cu_seqlens tensors that check_cu_seqlens_values has passed, with the token count they were checked
    against.

    The check's device-to-host copy makes the host wait for the GPU. The GPU then idles until the host has
    launched the next kernel: about 50 µs per varlen call on an H200 (session 28), 6–13% of TARGETS.md's varlen
    cases. A model hands the same cu_seqlens to every layer, so checking each tensor once saves all but the
    first of those waits.

    An entry holds the tensor weakly: a new tensor never matches, even at a dead one's address. It also holds
    the tensor's version counter, which every in-place torch op bumps (views share it), so a tensor changed by
    torch is checked again. Changes that torch does not see, through `.data`, DLPack or a kernel of one's own,
    are not noticed: pass a new tensor then. Inference tensors have no version counter and are checked on every
    call. FLA caches its chunk indices by tensor identity alone (fla.utils.tensor_cache, four entries).
    """

    def __init__(self, size: int = 8) -> None:
        self._entries: collections.deque = collections.deque(maxlen=size)

    @staticmethod
    def _version(cu_seqlens: torch.Tensor) -> int | None:
        return None if cu_seqlens.is_inference() else cu_seqlens._version

    def contains(self, cu_seqlens: torch.Tensor, tokens: int) -> bool:
        version = self._version(cu_seqlens)
        if version is None:
            return False
        # A snapshot: another thread may append meanwhile.
        return any(
            ref() is cu_seqlens and v == version and t == tokens for ref, v, t in tuple(self._entries)
        )

    def add(self, cu_seqlens: torch.Tensor, tokens: int) -> None:
        version = self._version(cu_seqlens)
        if version is not None:
            self._entries.append((weakref.ref(cu_seqlens), version, tokens))


_CHECKED_CU_SEQLENS = CheckedCuSeqlens()


def check_cu_seqlens_once(cu_seqlens: torch.Tensor, tokens: int) -> None:
    """check_cu_seqlens_values, unless this tensor passed it unchanged (same version) for the same tokens."""
    if not _CHECKED_CU_SEQLENS.contains(cu_seqlens, tokens):
        check_cu_seqlens_values(cu_seqlens, tokens)
        _CHECKED_CU_SEQLENS.add(cu_seqlens, tokens)


def _may_synchronise() -> bool:
    return not (torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling())


# The options FlashKDA's contract fixes, as plain ints (ctypes converts an IntEnum member more slowly).
_GATE = int(_native.GateMode.LOWER_BOUND)
_BETA = int(_native.BetaMode.SIGMOID)
_BETA_TWO_SIGMOID = int(_native.BetaMode.TWO_SIGMOID)
_STATE_LAYOUT = int(_native.StateLayout.VALUE_FIRST)
_STATE_KEY_FIRST = int(_native.StateLayout.KEY_FIRST)


def _make_problem(args: tuple[object, ...], options: _native.ForwardOptions) -> _native.Problem:
    """The ForwardProblem of `args` (the arguments of flash_kda.fwd, in FWD_PARAMETERS order) and
    `options`, after the Python-side checks."""
    _check_tensors(args)
    q, k, v, g, beta, _, out, A_log, dt_bias, _, initial_state, final_state, cu_seqlens = args
    return _native.make_problem(
        q=q, k=k, v=v, g=g, beta=beta, out=out, A_log=A_log, dt_bias=dt_bias, initial_state=initial_state,
        final_state=final_state, cu_seqlens=cu_seqlens, options=options,
    )  # fmt: skip


def make_fwd_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    lower_bound: float,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
) -> _native.Problem:
    """The ForwardProblem of a FlashKDA call (arguments as flash_kda.fwd), after the Python-side checks.

    FlashKDA's contract fixes the options: q/k L2-normalised inside, lower-bound gate, sigmoid beta,
    V-first state.
    """
    args = (q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens)
    return _make_problem(args, _native.ForwardOptions(scale, 1, _GATE, lower_bound, _BETA, _STATE_LAYOUT))


def _chunk_problem(args: tuple[object, ...]) -> _native.Problem:
    """The ForwardProblem of flash_kda::chunk_kda_forward: fwd's 13 arguments, then its three options."""
    l2norm_qk, allow_neg_eigval, state_v_first = args[13:]
    options = _native.ForwardOptions(
        args[5], int(l2norm_qk), _GATE, args[9], _BETA_TWO_SIGMOID if allow_neg_eigval else _BETA,
        _STATE_LAYOUT if state_v_first else _STATE_KEY_FIRST,
    )  # fmt: skip
    return _make_problem(args[:13], options)


# Positions in FWD_PARAMETERS that the kernels read directly.
_Q, _OUT, _FINAL_STATE, _CU_SEQLENS = (
    FWD_PARAMETERS.index(n) for n in ("q", "out", "final_state", "cu_seqlens")
)


def _mark_written(args: tuple[object, ...]) -> None:
    """Bumps the autograd version counters of out and final_state, which C++ wrote behind torch's back
    (as every in-place torch op does), so that autograd notices if either was saved for a backward."""
    final_state = args[_FINAL_STATE]
    torch.autograd.graph.increment_version(
        (args[_OUT],) if final_state is None else (args[_OUT], final_state)
    )


def _run_cpu(args: tuple[object, ...], problem: _native.Problem) -> None:
    """CPU: the C++ fp64 token-by-token recurrence (exact up to the rounding of out and final_state)."""
    _native.reference_forward(problem)
    _mark_written(args)


def _run_cuda(args: tuple[object, ...], problem: _native.Problem) -> None:
    q, cu_seqlens = args[_Q], args[_CU_SEQLENS]
    device = q.device
    # C++ makes q's device current around its launch itself; switching here too costs µs per call, so
    # only when q is not on the current device (the capture check below looks at the current device).
    on_current = device.index == torch.cuda.current_device()
    with contextlib.nullcontext() if on_current else torch.cuda.device(device):
        nbytes = _native.cuda_workspace_bytes(problem)  # also validates everything C++ can see
        if cu_seqlens is not None and _may_synchronise():
            check_cu_seqlens_once(cu_seqlens, q.shape[1])
        # Through torch's caching allocator, so the scratch memory is stream-ordered and graph-safe.
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes > 0 else None
        # The raw cudaStream_t of torch.cuda.current_stream(device), without building a Stream object
        # (~6 µs); Inductor's generated code reads the stream the same way.
        stream = torch._C._cuda_getCurrentRawStream(device.index)
        _native.cuda_forward(problem, stream, workspace.data_ptr() if workspace is not None else 0, nbytes)
    _mark_written(args)


def _fwd_cpu(*args: object) -> None:
    _run_cpu(args, make_fwd_problem(*args))


def _fwd_cuda(*args: object) -> None:
    _run_cuda(args, make_fwd_problem(*args))


def _fwd_fake(*args: object) -> None:
    """Nothing to compute (the op returns nothing); the device and contiguity checks read metadata only."""
    _check_tensors(args)


def _chunk_cpu(*args: object) -> None:
    _run_cpu(args[:13], _chunk_problem(args))


def _chunk_cuda(*args: object) -> None:
    _run_cuda(args[:13], _chunk_problem(args))


def _chunk_fake(*args: object) -> None:
    _check_tensors(args[:13])


# Registered with the low-level torch.library API rather than torch.library.custom_op, whose Python
# dispatch layers cost ~20 µs per call (longer than a small GPU forward); define + impl costs ~3 µs.
# Like FlashKDA's, the ops are forward-only: they have no autograd formula, so nothing that requires grad
# gets a gradient through them.
_LIBRARY = torch.library.Library("flash_kda", "DEF")
_OPERATORS = (
    (
        "fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, Tensor(a!) out, Tensor A_log, "
        "Tensor dt_bias, float lower_bound, Tensor? initial_state, Tensor(b!)? final_state, "
        "Tensor? cu_seqlens) -> ()",
        _fwd_cpu, _fwd_cuda, _fwd_fake,
    ),
    (
        "chunk_kda_forward(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, Tensor(a!) out, "
        "Tensor? A_log, Tensor? dt_bias, float lower_bound, Tensor? initial_state, Tensor(b!)? final_state, "
        "Tensor? cu_seqlens, bool l2norm_qk, bool allow_neg_eigval, bool state_v_first) -> ()",
        _chunk_cpu, _chunk_cuda, _chunk_fake,
    ),
)  # fmt: skip
for _schema, _cpu, _cuda, _fake in _OPERATORS:
    _name = _schema.split("(", 1)[0]
    _LIBRARY.define(_schema)
    _LIBRARY.impl(_name, _cpu, "CPU")
    _LIBRARY.impl(_name, _cuda, "CUDA")
    torch.library.register_fake(f"flash_kda::{_name}", _fake, lib=_LIBRARY)
