"""The GPU forward (sm_90a) against the fp64 gold of the C++ reference, and its contract.

Tolerance: relative RMSE ‖x − gold‖ / ‖gold‖ ≤ 5e-3 for `out` and the final state, over the whole output and
over every window of 1024 tokens (so that drift of the state along T shows). All tests skip without an sm_90
GPU; run them on an H100 (scripts/device_gpu_suite.sh).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

import flash_kda
from flash_kda import _native

TOLERANCE = 5e-3
WINDOW = 1024
K = V = 128


def _sm90_ready() -> bool:
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() == (9, 0)
        and "90a" in flash_kda.cuda_architectures()
    )


pytestmark = pytest.mark.skipif(
    not _sm90_ready(), reason="needs an sm_90 GPU (H100/H200) and a flash_kda build with sm_90a code"
)


# ---- inputs ------------------------------------------------------------------------------------------
@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    A_log: torch.Tensor | None
    dt_bias: torch.Tensor | None
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    scale: float = K**-0.5
    lower_bound: float = -5.0

    @property
    def num_sequences(self) -> int:
        return self.q.shape[0] if self.cu_seqlens is None else self.cu_seqlens.numel() - 1


def make_case(
    *,
    batch: int = 1,
    tokens: int | None = None,
    seqlens: list[int] | None = None,
    heads: int = 2,
    gate_sigma: float = 1.0,
    beta_range: float = 4.0,
    initial_state: str | None = "fp32",
    initial_norm: float = 10.0,
    cu_dtype: torch.dtype = torch.int64,
    lower_bound: float = -5.0,
    seed: int = 0,
) -> Case:
    """Fresh random inputs (never zeros). seqlens → varlen with B = 1; else B × tokens."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if seqlens is not None:
        batch, tokens = 1, sum(seqlens)
        cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=cu_dtype, device="cuda")
    else:
        cu = None
    assert tokens is not None
    shape = (batch, tokens, heads, K)

    def randn(*s: int, sigma: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return (sigma * torch.randn(*s, generator=gen, device="cuda")).to(dtype)

    n = batch if cu is None else len(seqlens)  # type: ignore[arg-type]
    state = None
    if initial_state is not None:
        s = torch.randn(n, heads, V, K, generator=gen, device="cuda")
        s = s * (initial_norm / s.flatten(2).norm(dim=-1)[..., None, None])  # each head's state has this norm
        state = s.to(torch.float32 if initial_state == "fp32" else torch.bfloat16)
    beta = ((torch.rand(batch, tokens, heads, generator=gen, device="cuda") * 2 - 1) * beta_range).to(
        torch.bfloat16
    )
    return Case(
        q=randn(*shape),
        k=randn(*shape),
        v=randn(*shape),
        g=randn(*shape, sigma=gate_sigma),
        beta=beta,
        A_log=randn(heads, sigma=0.5, dtype=torch.float32),
        dt_bias=randn(heads, K, sigma=0.5, dtype=torch.float32),
        initial_state=state,
        cu_seqlens=cu,
        lower_bound=lower_bound,
    )


# ---- running -----------------------------------------------------------------------------------------
def options(case: Case, **overrides: int) -> _native.ForwardOptions:
    fields = dict(
        scale=case.scale,
        l2norm_qk=1,
        gate=_native.GateMode.LOWER_BOUND,
        lower_bound=case.lower_bound,
        beta=_native.BetaMode.SIGMOID,
        state_layout=_native.StateLayout.VALUE_FIRST,
    )
    fields.update(overrides)
    return _native.ForwardOptions(**fields)


def gold(case: Case, **option_overrides: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 token-by-token recurrence (C++ reference, CPU) on exactly the kernel's inputs."""

    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().cpu()

    out = torch.empty(case.v.shape, dtype=torch.float64)
    state = torch.empty(case.num_sequences, case.q.shape[2], V, K, dtype=torch.float64)
    problem = _native.make_problem(
        q=cpu(case.q),
        k=cpu(case.k),
        v=cpu(case.v),
        g=cpu(case.g),
        beta=cpu(case.beta),
        out=out,
        A_log=cpu(case.A_log),
        dt_bias=cpu(case.dt_bias),
        initial_state=cpu(case.initial_state),
        final_state=state,
        cu_seqlens=cpu(case.cu_seqlens),
        options=options(case, **option_overrides),
    )
    _native.reference_forward(problem)
    return out, state


def run_gpu(
    case: Case, final_dtype: torch.dtype | None = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flash_kda.fwd with outputs poisoned by NaN first, so an element the kernel skips fails the check."""
    out = torch.full_like(case.v, float("nan"))
    final = None
    if final_dtype is not None:
        final = torch.full(
            (case.num_sequences, case.q.shape[2], V, K), float("nan"), dtype=final_dtype, device="cuda"
        )
    flash_kda.fwd(
        case.q,
        case.k,
        case.v,
        case.g,
        case.beta,
        case.scale,
        out,
        case.A_log,
        case.dt_bias,
        case.lower_bound,
        initial_state=case.initial_state,
        final_state=final,
        cu_seqlens=case.cu_seqlens,
    )
    return out, final


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


def assert_matches_gold(
    out: torch.Tensor,
    final: torch.Tensor | None,
    gold_out: torch.Tensor,
    gold_state: torch.Tensor,
    tolerance: float = TOLERANCE,
) -> None:
    assert torch.isfinite(out).all(), "out has NaN/Inf (an unwritten element keeps its NaN poison)"
    err = relative_error(out, gold_out)
    assert err <= tolerance, f"out: relative error {err:.3e} > {tolerance:.1e}"
    # Window by window along T (per batch row), so that drift of the state shows.
    out_rows, gold_rows = out.detach().double().cpu(), gold_out
    for b in range(out_rows.shape[0]):
        for start in range(0, out_rows.shape[1], WINDOW):
            ref = gold_rows[b, start : start + WINDOW]
            if ref.norm() == 0:
                continue
            w_err = relative_error(out_rows[b, start : start + WINDOW], ref)
            assert w_err <= tolerance, f"out[{b}, {start}:{start + WINDOW}]: relative error {w_err:.3e}"
    if final is not None:
        assert torch.isfinite(final).all(), "final_state has NaN/Inf"
        s_err = relative_error(final, gold_state)
        assert s_err <= tolerance, f"final_state: relative error {s_err:.3e} > {tolerance:.1e}"


# ---- accuracy ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 63, 64, 65, 1000, 8192])
def test_lengths_match_gold(tokens: int) -> None:
    case = make_case(tokens=tokens, heads=2, seed=tokens)
    out, final = run_gpu(case)
    assert_matches_gold(out, final, *gold(case))


@pytest.mark.parametrize("schedule", ["auto", "trio"])
def test_long_sequence_no_drift(schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """65 536 tokens: auto takes `grid` here; `trio` keeps a 16-token schedule on a long sequence (auto runs
    those for long sequences with more than 44 pairs)."""
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", schedule)
    case = make_case(tokens=65536, heads=1, seed=3)
    out, final = run_gpu(case)
    assert_matches_gold(out, final, *gold(case))


@pytest.mark.parametrize("initial_state", [None, "fp32"])
def test_extreme_inputs(initial_state: str | None) -> None:
    """raw g ~ N(0, 8), beta logits in ±10, initial states of norm 10."""
    case = make_case(
        tokens=1000, heads=2, gate_sigma=8.0, beta_range=10.0, initial_state=initial_state, seed=11
    )
    out, final = run_gpu(case)
    assert_matches_gold(out, final, *gold(case))


@pytest.mark.parametrize("lower_bound", [-1.0, -0.01])
def test_other_lower_bounds(lower_bound: float) -> None:
    case = make_case(tokens=300, heads=2, lower_bound=lower_bound, seed=5)
    out, final = run_gpu(case)
    assert_matches_gold(out, final, *gold(case))


@pytest.mark.parametrize("cu_dtype", [torch.int64, torch.int32])
def test_varlen_with_zero_length_members(cu_dtype: torch.dtype) -> None:
    seqlens = [0, 1, 300, 0, 17, 1000, 64, 15, 0]
    case = make_case(seqlens=seqlens, heads=3, cu_dtype=cu_dtype, seed=7)
    out, final = run_gpu(case)
    gold_out, gold_state = gold(case)
    assert_matches_gold(out, final, gold_out, gold_state)
    # A zero-length sequence hands its initial state through unchanged.
    for n, length in enumerate(seqlens):
        if length == 0:
            assert torch.equal(final[n], case.initial_state[n])  # type: ignore[index]


def test_many_short_sequences() -> None:
    gen = torch.Generator().manual_seed(1)
    seqlens = torch.randint(0, 40, (2000,), generator=gen).tolist()
    case = make_case(seqlens=seqlens, heads=2, seed=2)
    out, final = run_gpu(case)
    assert_matches_gold(out, final, *gold(case))


@pytest.mark.parametrize("heads", [1, 3, 32, 96])
def test_head_counts(heads: int) -> None:
    case = make_case(batch=2, tokens=40, heads=heads, seed=heads)
    out, final = run_gpu(case)
    assert_matches_gold(out, final, *gold(case))


@pytest.mark.parametrize(
    ("initial", "final_dtype"),
    [
        (None, None),
        (None, torch.float32),
        ("fp32", None),
        ("bf16", torch.bfloat16),
        ("bf16", None),
        (None, torch.bfloat16),
    ],
)
def test_state_presence_and_dtypes(initial: str | None, final_dtype: torch.dtype | None) -> None:
    case = make_case(batch=2, tokens=100, heads=2, initial_state=initial, seed=13)
    out, final = run_gpu(case, final_dtype=final_dtype)
    gold_out, gold_state = gold(case)
    assert_matches_gold(out, final, gold_out, gold_state)


def _native_problem(
    case: Case, state_layout: int, **overrides: int
) -> tuple[_native.Problem, torch.Tensor, torch.Tensor]:
    """The native API's problem for `case`, with its out and final state (poisoned by NaN)."""
    out = torch.full_like(case.v, float("nan"))
    final = torch.full((case.num_sequences, case.q.shape[2], V, K), float("nan"), device="cuda")
    problem = _native.make_problem(
        q=case.q,
        k=case.k,
        v=case.v,
        g=case.g,
        beta=case.beta,
        out=out,
        A_log=case.A_log,
        dt_bias=case.dt_bias,
        initial_state=case.initial_state,
        final_state=final,
        cu_seqlens=case.cu_seqlens,
        options=options(case, state_layout=state_layout, **overrides),
    )
    return problem, out, final


def _run_native(
    case: Case, state_layout: int, *, workspace: bool = True, workspace_short_by: int = 0, **overrides: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Through the native API, with the workspace cuda_workspace_bytes asks for (none if not `workspace`;
    `workspace_short_by` bytes fewer if given)."""
    problem, out, final = _native_problem(case, state_layout, **overrides)
    nbytes = max(_native.cuda_workspace_bytes(problem) - workspace_short_by, 0) if workspace else 0
    scratch = torch.empty(nbytes, dtype=torch.uint8, device="cuda") if nbytes > 0 else None
    stream = torch.cuda.current_stream().cuda_stream
    _native.cuda_forward(problem, stream, scratch.data_ptr() if scratch is not None else 0, nbytes)
    return out, final


@pytest.mark.parametrize("schedule", ["auto", "grid"])
def test_key_first_state_layout(schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", schedule)
    case = make_case(tokens=200, heads=2, seed=17)
    case = replace(case, initial_state=case.initial_state.transpose(-1, -2).contiguous())  # type: ignore[union-attr]
    out, final = _run_native(case, _native.StateLayout.KEY_FIRST)
    assert_matches_gold(out, final, *gold(case, state_layout=_native.StateLayout.KEY_FIRST))


@pytest.mark.parametrize("schedule", ["auto", "grid"])
@pytest.mark.parametrize("overrides", [{"beta": _native.BetaMode.TWO_SIGMOID}, {"l2norm_qk": 0}])
def test_option_variants(overrides: dict[str, int], schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The options through the native API; `grid` (32-token chunks) has a preparation of its own."""
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", schedule)
    case = make_case(tokens=150, heads=2, seed=19)
    if overrides.get("l2norm_qk") == 0:  # pre-normalised inputs, as a caller that normalised itself passes
        case = replace(
            case,
            q=torch.nn.functional.normalize(case.q.float(), dim=-1).bfloat16(),
            k=torch.nn.functional.normalize(case.k.float(), dim=-1).bfloat16(),
        )
    out, final = _run_native(case, _native.StateLayout.VALUE_FIRST, **overrides)
    assert_matches_gold(out, final, *gold(case, **overrides))


@pytest.mark.parametrize("schedule", ["auto", "grid"])
def test_no_A_log_no_dt_bias(schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", schedule)
    case = replace(make_case(tokens=100, heads=2, seed=23), A_log=None, dt_bias=None)
    out, final = _run_native(case, _native.StateLayout.VALUE_FIRST)
    assert_matches_gold(out, final, *gold(case))


# ---- schedules: every way of spreading the pairs over the GPU computes the same bits --------------------
SCHEDULES = ("whole", "split", "pair", "trio", "cluster")
SCHEDULE_CASES = {
    "varlen-zero-length": dict(seqlens=[0, 1, 300, 0, 17, 1000, 64, 15, 0], heads=3, seed=71),
    "extreme-no-state": dict(tokens=1000, heads=2, gate_sigma=8.0, beta_range=10.0, initial_state=None, seed=73),
    "bf16-state-batch": dict(batch=2, tokens=333, heads=2, initial_state="bf16", seed=79),
    "long": dict(tokens=5000, heads=1, seed=83),
}


@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_every_schedule_matches_gold_and_each_other(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLASH_KDA_SM90_SCHEDULE forces each schedule (one CTA per pair; two CTAs of 64 value rows, alone or
    as a cluster that prepares each chunk once; the clusters of 2 state CTAs + 1 or 2 producer CTAs, where
    trio's teams take chunks by ticket, so which team prepares a chunk varies from call to call): each
    against the gold, and all bit for bit alike, since every value row goes through the same arithmetic
    whichever CTA runs it (a race in one hand-over would break that)."""
    case = make_case(**SCHEDULE_CASES[name])
    final_dtype = None if case.initial_state is None else case.initial_state.dtype
    gold_out, gold_state = gold(case)
    results = {}
    for schedule in SCHEDULES:
        monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", schedule)
        out, final = run_gpu(case, final_dtype=final_dtype or torch.float32)
        assert_matches_gold(out, final, gold_out, gold_state)
        results[schedule] = (out, final)
    for schedule in SCHEDULES[1:]:
        for i, what in enumerate(("out", "final_state")):
            a, b = results["whole"][i], results[schedule][i]
            assert torch.equal(a, b), (
                f"{what}: schedule {schedule} differs from whole, max |diff| {(a.float() - b.float()).abs().max():.3e}"
            )


def test_unknown_schedule_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "fastest")
    case = make_case(tokens=20, heads=1, seed=89)
    with pytest.raises(flash_kda.FlashKDAError, match="FLASH_KDA_SM90_SCHEDULE: expected one of auto, whole"):
        run_gpu(case)


# ---- the grid schedule: 32-token chunks through an L2 ring (rounds differently: gold, not bits) ------------
@pytest.fixture
def grid_schedule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "grid")


def _assert_matches_gold_and_itself(case: Case) -> None:
    """Against the gold, and twice with the same bits: which team prepares a chunk varies from call to call,
    but not its arithmetic, so a race in the hand-over (a slot overwritten before its load, a flag seen
    before the data) would show as a difference."""
    final_dtype = None if case.initial_state is None else case.initial_state.dtype
    first = run_gpu(case, final_dtype=final_dtype or torch.float32)
    assert_matches_gold(*first, *gold(case))
    second = run_gpu(case, final_dtype=final_dtype or torch.float32)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(SCHEDULE_CASES))
def test_grid_matches_gold_and_itself(name: str, grid_schedule: None) -> None:
    """Each schedule case (_assert_matches_gold_and_itself)."""
    _assert_matches_gold_and_itself(make_case(**SCHEDULE_CASES[name]))


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000, 8192])
def test_grid_lengths_match_gold(tokens: int, grid_schedule: None) -> None:
    """Partial 32-token chunks: an empty or partial second block, and a partial first one."""
    case = make_case(tokens=tokens, heads=2, seed=tokens + 1)
    assert_matches_gold(*run_gpu(case), *gold(case))


@pytest.mark.parametrize(
    ("heads", "tokens", "lower_bound"),
    [(32, 2048, -5.0), (8, 4096, -5.0), (16, 2048, -0.01), (1, 65536, -5.0)],
)
def test_grid_many_heads_and_long_sequences(
    heads: int, tokens: int, lower_bound: float, grid_schedule: None
) -> None:
    """The L2 ring wraps many times; up to 32 pairs share the producer SMs; a weak decay (−0.01) carries the
    state across many chunks, so that an error in the carried state shows."""
    case = make_case(tokens=tokens, heads=heads, lower_bound=lower_bound, seed=heads + tokens)
    assert_matches_gold(*run_gpu(case), *gold(case))


def test_grid_few_producer_sms_many_pairs(grid_schedule: None) -> None:
    """5·SMs/11 + 1 heads: the producer CTAs' teams alone (4 per SM) would be fewer than the pairs; the state
    teams (grid_state_teams) are most of the teams."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = make_case(tokens=300, heads=5 * sms // 11 + 1, seed=113)
    assert_matches_gold(*run_gpu(case), *gold(case))


def test_grid_state_teams_match_gold_and_itself(grid_schedule: None) -> None:
    """SMs/4 pairs leave fewer than 2.5 producer SMs per pair, so warpgroup 1 of every state CTA is a
    producer team too (grid_state_teams): 64 chunks per pair for 33 pairs (132 SMs), against the gold and
    twice with the same bits."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _assert_matches_gold_and_itself(make_case(tokens=2048, heads=sms // 4, seed=127))


@pytest.mark.parametrize("pairs_of_sms", ["sixteen", "quarter"])
def test_grid_state_teams_on_and_off_give_the_same_bits(
    pairs_of_sms: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLASH_KDA_SM90_GRID_STATE_TEAMS forces the state teams on (16 pairs: grid_state_teams says off)
    or off (SMs/4 pairs: it says on): a chunk's arithmetic does not depend on which team prepares it, so
    both give the same bits, and a state team that wrote a wrong chunk (its stage, its ticket, its flag)
    would show."""
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "grid")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    heads = 16 if pairs_of_sms == "sixteen" else sms // 4
    case = make_case(tokens=2048, heads=heads, seed=157 + heads)
    results = {}
    for state_teams in ("on", "off"):
        monkeypatch.setenv("FLASH_KDA_SM90_GRID_STATE_TEAMS", state_teams)
        results[state_teams] = run_gpu(case)
    assert_matches_gold(*results["on"], *gold(case))
    for i in range(2):
        assert torch.equal(results["on"][i], results["off"][i])  # type: ignore[arg-type]


def test_unknown_state_teams_setting_is_an_error(
    grid_schedule: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASH_KDA_SM90_GRID_STATE_TEAMS", "maybe")
    case = make_case(tokens=100, heads=2, seed=163)
    message = "FLASH_KDA_SM90_GRID_STATE_TEAMS: expected one of auto, on, off"
    with pytest.raises(flash_kda.FlashKDAError, match=message):
        run_gpu(case)


def test_grid_needs_its_workspace(grid_schedule: None) -> None:
    case = make_case(tokens=100, heads=2, seed=101)
    with pytest.raises(flash_kda.FlashKDAError, match="workspace: the grid schedule needs"):
        _run_native(case, _native.StateLayout.VALUE_FIRST, workspace=False)


def test_grid_with_too_many_pairs_is_an_error(grid_schedule: None) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = make_case(tokens=20, heads=sms // 2, seed=103)
    message = r"FLASH_KDA_SM90_SCHEDULE=grid: needs 2 \* N \* H < "
    with pytest.raises(flash_kda.FlashKDAError, match=message):
        run_gpu(case)


def test_grid_cuda_graph_replay_matches_eager(grid_schedule: None) -> None:
    """The launch zeroes the workspace's counters (cudaMemsetAsync) and launches cooperatively: both are
    captured; the second replay starts from the counters the first one left."""
    _check_graph_replay_matches_eager(eager_seed=107, static_seed=109, replays=2)


def _workspace_bytes(case: Case) -> int:
    problem, _, _ = _native_problem(case, _native.StateLayout.VALUE_FIRST)
    return _native.cuda_workspace_bytes(problem)


def _check_auto_choice(
    case_args: dict[str, object], grid: bool, monkeypatch: pytest.MonkeyPatch, *, against_gold: bool
) -> None:
    """auto's choice for the case: a workspace asked for exactly where it takes `grid`, and the bits of
    forced `grid` there, of `whole` elsewhere. `grid` is the expectation on 132 SMs (H100 SXM, H200); on
    other GPUs the same tiers of SMs per pair (schedule_choice.hpp) decide, so that a smaller GPU expects
    its 16-token schedule."""
    monkeypatch.delenv("FLASH_KDA_SM90_SCHEDULE", raising=False)
    seqlens = case_args.get("seqlens")
    if isinstance(seqlens, list):
        pairs = len(seqlens) * int(case_args["heads"])  # type: ignore[call-overload]
        tokens = sum(seqlens) // len(seqlens)
    else:
        pairs = int(case_args.get("batch", 1)) * int(case_args["heads"])  # type: ignore[call-overload]
        tokens = int(case_args["tokens"])  # type: ignore[call-overload]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiers = [(1024, 55), (1536, 41), (2048, 38), (4096, 33), (8192, 30)]
    grid = grid and any(tokens >= least and 10 * sms >= tenths * pairs for least, tenths in tiers)
    case = make_case(**case_args)  # type: ignore[arg-type]
    assert (_workspace_bytes(case) > 0) == grid
    auto = run_gpu(case)
    if against_gold:
        assert_matches_gold(*auto, *gold(case))
    else:
        assert torch.isfinite(auto[0]).all()
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "grid" if grid else "whole")
    forced = run_gpu(case)
    assert torch.equal(auto[0], forced[0]) and torch.equal(auto[1], forced[1])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case_args", "grid"),
    [
        (dict(tokens=2048, heads=4, seed=127), True),
        (dict(tokens=1024, heads=4, seed=163), True),
        (dict(tokens=1023, heads=4, seed=137), False),
        (dict(seqlens=[2500, 0, 2000, 4000], heads=2, seed=131), True),  # 2125 tokens per sequence on average
        (dict(seqlens=[1300, 0, 1000, 1700], heads=2, seed=133), False),  # 1000 (1333 without the 0)
        (dict(tokens=2048, heads=16, seed=141), True),
        (dict(tokens=1535, heads=25, seed=143), False),  # 25 pairs: a token short of 1536
        (dict(tokens=1536, heads=25, seed=165), True),
        (dict(tokens=2048, heads=17, seed=151), True),
        (dict(tokens=2048, heads=32, seed=145), True),  # with the state teams (grid_state_teams)
        (dict(batch=2, tokens=2048, heads=8, seed=147), True),  # tokens per sequence, not per batch
    ],
)
def test_auto_takes_grid_for_few_long_sequences(
    case_args: dict[str, object], grid: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto runs `grid` from 1024 tokens per sequence on average at 5.5 SMs per pair or more, from 1536
    at 4.1, from 2048 at 3.8, from 4096 at 3.3, from 8192 at 3.0 (it then asks for a workspace, and its bits
    are grid's), and a 16-token schedule otherwise (no workspace, the bits of `whole`)."""
    _check_auto_choice(case_args, grid, monkeypatch, against_gold=True)


@pytest.mark.parametrize(
    ("case_args", "grid"),
    [
        (dict(tokens=1024, heads=24, seed=167), True),  # 1024 tokens: 5.5 SMs per pair (24 pairs on 132 SMs)
        (dict(tokens=1024, heads=25, seed=169), False),
        (dict(tokens=1536, heads=32, seed=171), True),  # 1536: 4.1 (32 pairs)
        (dict(tokens=1536, heads=33, seed=173), False),
        (dict(tokens=2048, heads=34, seed=139), True),  # 2048: 3.8 (34 pairs)
        (dict(tokens=2048, heads=35, seed=153), False),
        (dict(tokens=4096, heads=40, seed=155), True),  # 4096: 3.3 (40 pairs)
        (dict(tokens=4096, heads=41, seed=157), False),
        (dict(batch=2, tokens=8192, heads=22, seed=159), True),  # 8192: 3.0 (44 pairs)
        (dict(tokens=8192, heads=45, seed=161), False),
    ],
)
def test_auto_grid_bounds_at_each_tiers_edge(
    case_args: dict[str, object], grid: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tier's last pair count takes `grid`, the next one a 16-token schedule: the workspace asked for and
    the bits (grid's or `whole`'s) say which ran. No gold here (the fp64 CPU recurrence would take minutes at
    these sizes); the cases above and the grid tests check the results."""
    _check_auto_choice(case_args, grid, monkeypatch, against_gold=False)


# ---- persistent CTAs: whole and split with more tickets than SMs ---------------------------------------
def _persistent_cases(sms: int) -> dict[str, dict[str, object]]:
    """Varlen with empty sequences and ones of fewer chunks than the 8 producer warps or the 9 stages (a producer warp
    then has no chunk of some pairs, and the next pair's chunks start mid-ring), unsorted lengths (ranked longest first); a fixed batch;
    more than kMaxOrderedSequences sequences (kept in index order)."""
    return {
        "varlen-short-and-empty": dict(
            seqlens=[0, 1, 300, 0, 17, 1000, 64, 15, 0, 129, 40, 2], heads=sms // 4 + 1, seed=181
        ),
        "batch": dict(batch=3, tokens=200, heads=sms // 2 + 1, seed=183),
        "many-sequences": dict(
            seqlens=torch.randint(0, 60, (300,), generator=torch.Generator().manual_seed(5)).tolist(),
            heads=1,
            seed=185,
        ),
    }


@pytest.mark.parametrize("schedule", ["whole", "split"])
@pytest.mark.parametrize("name", ["varlen-short-and-empty", "batch", "many-sequences"])
def test_persistent_ctas_match_gold_and_one_cta_per_pair(
    name: str, schedule: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where whole's (split's) CTAs outnumber the SMs they are persistent: at most one per SM, each taking the next
    pair from a ticket counter in the workspace (asked for: 128 bytes). FLASH_KDA_SM90_PERSISTENT=off launches one
    CTA per pair instead (no workspace): the same arithmetic per chunk, so the same bits, and a pair or chunk that
    a persistent CTA skipped, ran twice or placed in a wrong stage would show."""
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", schedule)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    case = make_case(**_persistent_cases(sms)[name])  # type: ignore[arg-type]
    assert _workspace_bytes(case) == 128
    persistent = run_gpu(case)
    if name != "batch":  # the batch case's gold (fp64 on the CPU) would take minutes
        assert_matches_gold(*persistent, *gold(case))
    monkeypatch.setenv("FLASH_KDA_SM90_PERSISTENT", "off")
    assert _workspace_bytes(case) == 0
    per_pair = run_gpu(case)
    assert torch.equal(persistent[0], per_pair[0]) and torch.equal(persistent[1], per_pair[1])  # type: ignore[arg-type]
    # Without the workspace (a caller that skipped cuda_workspace_bytes) the persistent setting gives the same bits.
    monkeypatch.delenv("FLASH_KDA_SM90_PERSISTENT")
    out, final = _run_native(case, _native.StateLayout.VALUE_FIRST, workspace=False)
    assert torch.equal(out, per_pair[0]) and torch.equal(final, per_pair[1])  # type: ignore[arg-type]


def test_one_wave_asks_for_no_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """As many pairs as SMs: one wave of CTAs, nothing persistent, no workspace."""
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "whole")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert _workspace_bytes(make_case(tokens=40, heads=sms, seed=187)) == 0
    assert _workspace_bytes(make_case(tokens=40, heads=sms + 1, seed=187)) == 128


def test_unknown_persistent_setting_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read wherever whole or split runs, whatever the number of pairs."""
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "whole")
    monkeypatch.setenv("FLASH_KDA_SM90_PERSISTENT", "sometimes")
    case = make_case(tokens=100, heads=2, seed=189)
    with pytest.raises(flash_kda.FlashKDAError, match="FLASH_KDA_SM90_PERSISTENT: expected one of on, off"):
        run_gpu(case)


@pytest.mark.parametrize("short_by", [None, 128])
def test_auto_grid_without_workspace_runs_a_16_token_schedule(
    short_by: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that passes no workspace (None), or one short by 128 bytes, where auto would take `grid` gets
    the result from a schedule without scratch memory (the bits of `whole`), not an error."""
    monkeypatch.delenv("FLASH_KDA_SM90_SCHEDULE", raising=False)
    case = make_case(tokens=4096, heads=2, seed=149)
    out, final = _run_native(
        case,
        _native.StateLayout.VALUE_FIRST,
        workspace=short_by is not None,
        workspace_short_by=short_by or 0,
    )
    assert_matches_gold(out, final, *gold(case))
    monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "whole")
    whole = run_gpu(case)
    assert torch.equal(out, whole[0]) and torch.equal(final, whole[1])  # type: ignore[arg-type]


# ---- contract: NaN, determinism, graphs, streams, devices, 64-bit offsets -----------------------------
def test_nan_and_inf_inputs_propagate_without_harm() -> None:
    case = make_case(tokens=100, heads=3, seed=29)
    case.k[0, 37, 1, 5] = float("nan")  # poisons head 1's state from token 37 on
    case.q[0, 70, 2, 0] = float("inf")  # poisons one output row of head 2
    out, final = run_gpu(case)
    torch.cuda.synchronize()
    gold_out, gold_state = gold(case)
    # Head 0 is untouched; head 1 is NaN from token 37 on and correct before its chunk; head 2 only at 70.
    assert_matches_gold(out[:, :, 0], final[:, 0], gold_out[:, :, 0], gold_state[:, 0])  # type: ignore[index]
    assert not torch.isfinite(out[0, 37:, 1]).any()
    assert relative_error(out[0, :32, 1], gold_out[0, :32, 1]) <= TOLERANCE
    assert not torch.isfinite(final[0, 1]).any()  # type: ignore[index]
    assert not torch.isfinite(out[0, 70, 2]).any()
    rows = [t for t in range(100) if t != 70]
    assert relative_error(out[0, rows, 2], gold_out[0, rows, 2]) <= TOLERANCE
    # The device is still healthy: a clean call afterwards is right.
    clean = make_case(tokens=64, heads=1, seed=31)
    assert_matches_gold(*run_gpu(clean), *gold(clean))


def test_bitwise_deterministic() -> None:
    case = make_case(seqlens=[500, 3, 1200], heads=4, seed=37)
    first = run_gpu(case)
    second = run_gpu(case)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def _check_graph_replay_matches_eager(eager_seed: int, static_seed: int, replays: int, heads: int = 2) -> None:
    """A captured forward, replayed on new data (copied into the captured inputs), gives the eager bits."""
    case = make_case(seqlens=[100, 0, 260], heads=heads, seed=eager_seed)
    eager_out, eager_final = run_gpu(case)
    out = torch.full_like(case.v, float("nan"))
    final = torch.full_like(eager_final, float("nan"))  # type: ignore[arg-type]
    static = make_case(seqlens=[100, 0, 260], heads=heads, seed=static_seed)  # different data, same shapes

    def call() -> None:
        flash_kda.fwd(
            static.q,
            static.k,
            static.v,
            static.g,
            static.beta,
            static.scale,
            out,
            static.A_log,
            static.dt_bias,
            static.lower_bound,
            initial_state=static.initial_state,
            final_state=final,
            cu_seqlens=static.cu_seqlens,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for name in ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state"):
        getattr(static, name).copy_(getattr(case, name))
    for _ in range(replays):
        out.fill_(float("nan"))
        final.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager_out) and torch.equal(final, eager_final)  # type: ignore[arg-type]


def test_cuda_graph_replay_matches_eager() -> None:
    _check_graph_replay_matches_eager(eager_seed=41, static_seed=43, replays=1)


def test_persistent_cuda_graph_replay_matches_eager() -> None:
    """Persistent CTAs (3 · SMs pairs): the launch zeroes the ticket counter (cudaMemsetAsync), captured with
    it; the second replay starts from the count the first one left."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    _check_graph_replay_matches_eager(eager_seed=191, static_seed=193, replays=2, heads=sms)


def test_non_default_stream_same_bits() -> None:
    case = make_case(tokens=333, heads=2, seed=47)
    ref_out, ref_final = run_gpu(case)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, final = run_gpu(case)
    stream.synchronize()
    assert torch.equal(out, ref_out) and torch.equal(final, ref_final)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_tensors_on_second_device() -> None:
    case = make_case(tokens=100, heads=2, seed=53)
    ref_out, ref_final = run_gpu(case)
    moved = Case(
        **{
            f: (
                getattr(case, f).to("cuda:1")
                if isinstance(getattr(case, f), torch.Tensor)
                else getattr(case, f)
            )
            for f in Case.__dataclass_fields__
        }
    )
    with torch.cuda.device(0):
        out = torch.full_like(moved.v, float("nan"))
        final = torch.full_like(ref_final.to("cuda:1"), float("nan"))  # type: ignore[union-attr]
        flash_kda.fwd(
            moved.q,
            moved.k,
            moved.v,
            moved.g,
            moved.beta,
            moved.scale,
            out,
            moved.A_log,
            moved.dt_bias,
            moved.lower_bound,
            initial_state=moved.initial_state,
            final_state=final,
        )
    torch.cuda.synchronize("cuda:1")
    assert torch.equal(out.cpu(), ref_out.cpu()) and torch.equal(final.cpu(), ref_final.cpu())  # type: ignore[union-attr]


@pytest.mark.parametrize("layout", ["many-sequences", "grid"])
def test_offsets_beyond_32_bits(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """2^21 tokens × H heads × 128 with element offsets past 2^31 (every [T, H, K] tensor has 2^32 or
    2^33 elements). many-sequences: 512 sequences of 4096 tokens, H = 32 (a 16-token schedule); checked
    against the gold: the last sequence's last head and the first sequence. grid: H = 16 and two
    sequences, 2^21 − 4096 and 4096 tokens (the grid schedule, forced); checked: the last sequence's last
    and first heads, and the first 4096 tokens of sequence 0 (a prefix's outputs depend on it only).

    q, k, v and g alias one tensor (16 or 8 GiB) to fit the GPU.
    """
    tokens, seq_len = 1 << 21, 4096
    heads = 32 if layout == "many-sequences" else 16
    if layout == "grid":
        monkeypatch.setenv("FLASH_KDA_SM90_SCHEDULE", "grid")
    free, _ = torch.cuda.mem_get_info()
    if free < 36 * (1 << 30):
        pytest.skip(f"needs 36 GiB of free GPU memory, {free / (1 << 30):.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(59)
    data = torch.empty(1, tokens, heads, K, dtype=torch.bfloat16, device="cuda").normal_(generator=gen)
    beta = torch.randn(1, tokens, heads, generator=gen, device="cuda").to(torch.bfloat16)
    A_log = 0.5 * torch.randn(heads, generator=gen, device="cuda")
    dt_bias = 0.5 * torch.randn(heads, K, generator=gen, device="cuda")
    if layout == "many-sequences":
        cu = torch.arange(0, tokens + 1, seq_len, device="cuda", dtype=torch.int64)
    else:
        cu = torch.tensor([0, tokens - seq_len, tokens], device="cuda", dtype=torch.int64)
    out = torch.full_like(data, float("nan"))
    final = torch.full((cu.numel() - 1, heads, V, K), float("nan"), device="cuda")
    flash_kda.fwd(
        data, data, data, data, beta, K**-0.5, out, A_log, dt_bias, -5.0, final_state=final, cu_seqlens=cu
    )
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    last = cu.numel() - 2
    # (first token of a 4096-token slice, the sequence whose final state it ends or None, head)
    checks = [(tokens - seq_len, last, heads - 1), (0, 0, 0)]
    if layout == "grid":
        checks = [(tokens - seq_len, last, heads - 1), (tokens - seq_len, last, 0), (0, None, 0)]
    for start, seq, h in checks:
        sl = slice(start, start + seq_len)
        x = data[:, sl, h : h + 1].contiguous()
        case = Case(
            q=x,
            k=x,
            v=x,
            g=x,
            beta=beta[:, sl, h : h + 1].contiguous(),
            A_log=A_log[h : h + 1],
            dt_bias=dt_bias[h : h + 1],
            initial_state=None,
            cu_seqlens=None,
        )
        gold_out, gold_state = gold(case)
        if seq is None:  # a prefix of a longer sequence: its outputs only
            assert relative_error(out[:, sl, h : h + 1], gold_out) <= TOLERANCE
        else:
            assert_matches_gold(out[:, sl, h : h + 1], final[seq : seq + 1, h : h + 1], gold_out, gold_state)
    del data, out, final
    torch.cuda.empty_cache()


# ---- tools -------------------------------------------------------------------------------------------
_SANITIZER_CASE = """
import torch, flash_kda
torch.manual_seed(0)
cu = torch.tensor({cu}, dtype=torch.int64, device="cuda")
T, H = {tokens}, {heads}
q, k, v, g = (torch.randn(1, T, H, 128, device="cuda").bfloat16() for _ in range(4))
beta = torch.randn(1, T, H, device="cuda").bfloat16()
out = torch.empty_like(v)
s0 = torch.randn(4, H, 128, 128, device="cuda")
s1 = torch.empty_like(s0)
A_log, dt_bias = torch.zeros(H, device="cuda"), torch.zeros(H, 128, device="cuda")
flash_kda.fwd(q, k, v, g, beta, 128 ** -0.5, out, A_log, dt_bias, -5.0, initial_state=s0, final_state=s1,
              cu_seqlens=cu)
torch.cuda.synchronize()
print("sanitizer case done")
"""


def _compute_sanitizer() -> str | None:
    for candidate in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.mark.parametrize("schedule", (*SCHEDULES, "whole-persistent", "grid", "grid-state-teams"))
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool: str, schedule: str, tmp_path: Path) -> None:
    """whole-persistent: whole with SMs heads of 4 sequences (4 pairs per persistent CTA; lengths 5, 0, 35 and
    117 tokens, so that stages and ticket-queue slots are reused across pairs). grid-state-teams: grid with the
    state teams on and SMs/8 heads of 4 sequences (64 pairs on 132 SMs: 4 producer SMs, so the state teams prepare
    most chunks; one sequence of 19 chunks, so that the L2 ring's flow control runs)."""
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "case.py"
    env = dict(os.environ)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if schedule == "grid-state-teams":
        script.write_text(_SANITIZER_CASE.format(cu=[0, 300, 300, 900, 1150], tokens=1150, heads=sms // 8))
        schedule = "grid"
        env["FLASH_KDA_SM90_GRID_STATE_TEAMS"] = "on"
    elif schedule == "whole-persistent":
        script.write_text(_SANITIZER_CASE.format(cu=[0, 5, 5, 40, 157], tokens=157, heads=sms))
        schedule = "whole"
    else:
        script.write_text(_SANITIZER_CASE.format(cu=[0, 5, 5, 40, 57], tokens=57, heads=2))
    result = subprocess.run(
        [sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "FLASH_KDA_SM90_SCHEDULE": schedule},
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    assert "sanitizer case done" in report
    assert "ERROR SUMMARY: 0 errors" in report or "RACECHECK SUMMARY: 0 hazards" in report, report[-4000:]


def test_agrees_with_fla_triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agreement with FLA's chunk_kda (Triton path) on the same inputs, both judged by the fp64 gold.

    Both must be within the tolerance of the gold, and flash_kda at least as accurate as FLA (10% margin
    for the randomness of one draw). Their direct difference is bounded by the sum of the two errors
    (triangle inequality), i.e. 2 × the tolerance: two bf16 computations that each sit ~4e-3 from the gold
    with independent rounding differ by ~√2 · 4e-3 ≈ 5.7e-3, so a direct 5e-3 bound would test chance.
    """
    chunk = pytest.importorskip("fla.ops.kda").chunk_kda
    monkeypatch.setenv("FLA_FLASH_KDA", "0")  # FLA must not route back to this package
    monkeypatch.setenv("FLASH_KDA_FLA", "0")
    case = make_case(seqlens=[1300, 547, 2048, 963, 271, 3063], heads=4, seed=61)
    with torch.no_grad():
        fla_out, fla_final = chunk(
            case.q,
            case.k,
            case.v,
            case.g,
            case.beta,
            scale=case.scale,
            initial_state=case.initial_state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            safe_gate=True,
            lower_bound=case.lower_bound,
            state_v_first=True,
            cu_seqlens=case.cu_seqlens,
            A_log=case.A_log,
            dt_bias=case.dt_bias,
        )
    out, final = run_gpu(case)
    gold_out, gold_state = gold(case)
    ours = (relative_error(out, gold_out), relative_error(final, gold_state))  # type: ignore[arg-type]
    theirs = (relative_error(fla_out, gold_out), relative_error(fla_final, gold_state))
    between = (relative_error(out, fla_out), relative_error(final, fla_final))  # type: ignore[arg-type]
    print(
        f"vs gold: flash_kda out {ours[0]:.3e} state {ours[1]:.3e}; FLA out {theirs[0]:.3e} "
        f"state {theirs[1]:.3e}; flash_kda vs FLA out {between[0]:.3e} state {between[1]:.3e}"
    )
    assert max(theirs) <= TOLERANCE, "FLA itself is off the gold: the comparison means nothing"
    assert max(ours) <= TOLERANCE
    assert ours[0] <= 1.1 * theirs[0] and ours[1] <= 1.1 * theirs[1], "less accurate than FLA"
    assert max(between) <= 2 * TOLERANCE
