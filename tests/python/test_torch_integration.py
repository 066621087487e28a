"""flash_kda as a PyTorch op: torch.compile(fullgraph=True) of code calling flash_kda.fwd and
flash_kda.chunk_kda (no graph break, the eager result), torch.library.opcheck of both operators, and
capture in a CUDA graph. The CPU cases run in CI; the CUDA cases need an sm_90 GPU.
"""

from __future__ import annotations

import pytest
import torch

import flash_kda
from chunk_calls import assert_near_gold, chunk_kda_call, chunk_kda_gold
from conftest import DEVICES, requires_sm90
from flash_kda import reference

# Inductor on the GPU (what users get); on the CPU aot_eager, which traces the same graph without
# compiling C++ (CI has two cores).
_COMPILE_BACKEND = {"cpu": "aot_eager", "cuda": "inductor"}


def _fwd_inputs(device: str) -> dict[str, object]:
    inputs = reference.random_inputs(
        seqlens=[50, 0, 77], heads=2, initial_state_dtype=torch.float32, device=device,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    return inputs.fwd_kwargs()


def _fwd_returning(kwargs: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_kda.fwd as model code calls it: outputs allocated around the in-place call."""
    out = torch.empty_like(kwargs["v"])
    final_state = torch.empty_like(kwargs["initial_state"])
    flash_kda.fwd(out=out, final_state=final_state, **kwargs)
    return out, final_state


def _chunk_kda_returning(call: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    out, final_state = flash_kda.chunk_kda(**call)
    return out * 1, final_state  # a torch op after the call, so the graph has more than the opaque op


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_fwd(device: str) -> None:
    torch._dynamo.reset()
    kwargs = _fwd_inputs(device)
    compiled = torch.compile(_fwd_returning, backend=_COMPILE_BACKEND[device], fullgraph=True)
    out, final_state = compiled(kwargs)
    eager_out, eager_state = _fwd_returning(kwargs)
    assert torch.equal(out, eager_out) and torch.equal(final_state, eager_state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_v_first", [False, True])
def test_compile_fullgraph_chunk_kda(device: str, state_v_first: bool) -> None:
    """fullgraph=True: any graph break in chunk_kda (argument checks, allocation, the op) is an error."""
    torch._dynamo.reset()
    call = chunk_kda_call(
        device=device, seqlens=[33, 0, 64], state_v_first=state_v_first, allow_neg_eigval=True, seed=2
    )
    compiled = torch.compile(_chunk_kda_returning, backend=_COMPILE_BACKEND[device], fullgraph=True)
    with torch.inference_mode():
        out, final_state = compiled(call)
        eager_out, eager_state = _chunk_kda_returning(call)
    assert torch.equal(out, eager_out) and torch.equal(final_state, eager_state)
    assert_near_gold(out, final_state, *chunk_kda_gold(call))


def _opcheck_inputs(device: str, head_dim: int) -> reference.KDAInputs:
    return reference.random_inputs(
        seqlens=[9, 0, 17], heads=2, head_dim_k=head_dim, head_dim_v=head_dim,
        initial_state_dtype=torch.float32, device=device, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip


# The CPU reference takes any K, V: small heads keep opcheck's repeated runs quick. The kernel needs 128.
_OPCHECK_HEAD_DIM = {"cpu": 16, "cuda": 128}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("sizes", "state_dtype"),
    [
        ({"batch": 2, "tokens": 9}, torch.float32),
        ({"seqlens": [5, 0, 4]}, torch.bfloat16),
        ({"batch": 1, "tokens": 4}, None),
    ],
    ids=["fixed-fp32-state", "varlen-bf16-state", "no-state"],
)
def test_opcheck_fwd(device: str, sizes: dict[str, object], state_dtype: torch.dtype | None) -> None:
    dim = _OPCHECK_HEAD_DIM[device]
    inputs = reference.random_inputs(
        **sizes, heads=2, head_dim_k=dim, head_dim_v=dim, initial_state_dtype=state_dtype, device=device
    )
    out = torch.zeros_like(inputs.v)
    final_state = None
    if state_dtype is not None:
        final_state = torch.zeros(inputs.state_shape(), dtype=state_dtype, device=device)
    args = (
        inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, inputs.scale, out, inputs.A_log, inputs.dt_bias,
        inputs.lower_bound, inputs.initial_state, final_state, inputs.cu_seqlens,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.flash_kda.fwd.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("l2norm_qk", "allow_neg_eigval", "state_v_first", "parameters"),
    [(True, False, False, True), (False, True, True, False)],
    ids=["k-first", "v-first-no-parameters"],
)
def test_opcheck_chunk_kda_forward(
    device: str, l2norm_qk: bool, allow_neg_eigval: bool, state_v_first: bool, parameters: bool
) -> None:
    inputs = _opcheck_inputs(device, _OPCHECK_HEAD_DIM[device])
    out = torch.zeros_like(inputs.v)
    final_state = torch.zeros(inputs.state_shape(), device=device)
    A_log, dt_bias = (inputs.A_log, inputs.dt_bias) if parameters else (None, None)
    args = (
        inputs.q, inputs.k, inputs.v, inputs.g, inputs.beta, inputs.scale, out, A_log, dt_bias,
        inputs.lower_bound, inputs.initial_state, final_state, inputs.cu_seqlens, l2norm_qk,
        allow_neg_eigval, state_v_first,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.flash_kda.chunk_kda_forward.default, args)


@requires_sm90
@pytest.mark.parametrize("initial", [torch.float32, torch.bfloat16])
def test_cuda_graph_chunk_kda_replay_matches_eager(initial: torch.dtype) -> None:
    """Captured once (outputs allocated inside the capture, from the graph's pool), replayed on new data.
    flash_kda.fwd's capture is test_cuda_forward.test_cuda_graph_replay_matches_eager."""
    shape = {"device": "cuda", "seqlens": [100, 0, 260], "initial": initial}
    static = chunk_kda_call(**shape, seed=4)
    fresh = chunk_kda_call(**shape, seed=5)  # same shapes, other values
    with torch.inference_mode():
        eager = flash_kda.chunk_kda(**fresh)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            flash_kda.chunk_kda(**static)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = flash_kda.chunk_kda(**static)
        for name, value in fresh.items():
            if isinstance(value, torch.Tensor):
                static[name].copy_(value)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    assert_near_gold(*captured, *chunk_kda_gold(fresh))
