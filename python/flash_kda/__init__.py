"""flash_kda: Kimi Delta Attention (KDA) forward kernels. `flash_kda.fwd` is a drop-in for FlashKDA's, and
`flash_kda.chunk_kda` for flash-linear-attention's `fla.ops.kda.chunk_kda`, which also reaches it through
FLA's backend dispatch (see fla_backend.py).

The math is SPEC §1: per head, with S the K×V state,
    S ← Diag(exp(a_t)) S;  S ← S + b_t k̂_t (v_t − Sᵀ k̂_t)ᵀ;  o_t = scale · Sᵀ q̂_t,
with q̂, k̂ L2-normalised, a_t = lower_bound · sigmoid(exp(A_log) · (g_t + dt_bias)), b_t = sigmoid(beta_t).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from . import _ops
from ._native import FlashKDAError, cuda_architectures
from .chunk import chunk_kda

__all__ = ["FlashKDAError", "__version__", "chunk_kda", "cuda_architectures", "fwd", "register_fla_backend"]

__version__: str = Path(__file__).with_name("VERSION").read_text().strip()


def fwd(
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
    initial_state: torch.Tensor | None = None,
    final_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> None:
    """KDA forward with FlashKDA's signature and in-place contract: writes `out` (and `final_state`).

    Args (B batch rows, T tokens, H heads, K = V = 128 on the GPU; N = B, or cu_seqlens.numel() − 1):
        q, k: bf16 [B, T, H, K], raw (L2-normalised inside).
        v: bf16 [B, T, H, V].
        g: bf16 [B, T, H, K], raw gate (lower-bound form inside).
        beta: bf16 [B, T, H], logits (sigmoid inside).
        scale: multiplies the output (usually K ** -0.5).
        out: bf16 [B, T, H, V], written in place.
        A_log: fp32 [H].  dt_bias: fp32 [H, K].
        lower_bound: in [-5, 0).
        initial_state: None (zeros), bf16 or fp32 [N, H, V, K] (V-first, i.e. Sᵀ).
        final_state: None, bf16 or fp32 [N, H, V, K], written in place; the same dtype as initial_state
            when both are given.
        cu_seqlens: None, or int64 [N + 1] (B must be 1): sequence boundaries along T, starting at 0,
            non-decreasing, ending at T; zero-length sequences are allowed.

    All tensors must be on one device, and q, k, v, g, beta, out and the states contiguous. On a CUDA
    device the GPU kernel runs on the current stream; on the CPU the C++ fp64 reference runs (any K, V).

    Every invalid argument raises FlashKDAError (a ValueError) naming it. On CUDA, checking the values of
    cu_seqlens synchronises with the device, so it runs once per tensor: a cu_seqlens that passed is not read
    again until torch changes it in place (inference tensors: every call). The check is skipped while a CUDA
    graph is being captured or torch.compile is tracing; there, and after changes torch does not see, a
    malformed cu_seqlens is the caller's responsibility.
    """
    args = (q, k, v, g, beta, scale, out, A_log, dt_bias, lower_bound, initial_state, final_state, cu_seqlens)
    torch.ops.flash_kda.fwd(*_ops.checked_arguments(args))


def register_fla_backend() -> None:
    """Registers flash_kda's backend for flash-linear-attention's chunk_kda (imports fla.ops.kda).

    Idempotent. Needed only when flash_kda was imported before fla.ops.kda: importing flash_kda after it
    registers the backend by itself. Raises ImportError when FLA is not installed.
    """
    from . import fla_backend

    fla_backend.register()


# FLA has no plug-in discovery, and importing its KDA module costs seconds: register only when it is
# loaded already. A failure must not make flash_kda unusable, so it is reported as a warning.
if "fla.ops.kda" in sys.modules:
    try:
        register_fla_backend()
    except Exception as e:  # an FLA without the registry API, or one that changed it
        warnings.warn(
            f"flash_kda: could not register its backend with FLA: {e}", RuntimeWarning, stacklevel=2
        )
