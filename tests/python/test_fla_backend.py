"""flash-linear-attention (FLA) reaching flash_kda: through flash_kda's own backend and through FLA's built-in
FlashKDA adapter, shown by FLA's routing log and by the results (fp64 gold), and what the backend refuses.

Runs without a GPU where FLA imports: flash_kda serves CPU tensors with its fp64 reference, so FLA's
dispatch can be followed end to end in CI. The GPU variants run the sm_90 kernel; the layer test compares
FLA's KimiDeltaAttention through this backend with the same layer on FLA's Triton path.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flash_kda
from chunk_calls import (
    KERNEL_TOLERANCE,
    REFUSED,
    SERVED,
    assert_near_gold,
    chunk_kda_call,
    chunk_kda_gold,
    served_call,
    unsupported_call,
)
from conftest import DEVICES, requires_sm90

fla_kda = pytest.importorskip("fla.ops.kda", reason="needs flash-linear-attention (pip install fla-core)")
from flash_kda import fla_backend  # noqa: E402  (needs FLA)

OWN = fla_backend.BACKEND_TYPE  # "flash_kda_native"
ADAPTER = "flash_kda"  # FLA's built-in FlashKDA backend


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """This backend registered, every switch at its default."""
    for variable in ("FLASH_KDA_FLA", "FLA_FLASH_KDA", "FLA_FLASH_KDA_NATIVE"):
        monkeypatch.delenv(variable, raising=False)
    flash_kda.register_fla_backend()


@pytest.fixture
def served_by(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which flash_kda entry FLA's dispatch reached, call by call: OWN (this package's backend) or ADAPTER
    (FLA's own FlashKDA backend, which calls flash_kda.fwd). Spies on flash_kda's side only."""
    calls: list[str] = []
    own_method = fla_backend.FlashKDABackend.chunk_kda
    fwd = flash_kda.fwd

    def own(self: object, *args: object, **kwargs: object) -> object:
        calls.append(OWN)
        return own_method(self, *args, **kwargs)

    def adapter_fwd(*args: object, **kwargs: object) -> None:
        calls.append(ADAPTER)
        fwd(*args, **kwargs)

    monkeypatch.setattr(fla_backend.FlashKDABackend, "chunk_kda", own)
    monkeypatch.setattr(flash_kda, "fwd", adapter_fwd)
    return calls


# ---- the verifier (FLA's public BaseBackend.verify) ----------------------------------------------------
@pytest.mark.parametrize("name", list(SERVED))
def test_verifier_accepts(name: str) -> None:
    with torch.inference_mode():
        assert fla_backend.FlashKDABackend().verify("chunk_kda", **served_call(name)) == (True, None)


@pytest.mark.parametrize("change", list(REFUSED))
def test_verifier_rejects_with_the_reason(change: str) -> None:
    accepted, reason = fla_backend.FlashKDABackend().verify("chunk_kda", **unsupported_call(change))
    assert not accepted and REFUSED[change] in reason, reason


def test_verifier_rejects_other_devices() -> None:
    call = {name: value.to("meta") if isinstance(value, torch.Tensor) else value for name, value in
            chunk_kda_call(tokens=4).items()}  # fmt: skip
    with torch.no_grad():
        accepted, reason = fla_backend.FlashKDABackend().verify("chunk_kda", **call)
    assert not accepted and reason == "flash_kda runs on CPU or CUDA tensors, got tensors on meta"


def test_verifier_rejects_positional_mistakes() -> None:
    accepted, reason = fla_backend.FlashKDABackend().verify("chunk_kda", torch.zeros(1))
    assert not accepted and "missing a required argument" in reason


def test_opt_out_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = fla_backend.FlashKDABackend()
    assert backend.is_available() and backend.is_enabled()
    monkeypatch.setenv("FLASH_KDA_FLA", "0")
    assert not backend.is_enabled()
    assert backend.priority < 3, "must be asked before FLA's own FlashKDA backend (priority 3)"


