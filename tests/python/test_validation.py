"""Every invalid flash_kda.fwd call raises FlashKDAError whose message starts with the argument's name.

The base problem has K = 32 ≠ V = 16 so that a state in the wrong layout ([N, H, K, V]) is detectable.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flash_kda
from conftest import requires_cuda
from flash_kda import FlashKDAError, _native, _ops, reference

B, T, H, K, V = 2, 8, 2, 32, 16


def valid_args(*, seqlens: list[int] | None = None, **overrides: object) -> dict[str, object]:
    """Keyword arguments of a valid fwd call (fixed B×T, or varlen), with `overrides` applied."""
    if seqlens is None:
        inputs = reference.random_inputs(
            batch=B, tokens=T, heads=H, head_dim_k=K, head_dim_v=V, initial_state_dtype=torch.float32
        )
    else:
        inputs = reference.random_inputs(
            seqlens=seqlens, heads=H, head_dim_k=K, head_dim_v=V, initial_state_dtype=torch.float32
        )
    args = inputs.fwd_kwargs()
    args["out"] = torch.empty_like(inputs.v)
    args["final_state"] = torch.empty(inputs.state_shape())
    args.update(overrides)
    return args


def expect_rejected(args: dict[str, object], name: str, *mentions: str) -> str:
    with pytest.raises(FlashKDAError) as info:
        flash_kda.fwd(**args)
    message = str(info.value)
    assert message.startswith(f"{name}:"), message
    for word in mentions:
        assert word in message, message
    return message


def test_valid_call_passes() -> None:
    flash_kda.fwd(**valid_args())
    flash_kda.fwd(**valid_args(seqlens=[3, 0, 5]))


def test_error_is_a_value_error() -> None:
    assert issubclass(FlashKDAError, ValueError)


# ---- dtypes ------------------------------------------------------------------------------------------
def test_wrong_dtype_data() -> None:
    expect_rejected(valid_args(q=torch.zeros(B, T, H, K, dtype=torch.int32)), "q", "int32")


def test_wrong_dtype_A_log() -> None:
    expect_rejected(valid_args(A_log=torch.zeros(H, dtype=torch.bfloat16)), "A_log", "bfloat16")


def test_dtype_flash_kda_cannot_describe() -> None:
    expect_rejected(valid_args(v=torch.zeros(B, T, H, V, dtype=torch.complex64)), "v", "complex64")


# ---- devices -----------------------------------------------------------------------------------------
def test_wrong_device() -> None:
    args = valid_args(seqlens=[3, 5])
    args["cu_seqlens"] = args["cu_seqlens"].to("meta")
    expect_rejected(args, "cu_seqlens", "meta", "cpu")


def test_tensors_on_different_devices_meta() -> None:
    args = valid_args()
    args["k"] = args["k"].to("meta")
    expect_rejected(args, "k", "meta", "cpu", "device of q")


@requires_cuda
def test_tensors_on_different_devices_cuda() -> None:
    args = valid_args()
    args["v"] = args["v"].cuda()
    expect_rejected(args, "v", "cuda", "cpu", "device of q")


# ---- shapes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("k", (B, T, H, K + 1)),
        ("v", (B, T + 1, H, V)),
        ("g", (B, T, H, V)),
        ("beta", (B, T, H + 1)),
        ("out", (B, T, H, V + 1)),
        ("A_log", (H + 1,)),
        ("dt_bias", (H, K + 1)),
    ],
)
def test_wrong_shape(name: str, shape: tuple[int, ...]) -> None:
    dtype = torch.float32 if name in ("A_log", "dt_bias") else torch.bfloat16
    expect_rejected(valid_args(**{name: torch.zeros(shape, dtype=dtype)}), name, "shape")


def test_initial_state_wrong_batch() -> None:
    expect_rejected(valid_args(initial_state=torch.zeros(B + 1, H, V, K)), "initial_state", "shape")


def test_final_state_key_first_layout() -> None:
    expect_rejected(valid_args(final_state=torch.zeros(B, H, K, V)), "final_state", "[N, HV, V, K]")


# ---- contiguity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["q", "g", "out"])
def test_non_contiguous_data(name: str) -> None:
    # Every other head of a wider tensor: innermost stride 1, but not contiguous.
    dim = V if name == "out" else K
    wide = torch.zeros(B, T, 2 * H, dim, dtype=torch.bfloat16)[:, :, ::2]
    assert wide.stride(-1) == 1 and not wide.is_contiguous()
    expect_rejected(valid_args(**{name: wide}), name, "contiguous")


def test_non_contiguous_state() -> None:
    state = torch.zeros(H, B, V, K).transpose(0, 1)
    expect_rejected(valid_args(final_state=state), "final_state", "contiguous")


# ---- the CUDA kernel's subset ------------------------------------------------------------------------
def test_cuda_target_rejects_head_dims_other_than_128() -> None:
    """C++ validation for the GPU, exercised on host memory (validation never dereferences the pointers)."""
    inputs = reference.random_inputs(tokens=T, heads=H, head_dim_k=64, head_dim_v=128)
    args = inputs.fwd_kwargs()
    problem = _ops.make_fwd_problem(out=torch.empty_like(inputs.v), final_state=None, **args)
    problem.struct.device = 1  # kCUDA
    with pytest.raises(FlashKDAError, match=r"^K: .*128"):
        _native.validate(problem, _native.Target.CUDA)


@requires_cuda
@pytest.mark.parametrize(("dim_k", "dim_v"), [(64, 128), (128, 64)])
def test_cuda_rejects_head_dims_other_than_128(dim_k: int, dim_v: int) -> None:
    inputs = reference.random_inputs(tokens=T, heads=H, head_dim_k=dim_k, head_dim_v=dim_v, device="cuda")
    with pytest.raises(FlashKDAError, match="^K: " if dim_k != 128 else "^V: "):
        flash_kda.fwd(out=torch.empty_like(inputs.v), **inputs.fwd_kwargs())


# ---- cu_seqlens --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int16, torch.float32])
def test_cu_seqlens_wrong_dtype(dtype: torch.dtype) -> None:
    args = valid_args(seqlens=[3, 5])
    args["cu_seqlens"] = args["cu_seqlens"].to(dtype)
    expect_rejected(args, "cu_seqlens", str(dtype).removeprefix("torch."))


@pytest.mark.parametrize(
    ("offsets", "mention"),
    [([1, 3, 8], "cu_seqlens[0] == 0"), ([0, 5, 3, 8], "non-decreasing"), ([0, 3, 7], "T = 8")],
    ids=["not-starting-at-0", "decreasing", "not-ending-at-T"],
)
def test_cu_seqlens_bad_values(offsets: list[int], mention: str) -> None:
    num_seqs = len(offsets) - 1
    args = valid_args(
        seqlens=[3, 5],
        cu_seqlens=torch.tensor(offsets),
        initial_state=None,
        final_state=torch.empty(num_seqs, H, V, K),
    )
    expect_rejected(args, "cu_seqlens", mention)


@pytest.mark.parametrize(
    ("offsets", "mention"),
    [([1, 3, 8], "cu_seqlens[0] == 0"), ([0, 5, 3, 8], "non-decreasing"), ([0, 3, 7], "== 8")],
    ids=["not-starting-at-0", "decreasing", "not-ending-at-T"],
)
def test_cu_seqlens_device_check_bad_values(offsets: list[int], mention: str) -> None:
    """The torch-op check the CUDA path runs (C++ cannot read device memory), run here on the CPU."""
    with pytest.raises(FlashKDAError, match=r"^cu_seqlens: ") as info:
        _ops.check_cu_seqlens_values(torch.tensor(offsets), 8)
    assert mention in str(info.value)


@pytest.mark.parametrize("offsets", [[0, 3, 3, 8], [0, 8], [0]], ids=["zero-length-member", "one", "none"])
def test_cu_seqlens_device_check_accepts_valid(offsets: list[int]) -> None:
    _ops.check_cu_seqlens_values(torch.tensor(offsets, dtype=torch.int32), offsets[-1])


# The values' check runs once per tensor and version (CheckedCuSeqlens): its device-to-host copy costs the
# GPU ~50 µs of idling per varlen call.
def test_checked_cu_seqlens_remembers_a_tensor_until_it_changes() -> None:
    checked = _ops.CheckedCuSeqlens()
    cu = torch.tensor([0, 3, 8])
    assert not checked.contains(cu, 8)
    checked.add(cu, 8)
    assert checked.contains(cu, 8)
    assert not checked.contains(cu, 9), "checked against another token count"
    assert not checked.contains(torch.tensor([0, 3, 8]), 8), "equal values, but another tensor"
    cu[1] = 3  # the same value, written in place: the version moves
    assert not checked.contains(cu, 8)
    checked.add(cu, 8)
    cu[1:].add_(0)  # through a view, which shares the version counter
    assert not checked.contains(cu, 8)


def test_checked_cu_seqlens_never_matches_a_dead_tensor_or_an_inference_tensor() -> None:
    checked = _ops.CheckedCuSeqlens()
    cu = torch.tensor([0, 3, 8])
    checked.add(cu, 8)
    del cu
    assert all(ref() is None for ref, _, _ in checked._entries), "held weakly"
    with torch.inference_mode():
        frozen = torch.tensor([0, 8])
    checked.add(frozen, 8)  # no version counter: not remembered
    assert not checked.contains(frozen, 8)


def test_check_cu_seqlens_once_checks_again_after_an_in_place_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ops, "_CHECKED_CU_SEQLENS", _ops.CheckedCuSeqlens())
    checks: list[list[int]] = []
    real = _ops.check_cu_seqlens_values
    monkeypatch.setattr(
        _ops, "check_cu_seqlens_values", lambda cu, tokens: (checks.append(cu.tolist()), real(cu, tokens))
    )
    cu = torch.tensor([0, 3, 8])
    _ops.check_cu_seqlens_once(cu, 8)
    _ops.check_cu_seqlens_once(cu, 8)
    assert checks == [[0, 3, 8]]
    cu[1] = 9
    with pytest.raises(FlashKDAError, match=r"^cu_seqlens: .*non-decreasing"):
        _ops.check_cu_seqlens_once(cu, 8)
    with pytest.raises(FlashKDAError, match=r"^cu_seqlens: .*non-decreasing"):
        _ops.check_cu_seqlens_once(cu, 8)  # a failed check is not remembered
    assert len(checks) == 3


@requires_cuda
def test_cuda_cu_seqlens_changed_in_place_after_a_call_is_rejected() -> None:
    inputs = reference.random_inputs(seqlens=[3, 5], heads=H, device="cuda")
    args = inputs.fwd_kwargs()
    args["out"] = torch.empty_like(inputs.v)
    flash_kda.fwd(**args)
    flash_kda.fwd(**args)  # the remembered tensor
    args["cu_seqlens"][1] = 9
    expect_rejected(args, "cu_seqlens", "non-decreasing")


def test_cu_seqlens_strided() -> None:
    args = valid_args(seqlens=[3, 5])
    args["cu_seqlens"] = torch.tensor([0, -1, 3, -1, 8])[::2]
    expect_rejected(args, "cu_seqlens", "stride")


def test_batch_not_one_with_cu_seqlens() -> None:
    args = valid_args(cu_seqlens=torch.tensor([0, 3, T]), initial_state=None, final_state=None)
    expect_rejected(args, "q", "cu_seqlens", "B = 1")


# ---- states ------------------------------------------------------------------------------------------
def test_state_dtype_mismatch() -> None:
    args = valid_args()
    args["initial_state"] = args["initial_state"].bfloat16()
    expect_rejected(args, "final_state", "initial_state")


def test_state_dtype_unsupported() -> None:
    expect_rejected(
        valid_args(initial_state=torch.zeros(B, H, V, K, dtype=torch.int32)), "initial_state", "int32"
    )


# ---- scalars -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lower_bound", [0.0, -6.0, math.nan])
def test_lower_bound_out_of_range(lower_bound: float) -> None:
    expect_rejected(valid_args(lower_bound=lower_bound), "lower_bound", "[-5, 0)")


def test_scale_not_finite() -> None:
    expect_rejected(valid_args(scale=math.inf), "scale", "finite")


# ---- non-tensor arguments ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value", "mention"),
    [
        ("q", [[0.0]], "torch.Tensor"),
        ("beta", np.zeros((B, T, H), dtype=np.float32), "torch.Tensor"),
        ("scale", "0.1", "float"),
        ("scale", True, "float"),
        ("lower_bound", None, "float"),
        ("initial_state", np.zeros((B, H, V, K), dtype=np.float32), "torch.Tensor or None"),
        ("cu_seqlens", [0, 8], "torch.Tensor or None"),
    ],
)
def test_non_tensor_arguments(name: str, value: object, mention: str) -> None:
    expect_rejected(valid_args(**{name: value}), name, mention)
