"""flash_kda.chunk_kda: flash-linear-attention's `fla.ops.kda.chunk_kda` (SPEC §5) on this project's kernel.

Same signature and return contract as FLA's: it allocates the output and returns (o, final_state), with
final_state None unless output_final_state. It serves the calls the kernel computes (see chunk_kda's
docstring); any other raises FlashKDAError with the reason. FLA's backend for this package
(fla_backend.py) asks `unsupported_reason` with the same arguments and, on a reason, leaves the call to
FLA, so that both always agree on what is served.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, NamedTuple

import torch

from ._device import unsupported_device_reason
from ._native import FlashKDAError

__all__ = ["chunk_kda", "unsupported_reason"]

HEAD_DIM = 128  # the kernel's K and V
_FLA_CHUNK_SIZES = (32, 64)  # what FLA accepts for its own chunking; the kernel chunks its own way
_KEYWORDS = frozenset({"A_log", "dt_bias", "chunk_size", "transpose_state_layout"})
_DATA = ("q", "k", "v", "g", "beta")
# Exact upcasts to the kernel's fp32 parameters (FLA's Triton path converts them in the kernel likewise):
# a model cast to bf16 casts A_log and dt_bias with it.
_PARAMETER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DTYPES = (torch.float32, torch.bfloat16)


class _Call(NamedTuple):
    """The arguments of one chunk_kda call, in the order of its signature."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    scale: float | None
    initial_state: torch.Tensor | None
    output_final_state: bool
    use_qk_l2norm_in_kernel: bool
    use_gate_in_kernel: bool
    use_beta_sigmoid_in_kernel: bool
    allow_neg_eigval: bool
    safe_gate: bool
    lower_bound: float | None
    disable_recompute: bool
    return_intermediate_states: bool
    state_v_first: bool
    cu_seqlens: torch.Tensor | None
    cu_seqlens_cpu: torch.Tensor | None
    cp_context: Any
    use_graph: bool
    max_num_seqs: int | None
    kwargs: dict[str, Any]


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    cp_context: Any = None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA forward with the signature and return contract of FLA's `fla.ops.kda.chunk_kda`.

    Returns (o, final_state): o [B, T, H, V] bf16, newly allocated; final_state fp32 [N, H, K, V]
    ([N, H, V, K] with state_v_first), or None unless output_final_state. N = B, or cu_seqlens.numel() − 1.

    Served (anything else raises FlashKDAError with the reason):
    - q, k, v, g, beta bf16 with K = V = 128 and as many value heads as q/k heads (no GVA);
    - the gate computed inside from the raw g: use_gate_in_kernel=True, safe_gate=True and lower_bound in
      [-5, 0), i.e. a = lower_bound · sigmoid(exp(A_log) · (g + dt_bias)); A_log=None drops the exp(A_log)
      factor and dt_bias=None the bias (both may be any float dtype: they are upcast to fp32 exactly);
    - beta logits: use_beta_sigmoid_in_kernel=True, with allow_neg_eigval (2 · sigmoid) or without;
    - use_qk_l2norm_in_kernel either way;
    - initial_state None, fp32 or bf16 (FLA itself takes fp32 only), K-first [N, H, K, V] or, with
      state_v_first=True (or the deprecated transpose_state_layout=True), V-first [N, H, V, K];
    - fixed length or varlen (cu_seqlens int64 or int32 on q's device, B = 1; zero-length sequences hand
      their initial state through, so FLA's use_graph padding works as is).
    Not served: grad (flash_kda is forward-only: when grad mode is on, no input may require grad),
    cp_context, return_intermediate_states. disable_recompute, cu_seqlens_cpu, use_graph and max_num_seqs
    only steer FLA's own kernels and are ignored; chunk_size must be one FLA accepts (32 or 64) and is
    ignored otherwise.

    On CUDA tensors the kernel runs (an sm_90 GPU and a build with 90a); on CPU tensors the exact fp64 C++
    reference (slow). Inputs that are not contiguous are copied.
    """
    call = _Call(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
        use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval, safe_gate, lower_bound,
        disable_recompute, return_intermediate_states, state_v_first, cu_seqlens, cu_seqlens_cpu, cp_context,
        use_graph, max_num_seqs, kwargs,
    )  # fmt: skip
    reason = _unsupported(call)
    if reason is not None:
        raise FlashKDAError(f"flash_kda.chunk_kda: {reason}")
    return _run(call)


_SIGNATURE = inspect.signature(chunk_kda)


def unsupported_reason(*args: Any, **kwargs: Any) -> str | None:
    """Why flash_kda.chunk_kda cannot serve a call with these arguments (as chunk_kda's), or None.

    Unlike chunk_kda itself, which leaves it to the C++ launch, this also checks that the tensors' GPU is
    one the kernel runs on, so that FLA can fall back to its own path on another GPU.
    """
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError as e:
        return str(e)
    bound.apply_defaults()
    call = _Call(*bound.arguments.values())
    return _unsupported(call) or unsupported_device_reason(call.q.device)


def _state_v_first(call: _Call) -> bool:
    if "transpose_state_layout" in call.kwargs:
        warnings.warn(
            "`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
            DeprecationWarning,
            stacklevel=3,
        )
        return bool(call.kwargs["transpose_state_layout"])
    return call.state_v_first


def _unsupported(call: _Call) -> str | None:
    """The first reason the kernel cannot serve `call`, or None. Reads metadata only (torch.compile traces
    it); the values of the tensors are C++'s to check."""
    if call.cp_context is not None:
        return "context parallelism (cp_context) is not supported"
    if call.return_intermediate_states:
        return "return_intermediate_states=True is not supported (the kernel keeps no per-chunk states)"
    unknown = sorted(set(call.kwargs) - _KEYWORDS)
    if unknown:
        return f"unexpected keyword arguments {unknown} (known: {sorted(_KEYWORDS)})"
    if "transpose_state_layout" in call.kwargs and call.state_v_first:
        return "pass either state_v_first or the deprecated transpose_state_layout, not both"
    chunk_size = call.kwargs.get("chunk_size", 64)
    if chunk_size not in _FLA_CHUNK_SIZES:
        return f"chunk_size must be 32 or 64 (as for FLA), got {chunk_size}"
    for name in _DATA:
        tensor = _tensor(call, name)
        if not isinstance(tensor, torch.Tensor):
            return f"{name}: expected a torch.Tensor, got {type(tensor).__name__}"
    if torch.is_grad_enabled():
        for name in (*_DATA, "A_log", "dt_bias", "initial_state"):
            tensor = _tensor(call, name)
            if tensor is not None and tensor.requires_grad:
                return (
                    f"{name} requires grad: flash_kda is forward-only (no backward); call it under "
                    "torch.no_grad() or torch.inference_mode()"
                )
    if not call.use_gate_in_kernel:
        return "needs use_gate_in_kernel=True: the kernel computes the gate from the raw g"
    if not call.safe_gate or call.lower_bound is None:
        return (
            "needs safe_gate=True and a lower_bound: the kernel computes the lower-bound gate "
            "lower_bound · sigmoid(exp(A_log) · (g + dt_bias)), not the softplus gate"
        )
    if not -5.0 <= call.lower_bound < 0.0:
        return f"lower_bound must lie in [-5, 0), got {call.lower_bound}"
    if not call.use_beta_sigmoid_in_kernel:
        return "needs use_beta_sigmoid_in_kernel=True: the kernel applies the sigmoid to the raw beta logits"
    for name in _DATA:
        tensor = _tensor(call, name)
        if tensor.dtype != torch.bfloat16:
            return f"{name}: the kernel reads bfloat16, got {tensor.dtype}"
    for name in ("q", "v"):
        tensor = _tensor(call, name)
        if tensor.dim() != 4:
            return f"{name}: expected rank 4 ([B, T, heads, dim]), got shape {list(tensor.shape)}"
    if call.q.shape[-1] != HEAD_DIM or call.v.shape[-1] != HEAD_DIM:
        return (
            f"the kernel supports K = V = {HEAD_DIM} only, got K = {call.q.shape[-1]}, V = {call.v.shape[-1]}"
        )
    if call.v.shape[2] != call.q.shape[2]:
        return f"GVA is not supported: v has {call.v.shape[2]} heads, q has {call.q.shape[2]}"
    for name in ("A_log", "dt_bias"):
        tensor = _tensor(call, name)
        if tensor is not None and tensor.dtype not in _PARAMETER_DTYPES:
            return f"{name}: expected float32, bfloat16 or float16, got {tensor.dtype}"
    if call.initial_state is not None and call.initial_state.dtype not in _STATE_DTYPES:
        return f"initial_state: expected float32 or bfloat16, got {call.initial_state.dtype}"
    return None


def _tensor(call: _Call, name: str) -> Any:
    return call.kwargs.get(name) if name in ("A_log", "dt_bias") else getattr(call, name)


def _run(call: _Call) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v, g, beta = (_tensor(call, name).contiguous() for name in _DATA)
    A_log, dt_bias = (_tensor(call, name) for name in ("A_log", "dt_bias"))
    A_log = None if A_log is None else A_log.float()
    dt_bias = None if dt_bias is None else dt_bias.float()
    state_v_first = _state_v_first(call)
    batch, _, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    num_sequences = batch if call.cu_seqlens is None else call.cu_seqlens.shape[0] - 1

    initial_state = call.initial_state
    final_state = None
    if call.output_final_state:
        # The kernel writes the final state in the initial state's dtype, and FLA's contract is an fp32
        # final state: a bf16 initial state is upcast (exactly) first.
        if initial_state is not None:
            initial_state = initial_state.float()
        shape = (dim_v, dim_k) if state_v_first else (dim_k, dim_v)
        final_state = torch.empty(num_sequences, heads, *shape, dtype=torch.float32, device=q.device)
    if initial_state is not None:
        initial_state = initial_state.contiguous()

    out = torch.empty_like(v, memory_format=torch.contiguous_format)
    scale = call.scale if call.scale is not None else dim_k**-0.5
    torch.ops.flash_kda.chunk_kda_forward(
        q, k, v, g, beta, float(scale), out, A_log, dt_bias, float(call.lower_bound), initial_state,
        final_state, call.cu_seqlens, call.use_qk_l2norm_in_kernel, call.allow_neg_eigval, state_v_first,
    )  # fmt: skip
    return out, final_state
