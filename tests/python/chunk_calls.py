"""FLA-style chunk_kda calls shared by test_chunk_kda, test_fla_backend and test_torch_integration: inputs,
their fp64 gold, the variants flash_kda serves and those it refuses (with the reason it gives)."""

from __future__ import annotations

import torch

from flash_kda import reference

# The GPU kernel's accuracy bound against the fp64 gold (relative RMSE), as in test_cuda_forward.py.
KERNEL_TOLERANCE = 5e-3
# The CPU path is the C++ fp64 recurrence: only the final rounding counts (see cli._TOLERANCES).
CPU_TOLERANCE = {"out": 2.0**-8, "state": 1e-6}


def chunk_kda_call(
    *,
    device: str = "cpu",
    heads: int = 2,
    tokens: int | None = None,
    batch: int = 1,
    seqlens: list[int] | None = None,
    initial: torch.dtype | None = torch.float32,
    state_v_first: bool = False,
    seed: int = 0,
    **overrides: object,
) -> dict[str, object]:
    """Keyword arguments of an FLA-style chunk_kda call that flash_kda serves: fresh random bf16 inputs
    (reference.random_inputs), K = V = 128, dt_bias flat [H·K] and the state in FLA's layout (K-first
    unless state_v_first). `overrides` replace or add arguments (e.g. allow_neg_eigval=True)."""
    inputs = reference.random_inputs(
        heads=heads, tokens=tokens, seqlens=seqlens, batch=batch, initial_state_dtype=initial, device=device,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    initial_state = inputs.initial_state
    if initial_state is not None and not state_v_first:
        initial_state = initial_state.transpose(-1, -2).contiguous()
    call = {
        "q": inputs.q, "k": inputs.k, "v": inputs.v, "g": inputs.g, "beta": inputs.beta,
        "initial_state": initial_state, "output_final_state": True, "use_qk_l2norm_in_kernel": True,
        "use_gate_in_kernel": True, "use_beta_sigmoid_in_kernel": True, "safe_gate": True,
        "lower_bound": inputs.lower_bound, "state_v_first": state_v_first, "cu_seqlens": inputs.cu_seqlens,
        "A_log": inputs.A_log, "dt_bias": inputs.dt_bias.flatten(),
    }  # fmt: skip
    call.update(overrides)
    return call


def chunk_kda_gold(call: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 (out, final state) of an FLA-style call, from the pure-torch recurrence, with the final state in
    the call's layout."""
    v_first = bool(call.get("state_v_first") or call.get("transpose_state_layout"))
    initial_state = call.get("initial_state")
    if initial_state is not None and not v_first:
        initial_state = initial_state.transpose(-1, -2)
    q = call["q"]
    scale = call.get("scale") or q.shape[-1] ** -0.5
    out, state = reference.kda_forward(
        q, call["k"], call["v"], call["g"], call["beta"], scale, call.get("A_log"), call.get("dt_bias"),
        call["lower_bound"], initial_state, call.get("cu_seqlens"),
        l2norm_qk=call["use_qk_l2norm_in_kernel"], allow_neg_eigval=call.get("allow_neg_eigval", False),
    )  # fmt: skip
    return out, state if v_first else state.transpose(-1, -2)


def assert_near_gold(
    out: torch.Tensor, final_state: torch.Tensor | None, gold_out: torch.Tensor, gold_state: torch.Tensor
) -> None:
    """Relative error against the fp64 gold within the bound of the device's path (CPU: rounding only)."""
    cpu = out.device.type == "cpu"
    tolerance = CPU_TOLERANCE["out"] if cpu else KERNEL_TOLERANCE
    assert torch.isfinite(out).all(), "out has NaN/Inf"
    error = reference.relative_error(out.cpu(), gold_out.cpu())
    assert error <= tolerance, f"out: relative error {error:.3e} > {tolerance:.1e}"
    if final_state is not None:
        tolerance = CPU_TOLERANCE["state"] if cpu else KERNEL_TOLERANCE
        assert torch.isfinite(final_state).all(), "final_state has NaN/Inf"
        error = reference.relative_error(final_state.cpu(), gold_state.cpu())
        assert error <= tolerance, f"final_state: relative error {error:.3e} > {tolerance:.1e}"


# Each a variant FLA's chunk_kda takes and flash_kda serves (arguments for chunk_kda_call).
SERVED = {
    "fla-defaults-fixed": dict(batch=2, tokens=33),
    "v-first-varlen": dict(seqlens=[17, 0, 40, 1], state_v_first=True),
    "deprecated-transpose-spelling": dict(tokens=20, transpose_state_layout=True),
    "neg-eigval": dict(tokens=30, allow_neg_eigval=True),
    "no-A_log-no-dt_bias": dict(tokens=30, A_log=None, dt_bias=None),
    "bf16-initial-state": dict(tokens=30, initial=torch.bfloat16),
    "bf16-initial-state-no-final": dict(tokens=30, initial=torch.bfloat16, output_final_state=False),
    "no-states": dict(tokens=30, initial=None, output_final_state=False),
    "fp32-final-from-zero": dict(seqlens=[3, 64], initial=None),
    "explicit-scale": dict(tokens=19, scale=0.3),
    "chunk-size-32": dict(tokens=19, chunk_size=32),
}


def served_call(name: str, device: str = "cpu", seed: int = 0) -> dict[str, object]:
    """The call SERVED[name] on `device`."""
    overrides = dict(SERVED[name])
    if overrides.pop("transpose_state_layout", False):  # a V-first state under the deprecated name
        call = chunk_kda_call(device=device, seed=seed, state_v_first=True, **overrides)
        call["transpose_state_layout"] = call.pop("state_v_first")
        return call
    return chunk_kda_call(device=device, seed=seed, **overrides)


def unsupported_call(change: str) -> dict[str, object]:
    """A call flash_kda must refuse, one change away from a served one (CPU tensors)."""
    call = chunk_kda_call(tokens=8)
    q = call["q"]
    changes: dict[str, dict[str, object]] = {
        "fp16-data": {"q": q.half()},
        "K=64": {"q": q[..., :64], "k": call["k"][..., :64], "g": call["g"][..., :64]},
        "V=64": {"v": call["v"][..., :64]},
        "GVA": {"v": call["v"].repeat(1, 1, 2, 1), "g": call["g"].repeat(1, 1, 2, 1)},
        "precomputed-gate": {"use_gate_in_kernel": False},
        "softplus-gate": {"safe_gate": False},
        "no-lower-bound": {"lower_bound": None},
        "lower-bound-out-of-range": {"lower_bound": -6.0},
        "beta-already-sigmoid": {"use_beta_sigmoid_in_kernel": False},
        "cp_context": {"cp_context": object()},
        "intermediate-states": {"return_intermediate_states": True},
        "fp16-initial-state": {"initial_state": call["initial_state"].half()},
        "both-layout-spellings": {"state_v_first": True, "transpose_state_layout": True},
        "chunk_size=16": {"chunk_size": 16},
        "unknown-keyword": {"use_magic": True},
        "integer-A_log": {"A_log": torch.ones(2, dtype=torch.int64)},
        "q-not-a-tensor": {"q": [1.0]},
        "requires-grad": {"g": call["g"].clone().requires_grad_()},
    }
    return dict(call, **changes[change])


REFUSED = {
    "fp16-data": "q: the kernel reads bfloat16, got torch.float16",
    "K=64": "K = V = 128 only, got K = 64, V = 128",
    "V=64": "K = V = 128 only, got K = 128, V = 64",
    "GVA": "GVA is not supported: v has 4 heads, q has 2",
    "precomputed-gate": "needs use_gate_in_kernel=True",
    "softplus-gate": "needs safe_gate=True and a lower_bound",
    "no-lower-bound": "needs safe_gate=True and a lower_bound",
    "lower-bound-out-of-range": "lower_bound must lie in [-5, 0), got -6.0",
    "beta-already-sigmoid": "needs use_beta_sigmoid_in_kernel=True",
    "cp_context": "context parallelism (cp_context) is not supported",
    "intermediate-states": "return_intermediate_states=True is not supported",
    "fp16-initial-state": "initial_state: expected float32 or bfloat16, got torch.float16",
    "both-layout-spellings": "either state_v_first or the deprecated transpose_state_layout, not both",
    "chunk_size=16": "chunk_size must be 32 or 64 (as for FLA), got 16",
    "unknown-keyword": "unexpected keyword arguments ['use_magic']",
    "integer-A_log": "A_log: expected float32, bfloat16 or float16, got torch.int64",
    "q-not-a-tensor": "q: expected a torch.Tensor, got list",
    "requires-grad": "g requires grad: flash_kda is forward-only",
}
