"""The ctypes binding: the ForwardProblem it fills says what the tensors are, and library facts."""

from __future__ import annotations

import ctypes
import math

import torch

import flash_kda
from flash_kda import _native, _ops, reference


def test_problem_describes_the_tensors() -> None:
    inputs = reference.random_inputs(seqlens=[3, 0, 5], heads=2, head_dim_k=16, head_dim_v=8)
    out = torch.empty_like(inputs.v)
    final_state = torch.empty(inputs.state_shape(), dtype=torch.bfloat16)
    problem = _ops.make_fwd_problem(out=out, final_state=final_state, **inputs.fwd_kwargs())
    s = problem.struct

    assert ctypes.sizeof(s) == ctypes.sizeof(_native.ForwardProblem)
    assert (s.abi_version, s.device, s.device_index) == (_native.ABI_VERSION, 0, 0)
    expected = {"q": inputs.q, "beta": inputs.beta, "dt_bias": inputs.dt_bias, "final_state": final_state,
                "cu_seqlens": inputs.cu_seqlens}  # fmt: skip
    codes = {torch.bfloat16: 0, torch.float32: 2, torch.int64: 5}
    for name, tensor in expected.items():
        view = getattr(s, name)
        rank = tensor.dim()
        assert view.data == tensor.data_ptr(), name
        assert (view.dtype, view.rank) == (codes[tensor.dtype], rank), name
        assert list(view.sizes) == [*tensor.shape, *[0] * (4 - rank)], name
        assert list(view.strides) == [*tensor.stride(), *[0] * (4 - rank)], name
    assert s.initial_state.data is None and s.initial_state.rank == 0  # absent
    o = s.options
    assert math.isclose(o.scale, inputs.scale) and o.lower_bound == inputs.lower_bound
    assert (o.l2norm_qk, o.gate, o.beta, o.state_layout) == (
        1,
        _native.GateMode.LOWER_BOUND,
        _native.BetaMode.SIGMOID,
        _native.StateLayout.VALUE_FIRST,
    )
    # The problem holds on to the tensors its views point into.
    assert any(t is out for t in problem.tensors) and any(t is final_state for t in problem.tensors)


def test_strided_dt_bias() -> None:
    """dt_bias need not be contiguous (only its rows are): its strides reach the C++ reference."""
    inputs = reference.random_inputs(seqlens=[3, 5], heads=2, head_dim_k=8, head_dim_v=8)
    padded = torch.zeros(2, 16)
    padded[:, :8] = inputs.dt_bias
    out, out_strided = torch.empty_like(inputs.v), torch.empty_like(inputs.v)
    args = inputs.fwd_kwargs()
    flash_kda.fwd(out=out, **args)
    args["dt_bias"] = padded[:, :8]
    assert not args["dt_bias"].is_contiguous()
    flash_kda.fwd(out=out_strided, **args)
    assert torch.equal(out, out_strided)


def test_library_facts() -> None:
    assert _native.library_version() == flash_kda.__version__
    archs = flash_kda.cuda_architectures()
    assert isinstance(archs, list) and all(isinstance(a, str) and a for a in archs)
    assert _native.LIBRARY_PATH.is_file()