# ---- dispatch through FLA's chunk_kda --------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SERVED))
def test_fla_routes_to_own_backend(device: str, name: str, served_by: list[str]) -> None:
    call = served_call(name, device, seed=len(name) + 1)
    with torch.inference_mode():
        if "transpose_state_layout" in call:
            with pytest.warns(DeprecationWarning, match="state_v_first"):
                out, final_state = fla_kda.chunk_kda(**call)
        else:
            out, final_state = fla_kda.chunk_kda(**call)
    assert served_by == [OWN]
    assert (final_state is None) == (not call["output_final_state"])
    assert_near_gold(out, final_state, *chunk_kda_gold(call))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fla_builtin_adapter_routes_here(
    device: str, mode: str, served_by: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 5.1: with only FLA's own FlashKDA backend (this one off), FLA still runs flash_kda's kernel for
    the calls in that backend's subset: V-first fp32 state, A_log given, no allow_neg_eigval."""
    monkeypatch.setenv("FLASH_KDA_FLA", "0")
    call = chunk_kda_call(device=device, seqlens=[40, 0, 77], heads=3, state_v_first=True, seed=9)
    with getattr(torch, mode)():
        out, final_state = fla_kda.chunk_kda(**call)
    assert served_by == [ADAPTER]
    assert_near_gold(out, final_state, *chunk_kda_gold(call))


def test_calls_it_rejects_stay_with_fla(served_by: list[str]) -> None:
    """A call neither flash_kda backend takes reaches FLA's own checks (here its chunk_size error, raised
    before any kernel runs)."""
    call = chunk_kda_call(tokens=8, chunk_size=16)
    with torch.inference_mode(), pytest.raises(ValueError, match="`chunk_size` must be either 32 or 64"):
        fla_kda.chunk_kda(**call)
    assert served_by == []


# FLA logs each routing decision once per process: a fresh interpreter shows every line.
_ROUTING_SCRIPT = """
import logging, os, sys
import torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
from fla.ops.kda import chunk_kda
import flash_kda  # imported after fla.ops.kda: registers flash_kda's FLA backend
from chunk_calls import chunk_kda_call

call = chunk_kda_call(device=sys.argv[1], seqlens=[30, 0, 50], state_v_first=True, seed=21)
with torch.inference_mode():
    own = chunk_kda(**call)
    os.environ["FLASH_KDA_FLA"] = "0"  # now FLA's own FlashKDA backend
    adapter = chunk_kda(**call)
    del os.environ["FLASH_KDA_FLA"]
    try:
        chunk_kda(**dict(call, chunk_size=16, state_v_first=False))
    except ValueError as e:
        print("FLA raised:", e)
torch.save({"call": call, "own": own, "adapter": adapter}, sys.argv[2])
"""


@pytest.mark.parametrize("device", DEVICES)
def test_routing_log(device: str, tmp_path: Path) -> None:
    script = tmp_path / "route.py"
    script.write_text(_ROUTING_SCRIPT)
    results = tmp_path / "results.pt"
    run = subprocess.run(
        [sys.executable, str(script), device, str(results)],
        capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    log = [
        line.removeprefix("LOG ") for line in run.stdout.splitlines() if line.startswith("LOG [FLA Backend]")
    ]
    expected = [
        rf"\S*chunk_kda -> {OWN}",
        rf"\S*chunk_kda -> {ADAPTER}",
        rf"\S*chunk_kda -> {OWN} rejected: chunk_size must be 32 or 64 \(as for FLA\), got 16",
        rf"\S*chunk_kda -> {ADAPTER} rejected: FlashKDA requires state_v_first=True",
    ]
    for pattern in expected:
        assert any(re.fullmatch(r"\[FLA Backend\] " + pattern, line) for line in log), (pattern, log)
    assert "FLA raised: `chunk_size` must be either 32 or 64" in run.stdout
    saved = torch.load(results, weights_only=False)
    gold = chunk_kda_gold(saved["call"])
    assert_near_gold(*saved["own"], *gold)
    assert_near_gold(*saved["adapter"], *gold)


def _pythonpath() -> str:
    """This process's import path for the child: the package under test and this folder (chunk_calls)."""
    here = str(Path(__file__).parent)
    return ":".join(dict.fromkeys([here, *(p for p in sys.path if p)]))


# ---- FLA's KimiDeltaAttention layer ------------------------------------------------------------------------
@requires_sm90
def test_kimi_delta_attention_layer_matches_triton_path(
    served_by: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer in inference mode through this backend against the same layer on FLA's Triton path.

    Both paths are each within KERNEL_TOLERANCE of the fp64 gold at the chunk_kda level
    (test_cuda_forward.test_agrees_with_fla_triton_path), so by the triangle inequality their outputs may
    differ by twice that; the layer's RMSNorm and projections carry relative errors through unchanged
    to first order. Shapes: H = 4, K = V = 128, T = 1000 (one FLA autotune configuration).
    """
    layers = pytest.importorskip(
        "fla.layers.kda",
        reason="needs the flash-linear-attention package (fla.layers; fla-core holds only the ops) and transformers",
    )
    torch.manual_seed(0)
    layer = layers.KimiDeltaAttention(
        hidden_size=512, head_dim=128, num_heads=4, safe_gate=True, lower_bound=-5.0, layer_idx=0
    )
    layer = layer.to(device="cuda", dtype=torch.bfloat16).eval()  # A_log and dt_bias become bf16 too
    x = torch.randn(1, 1000, 512, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ours = layer(x)[0]
        assert served_by == [OWN]
        monkeypatch.setenv("FLASH_KDA_FLA", "0")
        monkeypatch.setenv("FLA_FLASH_KDA", "0")
        triton = layer(x)[0]
        assert served_by == [OWN], "the Triton run must not reach flash_kda"
    difference = ((ours.double() - triton.double()).norm() / triton.double().norm()).item()
    print(f"layer output: flash_kda vs FLA Triton relative difference {difference:.3e}")
    assert torch.isfinite(ours).all()
    assert difference <= 2 * KERNEL_TOLERANCE
