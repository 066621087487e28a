"""flash_kda.chunk_kda: FLA's signature and return contract, every call variant it serves checked against
the fp64 gold (on the CPU reference in CI, and on the sm_90 kernel), and the precise refusal of the rest."""

from __future__ import annotations

import pytest
import torch

import flash_kda
from chunk_calls import (
    REFUSED,
    SERVED,
    assert_near_gold,
    chunk_kda_call,
    chunk_kda_gold,
    served_call,
    unsupported_call,
)
from conftest import DEVICES
from flash_kda import FlashKDAError


def _run(call: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "transpose_state_layout" in call:
        with pytest.warns(DeprecationWarning, match="state_v_first"):
            return flash_kda.chunk_kda(**call)
    return flash_kda.chunk_kda(**call)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SERVED))
def test_matches_gold(device: str, name: str) -> None:
    call = served_call(name, device, seed=len(name))
    out, final_state = _run(call)
    gold_out, gold_state = chunk_kda_gold(call)
    if not call["output_final_state"]:
        assert final_state is None
    assert_near_gold(out, final_state, gold_out, gold_state)


@pytest.mark.parametrize("device", DEVICES)
def test_prenormalised_qk(device: str) -> None:
    """use_qk_l2norm_in_kernel=False: q and k come normalised (here by torch, as a caller would)."""
    call = chunk_kda_call(device=device, tokens=40, seed=3, use_qk_l2norm_in_kernel=False)
    for name in ("q", "k"):
        call[name] = torch.nn.functional.normalize(call[name].float(), dim=-1).to(torch.bfloat16)
    assert_near_gold(*flash_kda.chunk_kda(**call), *chunk_kda_gold(call))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_parameters_are_upcast_exactly(device: str) -> None:
    """A model cast to bf16 casts A_log and dt_bias with it: the result is that of their fp32 values."""
    call = chunk_kda_call(device=device, tokens=40, seed=4)
    call["A_log"], call["dt_bias"] = call["A_log"].bfloat16(), call["dt_bias"].bfloat16()
    out, final_state = flash_kda.chunk_kda(**call)
    as_fp32 = dict(call, A_log=call["A_log"].float(), dt_bias=call["dt_bias"].float())
    reference_out, reference_state = flash_kda.chunk_kda(**as_fp32)
    assert torch.equal(out, reference_out) and torch.equal(final_state, reference_state)
    assert_near_gold(out, final_state, *chunk_kda_gold(call))


@pytest.mark.parametrize("device", DEVICES)
def test_return_contract(device: str) -> None:
    """FLA's contract: o like v, fp32 final state [N, H, K, V] (V-first: [N, H, V, K]), inputs untouched."""
    for state_v_first in (False, True):
        call = chunk_kda_call(device=device, seqlens=[5, 9, 0], heads=3, state_v_first=state_v_first)
        before = {name: value.clone() for name, value in call.items() if isinstance(value, torch.Tensor)}
        out, final_state = flash_kda.chunk_kda(**call)
        assert out.shape == call["v"].shape and out.dtype == torch.bfloat16 and out.device == call["v"].device
        assert out.is_contiguous() and final_state.is_contiguous()
        assert final_state.shape == (3, 3, 128, 128) and final_state.dtype == torch.float32
        for name, value in before.items():
            assert torch.equal(call[name], value), f"{name} was modified"
        none_out = flash_kda.chunk_kda(**dict(call, output_final_state=False))
        assert isinstance(none_out, tuple) and len(none_out) == 2 and none_out[1] is None
        assert torch.equal(none_out[0], out)


def test_requires_grad_inputs_are_served_without_grad_mode() -> None:
    call = chunk_kda_call(tokens=12)
    call["q"].requires_grad_()
    with torch.no_grad():
        out, _ = flash_kda.chunk_kda(**call)
    with torch.inference_mode():
        inference_out, _ = flash_kda.chunk_kda(**call)
    assert not out.requires_grad and torch.equal(out, inference_out)


def test_non_contiguous_inputs_are_copied() -> None:
    call = chunk_kda_call(tokens=21, heads=2, seed=5)
    strided = dict(call)
    for name in ("q", "k", "v", "g"):  # the same values, as every other head of a wider tensor
        wide = torch.zeros(*call[name].shape[:2], 4, call[name].shape[3], dtype=torch.bfloat16)
        wide[:, :, ::2] = call[name]
        strided[name] = wide[:, :, ::2]
        assert not strided[name].is_contiguous()
    expected = flash_kda.chunk_kda(**call)
    got = flash_kda.chunk_kda(**strided)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("change", list(REFUSED))
def test_refuses_with_the_reason(change: str) -> None:
    with pytest.raises(FlashKDAError) as info:
        flash_kda.chunk_kda(**unsupported_call(change))
    message = str(info.value)
    assert message.startswith("flash_kda.chunk_kda: ") and REFUSED[change] in message, message
