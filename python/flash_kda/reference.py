"""An independent fp64 gold for KDA in pure torch, plus input and error helpers for tests and the CLI.

`kda_forward` is the token-by-token recurrence of SPEC §1 written directly from the math, sharing no code
with the C++ reference, so that the two golds check each other. It runs on any device, vectorised over
batch rows and heads with a Python loop over tokens: fine for checks up to a few thousand tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KDAInputs", "kda_forward", "random_inputs", "relative_error"]

_L2_EPS = 1e-6


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + _L2_EPS)


def _recurrence(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q, k, a: [B, L, H, K]; v: [B, L, H, V]; b: [B, L, H]; state Sᵀ: [B, H, V, K] (fp64, preprocessed)."""
    out = torch.empty_like(v)
    for t in range(q.shape[1]):
        k_t = k[:, t]  # [B, H, K]
        state = state * torch.exp(a[:, t]).unsqueeze(-2)  # S ← Diag(e^a) S  (scales the K axis of Sᵀ)
        residual = v[:, t] - torch.einsum("bhvk,bhk->bhv", state, k_t)  # v_t − Sᵀ k̂_t
        state = state + b[:, t, :, None, None] * residual.unsqueeze(-1) * k_t.unsqueeze(-2)
        out[:, t] = scale * torch.einsum("bhvk,bhk->bhv", state, q[:, t])
    return out, state


def kda_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    l2norm_qk: bool = True,
    allow_neg_eigval: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashKDA's forward (L2 norm, lower-bound gate, sigmoid beta inside) in fp64.

    Arguments as flash_kda.fwd; A_log and dt_bias may be None, then a = lower_bound · sigmoid(g + dt_bias)
    without the exp(A_log) factor, or without the bias. The two options FLA's chunk_kda adds:
    l2norm_qk=False takes q and k as already normalised, allow_neg_eigval gives b = 2 · sigmoid(beta).
    Returns (out [B, T, H, V], final state [N, H, V, K] V-first), both fp64 on q's device.
    """
    f64 = torch.float64
    batch, _, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    gate_in = g.to(f64)
    if dt_bias is not None:
        gate_in = gate_in + dt_bias.to(f64).reshape(heads, dim_k)
    if A_log is not None:
        gate_in = torch.exp(A_log.to(f64)).reshape(heads, 1) * gate_in
    a = lower_bound * torch.sigmoid(gate_in)
    b = (2.0 if allow_neg_eigval else 1.0) * torch.sigmoid(beta.to(f64))
    qn, kn, v64 = q.to(f64), k.to(f64), v.to(f64)
    if l2norm_qk:
        qn, kn = _l2_normalise(qn), _l2_normalise(kn)

    if cu_seqlens is None:
        if initial_state is None:
            state0 = torch.zeros(batch, heads, dim_v, dim_k, dtype=f64, device=q.device)
        else:
            state0 = initial_state.to(f64)
        return _recurrence(qn, kn, v64, a, b, scale, state0)

    if batch != 1:
        raise ValueError(f"cu_seqlens needs a batch of 1, got {batch}")
    offsets = cu_seqlens.tolist()
    num_seqs = len(offsets) - 1
    out = torch.zeros_like(v64)
    final = torch.zeros(num_seqs, heads, dim_v, dim_k, dtype=f64, device=q.device)
    for n, (start, end) in enumerate(itertools.pairwise(offsets)):
        state0 = final[n : n + 1] if initial_state is None else initial_state[n : n + 1].to(f64)
        seq = slice(start, end)
        out[:, seq], final[n : n + 1] = _recurrence(
            qn[:, seq], kn[:, seq], v64[:, seq], a[:, seq], b[:, seq], scale, state0
        )
    return out, final


def relative_error(x: torch.Tensor, gold: torch.Tensor) -> float:
    """‖x − gold‖ / ‖gold‖ (Frobenius norms) in fp64; ‖x − gold‖ itself when gold is all zeros."""
    diff = torch.linalg.vector_norm(x.to(torch.float64) - gold.to(torch.float64)).item()
    norm = torch.linalg.vector_norm(gold.to(torch.float64)).item()
    return diff / norm if norm > 0 else diff


@dataclass
class KDAInputs:
    """The inputs of one flash_kda.fwd call (everything but out and final_state)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    scale: float
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    lower_bound: float
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None

    @property
    def num_sequences(self) -> int:
        return self.q.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1

    def state_shape(self) -> tuple[int, int, int, int]:
        """[N, H, V, K]: the V-first state shape."""
        return (self.num_sequences, self.q.shape[2], self.v.shape[-1], self.q.shape[-1])

    def fwd_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for flash_kda.fwd, to which the caller adds out= (and final_state=)."""
        return {
            "q": self.q, "k": self.k, "v": self.v, "g": self.g, "beta": self.beta, "scale": self.scale,
            "A_log": self.A_log, "dt_bias": self.dt_bias, "lower_bound": self.lower_bound,
            "initial_state": self.initial_state, "cu_seqlens": self.cu_seqlens,
        }  # fmt: skip

    def gold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kda_forward on these inputs: (out, final state) in fp64."""
        return kda_forward(**self.fwd_kwargs())


