"""flash_kda.fwd on the CPU (the C++ fp64 recurrence) against reference.py's pure-torch fp64 gold.

Both compute in fp64 from the same bf16 inputs, so the only real difference is the final rounding of the
outputs, and the tolerances are that rounding's bounds: out (bf16) element by element within 2⁻⁸ of
itself (conftest.bf16_rounding_bound); an fp32 state within 1e-6 in relative norm (fp32 rounding is 2⁻²⁴
≈ 6e-8). Outputs are NaN-filled before the call so that an element left unwritten fails.
Small heads (K, V = 32/64) keep the single-threaded fp64 reference fast; one test covers K = V = 128.
"""

from __future__ import annotations

import math

import pytest
import torch

import flash_kda
from conftest import bf16_rounding_bound
from flash_kda import _native, _ops, reference
from flash_kda.reference import KDAInputs, relative_error

FP32_STATE_TOLERANCE = 1e-6


def run_fwd(
    inputs: KDAInputs, final_state_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = torch.full_like(inputs.v, math.nan)
    final_state = None
    if final_state_dtype is not None:
        final_state = torch.full(inputs.state_shape(), math.nan, dtype=final_state_dtype)
    assert flash_kda.fwd(out=out, final_state=final_state, **inputs.fwd_kwargs()) is None
    return out, final_state


def assert_matches_gold(inputs: KDAInputs, out: torch.Tensor, final_state: torch.Tensor | None) -> None:
    gold_out, gold_state = inputs.gold()
    excess = (out.double() - gold_out).abs() - bf16_rounding_bound(gold_out)
    assert torch.isfinite(out).all()
    assert (excess <= 0).all(), f"out: {int((excess > 0).sum())} elements beyond bf16 rounding"
    if final_state is None:
        return
    assert torch.isfinite(final_state).all()
    if final_state.dtype == torch.float32:
        assert relative_error(final_state, gold_state) <= FP32_STATE_TOLERANCE
    else:
        assert (final_state.double() - gold_state).abs().le(bf16_rounding_bound(gold_state)).all()


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 63])
def test_fixed_length(tokens: int) -> None:
    inputs = reference.random_inputs(
        batch=2, tokens=tokens, heads=2, head_dim_k=32, head_dim_v=32, initial_state_dtype=torch.float32
    )
    assert_matches_gold(inputs, *run_fwd(inputs, torch.float32))


@pytest.mark.parametrize("gate_sigma", [0.1, 8.0])
def test_gate_scale(gate_sigma: float) -> None:
    """Nearly constant and nearly saturated gates (raw g ~ N(0, σ))."""
    inputs = reference.random_inputs(
        tokens=40, heads=2, head_dim_k=32, head_dim_v=32, gate_sigma=gate_sigma, lower_bound=-1.5,
        initial_state_dtype=torch.float32,
    )  # fmt: skip
    assert_matches_gold(inputs, *run_fwd(inputs, torch.float32))


def test_varlen_with_zero_length_member() -> None:
    inputs = reference.random_inputs(
        seqlens=[17, 0, 1, 15, 16, 63],
        heads=2,
        head_dim_k=32,
        head_dim_v=32,
        initial_state_dtype=torch.float32,
    )
    out, final_state = run_fwd(inputs, torch.float32)
    assert_matches_gold(inputs, out, final_state)
    # A zero-length sequence's final state is its initial state, bit for bit.
    assert torch.equal(final_state[1], inputs.initial_state[1])


@pytest.mark.parametrize(
    ("initial_dtype", "final_dtype"),
    [
        (None, None),
        (None, torch.bfloat16),
        (None, torch.float32),
        (torch.bfloat16, None),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, None),
        (torch.float32, torch.float32),
    ],
)
@pytest.mark.parametrize("varlen", [False, True], ids=["fixed", "varlen"])
def test_state_dtypes(
    initial_dtype: torch.dtype | None, final_dtype: torch.dtype | None, varlen: bool
) -> None:
    """K ≠ V, so a state read or written in the key-first layout would not match."""
    sizes = {"seqlens": [9, 0, 17]} if varlen else {"batch": 2, "tokens": 17}
    inputs = reference.random_inputs(
        **sizes, heads=2, head_dim_k=32, head_dim_v=64, initial_state_dtype=initial_dtype
    )
    assert_matches_gold(inputs, *run_fwd(inputs, final_dtype))


def test_headline_head_dims() -> None:
    inputs = reference.random_inputs(
        seqlens=[7, 16], heads=2, head_dim_k=128, head_dim_v=128, initial_state_dtype=torch.float32
    )
    assert_matches_gold(inputs, *run_fwd(inputs, torch.float32))


def test_in_place_contract() -> None:
    """out and final_state are written in place (same storage); the inputs are left as they were."""
    inputs = reference.random_inputs(
        tokens=16, heads=2, head_dim_k=32, head_dim_v=32, initial_state_dtype=torch.float32
    )
    before = {name: t.clone() for name, t in inputs.fwd_kwargs().items() if isinstance(t, torch.Tensor)}
    out = torch.full_like(inputs.v, math.nan)
    final_state = torch.full(inputs.state_shape(), math.nan)
    out_ptr, state_ptr = out.data_ptr(), final_state.data_ptr()
    flash_kda.fwd(out=out, final_state=final_state, **inputs.fwd_kwargs())
    assert (out.data_ptr(), final_state.data_ptr()) == (out_ptr, state_ptr)
    assert_matches_gold(inputs, out, final_state)
    for name, t in inputs.fwd_kwargs().items():
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, before[name]), f"{name} was modified"


def test_empty_batch_of_sequences() -> None:
    """T = 0 (all members zero-length): nothing to compute, final state = initial state."""
    inputs = reference.random_inputs(
        seqlens=[0, 0], heads=2, head_dim_k=32, head_dim_v=32, initial_state_dtype=torch.float32
    )
    _, final_state = run_fwd(inputs, torch.float32)
    assert torch.equal(final_state, inputs.initial_state)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_cpp_chunked_reference(chunk_size: int) -> None:
    """The C++ fp32 chunked formulation (the GPU kernels' math) through the binding, against the gold."""
    inputs = reference.random_inputs(
        seqlens=[70, 0, 33], heads=2, head_dim_k=32, head_dim_v=32, initial_state_dtype=torch.float32
    )
    out = torch.full_like(inputs.v, math.nan)
    final_state = torch.full(inputs.state_shape(), math.nan)
    problem = _ops.make_fwd_problem(out=out, final_state=final_state, **inputs.fwd_kwargs())
    _native.reference_forward_chunked(problem, chunk_size)
    gold_out, gold_state = inputs.gold()
    assert relative_error(out, gold_out) <= 2.0**-8
    assert relative_error(final_state, gold_state) <= 1e-5