def random_inputs(
    *,
    heads: int,
    tokens: int | None = None,
    seqlens: Sequence[int] | None = None,
    batch: int = 1,
    head_dim_k: int = 128,
    head_dim_v: int = 128,
    gate_sigma: float = 1.0,
    lower_bound: float = -5.0,
    initial_state_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> KDAInputs:
    """Fresh random FlashKDA-style inputs: bf16 q, k, v, raw gate g ~ N(0, gate_sigma), beta logits ~ N(0, 1),
    A_log = log(U(1, 16)) and dt_bias = softplus⁻¹(U(0.001, 0.1)) (Mamba-style initialisation), fp32.

    Give `tokens` for a fixed-length batch of `batch` rows, or `seqlens` for a varlen batch (batch 1, T =
    sum(seqlens), cu_seqlens int64). `initial_state_dtype` None means no initial state. Data is drawn on
    the CPU (from `generator`, or torch's global generator) and moved to `device`.
    """
    if (tokens is None) == (seqlens is None):
        raise ValueError("give exactly one of tokens and seqlens")
    cu_seqlens = None
    if seqlens is not None:
        if batch != 1:
            raise ValueError(f"varlen inputs have batch 1, got {batch}")
        cu_seqlens = torch.tensor([0, *seqlens], dtype=torch.int64).cumsum(0)
        tokens = int(cu_seqlens[-1])
    assert tokens is not None
    num_seqs = batch if seqlens is None else len(seqlens)

    def randn(*shape: int, sigma: float = 1.0) -> torch.Tensor:
        return sigma * torch.randn(*shape, generator=generator)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    bf16 = torch.bfloat16
    dt = uniform(1e-3, 0.1, heads, head_dim_k)
    initial_state = None
    if initial_state_dtype is not None:
        initial_state = randn(num_seqs, heads, head_dim_v, head_dim_k).to(initial_state_dtype).to(device)
    return KDAInputs(
        q=randn(batch, tokens, heads, head_dim_k).to(bf16).to(device),
        k=randn(batch, tokens, heads, head_dim_k).to(bf16).to(device),
        v=randn(batch, tokens, heads, head_dim_v).to(bf16).to(device),
        g=randn(batch, tokens, heads, head_dim_k, sigma=gate_sigma).to(bf16).to(device),
        beta=randn(batch, tokens, heads).to(bf16).to(device),
        scale=head_dim_k**-0.5,
        A_log=torch.log(uniform(1.0, 16.0, heads)).to(device),
        dt_bias=(dt + torch.log(-torch.expm1(-dt))).to(device),
        lower_bound=lower_bound,
        initial_state=initial_state,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(device),
    )
