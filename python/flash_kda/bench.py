"""Forward benchmark: flash_kda against FLA's `chunk_kda` (Triton path), in one process and one run.

    flash-kda bench                       # the cases of TARGETS.md
    python -m flash_kda.bench --heads 32 --seqlens 4096,4096 --state-dtype bf16

Method: fresh random inputs (bf16, never zeros), rotated among enough copies that one pass over them is
larger than 4× the L2 cache; CUDA events around every call; calls enqueued behind a GPU sleep so that host
overhead does not show up as GPU time (except where a call synchronises: each varlen copy's cu_seqlens is one
tensor reused from call to call, as a model's layers reuse theirs; flash_kda checks its values once per tensor,
FLA caches its chunk indices per tensor); warm-up, then the median of at least 100 calls. Reports ms for each,
the speed-up over FLA, and the achieved bandwidth against the bytes floor (q, k, v, g, beta read once, out
written once, the fp32 state read and written once, over the device-to-device copy bandwidth measured in the
same run: 3.0 TB/s on TARGETS.md's H100s, about 4.2 TB/s on an H200). Writes a
Markdown table and a PNG plot under benchmarks/results/, named after the GPU and stamped with the date,
commit and versions.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import os
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

K = V = 128
TARGETS_COPY_BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy measured on the H100s of TARGETS.md
DEFAULT_RESULTS = Path("benchmarks/results")


@dataclass(frozen=True)
class Case:
    name: str
    heads: int
    seqlens: tuple[int, ...]  # one entry per sequence
    varlen: bool  # True: B = 1 with cu_seqlens; False: B = len(seqlens) rows of equal length

    @property
    def tokens(self) -> int:
        return sum(self.seqlens)

    def floor_bytes(self, state_bytes: int = 4) -> int:
        per_token_head = 3 * K * 2 + V * 2 + 2 + V * 2  # q, k, g read; v read; beta read; out written
        state = 2 * len(self.seqlens) * self.heads * K * V * state_bytes  # read + write
        return self.tokens * self.heads * per_token_head + state


def _fixed(batch: int, length: int, heads: int) -> Case:
    return Case(f"fixed {batch}×{length}", heads, (length,) * batch, False)


def _varlen(seqlens: Sequence[int], heads: int, name: str | None = None) -> Case:
    return Case(name or f"varlen {list(seqlens)}".replace(" ", ""), heads, tuple(seqlens), True)


MIXED = (1300, 547, 2048, 963, 271, 3063)
TARGET_CASES: tuple[Case, ...] = (
    _fixed(1, 8192, 96),
    _varlen(MIXED, 96, "varlen [1300,547,2048,963,271,3063]"),
    _varlen((1024,) * 8, 96, "varlen 8×1024"),
    _fixed(1, 8192, 64),
    _varlen(MIXED, 64, "varlen [1300,547,2048,963,271,3063]"),
    _varlen((1024,) * 8, 64, "varlen 8×1024"),
    _fixed(1, 512, 96),
    _fixed(1, 32768, 32),
    _varlen((512,) * 64, 32, "varlen 64×512"),
    _fixed(2, 16384, 32),
)


# ---- inputs ------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor
    A_log: torch.Tensor
    dt_bias: torch.Tensor
    initial_state: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    out: torch.Tensor
    final_state: torch.Tensor | None


def make_inputs(case: Case, state_dtype: torch.dtype | None, gen: torch.Generator) -> Inputs:
    batch, tokens = (1, case.tokens) if case.varlen else (len(case.seqlens), case.seqlens[0])
    n, h = len(case.seqlens), case.heads

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, sigma: float = 1.0) -> torch.Tensor:
        return (sigma * torch.randn(*shape, generator=gen, device="cuda")).to(dtype)

    cu = None
    if case.varlen:
        cu = torch.tensor(
            [0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int64, device="cuda"
        )
    state = None if state_dtype is None else randn(n, h, V, K, dtype=state_dtype, sigma=0.1)
    return Inputs(
        q=randn(batch, tokens, h, K),
        k=randn(batch, tokens, h, K),
        v=randn(batch, tokens, h, V),
        g=randn(batch, tokens, h, K),
        beta=randn(batch, tokens, h),
        A_log=randn(h, dtype=torch.float32, sigma=0.5),
        dt_bias=randn(h, K, dtype=torch.float32, sigma=0.5),
        initial_state=state,
        cu_seqlens=cu,
        out=torch.empty(batch, tokens, h, V, dtype=torch.bfloat16, device="cuda"),
        final_state=None if state is None else torch.empty_like(state),
    )


def run_flash_kda(x: Inputs) -> None:
    import flash_kda

    flash_kda.fwd(
        x.q,
        x.k,
        x.v,
        x.g,
        x.beta,
        K**-0.5,
        x.out,
        x.A_log,
        x.dt_bias,
        -5.0,
        initial_state=x.initial_state,
        final_state=x.final_state,
        cu_seqlens=x.cu_seqlens,
    )


def fla_runner() -> Callable[[Inputs], None] | None:
    """FLA's chunk_kda on its Triton path, or None when FLA is not installed.

    FLA would otherwise route the call to a package importable as `flash_kda` (this one): both opt-outs are
    set, and the routing log is watched so that a run which still dispatched elsewhere fails loudly.
    """
    os.environ["FLA_FLASH_KDA"] = "0"
    os.environ["FLASH_KDA_FLA"] = "0"
    try:
        from fla.ops.kda import chunk_kda
    except ImportError:
        return None

    def run(x: Inputs) -> None:
        with torch.no_grad():
            chunk_kda(
                x.q,
                x.k,
                x.v,
                x.g,
                x.beta,
                scale=K**-0.5,
                initial_state=x.initial_state,
                output_final_state=x.final_state is not None,
                use_qk_l2norm_in_kernel=True,
                use_gate_in_kernel=True,
                use_beta_sigmoid_in_kernel=True,
                safe_gate=True,
                lower_bound=-5.0,
                state_v_first=True,
                cu_seqlens=x.cu_seqlens,
                A_log=x.A_log,
                dt_bias=x.dt_bias,
            )

    return run


class _RoutingLog(logging.Handler):
    """Collects FLA's '[FLA Backend] ... -> NAME' lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "[FLA Backend]" in message:
            self.lines.append(message)

    def dispatched_elsewhere(self) -> list[str]:
        return [line for line in self.lines if "->" in line and "rejected" not in line]


# ---- timing ------------------------------------------------------------------------------------------
def measure_copy_bandwidth(megabytes: int = 2048, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written), median of `iters` copies of
    a buffer far larger than L2: the ceiling that the bytes floor is taken against."""
    src = torch.randn(megabytes << 18, device="cuda")  # megabytes << 20 bytes of fp32
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e-3)
    bandwidth = 2 * src.numel() * src.element_size() / statistics.median(samples)
    del src, dst
    torch.cuda.empty_cache()
    return bandwidth


def time_calls(fn: Callable[[Inputs], None], sets: Sequence[Inputs], iters: int, warmup: int = 10) -> float:
    """Median GPU milliseconds of one call, rotating over `sets`."""
    for i in range(warmup):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    samples: list[float] = []
    batch = 20
    while len(samples) < iters:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(batch + 1)]
        torch.cuda._sleep(2_000_000)  # lets the host queue the batch ahead of the GPU
        events[0].record()
        for i in range(batch):
            fn(sets[(len(samples) + i) % len(sets)])
            events[i + 1].record()
        torch.cuda.synchronize()
        samples += [events[i].elapsed_time(events[i + 1]) for i in range(batch)]
    return statistics.median(samples[:iters])


# ---- reporting ---------------------------------------------------------------------------------------
@dataclass
class Row:
    case: Case
    ours_ms: float
    fla_ms: float | None
    floor_ms: float

    @property
    def speedup(self) -> float | None:
        return None if self.fla_ms is None else self.fla_ms / self.ours_ms


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label[:48]:<48}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _commit() -> str:
    if os.environ.get("FLASH_KDA_COMMIT"):
        return os.environ["FLASH_KDA_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import flash_kda

    try:
        import fla

        fla_version = getattr(fla, "__version__", "installed")
    except ImportError:
        fla_version = "not installed"
    return {
        "flash_kda": flash_kda.__version__,
        "commit": _commit(),
        "torch": torch.__version__,
        "CUDA": str(torch.version.cuda),
        "FLA": fla_version,
        "GPU": torch.cuda.get_device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(rows: Sequence[Row], versions: dict[str, str], state: str, iters: int, bandwidth: float) -> str:
    lines = [
        f"# Forward benchmark — {versions['GPU']}",
        "",
        " · ".join(f"{k} {v}" for k, v in versions.items() if k != "GPU"),
        "",
        f"K = V = 128, bf16 inputs, {state} initial and final state, lower-bound gate (−5), "
        "all pre-processing "
        f"inside; median of {iters} calls (CUDA events), inputs rotated over > 4× L2 (varlen: each copy's "
        "cu_seqlens reused from call to call). Floor: bytes that must "
        f"move over {bandwidth / 1e12:.2f} TB/s, this GPU's device-to-device copy bandwidth measured in the same "
        "run.",
        "",
        "| case | H | tokens | flash_kda ms | FLA ms | speed-up | GB/s | % of floor speed | floor ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bytes_ = r.floor_ms * 1e-3 * bandwidth
        fla = "—" if r.fla_ms is None else f"{r.fla_ms:.3f}"
        speedup = "—" if r.speedup is None else f"{r.speedup:.2f}×"
        lines.append(
            f"| {r.case.name} | {r.case.heads} | {r.case.tokens} | {r.ours_ms:.3f} | {fla} | {speedup} | "
            f"{bytes_ / (r.ours_ms * 1e-3) / 1e9:.0f} | {100 * r.floor_ms / r.ours_ms:.0f}% | "
            f"{r.floor_ms:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    # Wrapped at commas and spaces so that the long varlen names do not run into their neighbours.
    labels = [f"{textwrap.fill(r.case.name.replace(',', ', '), 14)}\nH={r.case.heads}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows)), 5))
    width = 0.27
    ax.bar([x - width for x in xs], [r.ours_ms for r in rows], width, label="flash_kda")
    ax.bar(list(xs), [r.fla_ms or 0 for r in rows], width, label="FLA chunk_kda (Triton)")
    ax.bar([x + width for x in xs], [r.floor_ms for r in rows], width, label="bytes floor")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("ms (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- driver ------------------------------------------------------------------------------------------
def run(cases: Sequence[Case], state: str, iters: int, with_fla: bool, results: Path | None) -> list[Row]:
    if not torch.cuda.is_available():
        raise SystemExit("flash-kda bench needs a CUDA GPU")
    state_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "none": None}[state]
    fla = fla_runner() if with_fla else None
    routing = _RoutingLog()
    logging.getLogger("fla").addHandler(routing)
    logging.getLogger("fla").setLevel(logging.INFO)
    l2 = torch.cuda.get_device_properties().L2_cache_size
    gen = torch.Generator(device="cuda").manual_seed(0)
    bandwidth = measure_copy_bandwidth()
    print(f"device-to-device copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows: list[Row] = []
    for i, case in enumerate(cases):
        _progress(i, len(cases), f"{case.name} H={case.heads}")
        set_bytes = case.floor_bytes(0 if state_dtype is None else state_dtype.itemsize)
        sets = [make_inputs(case, state_dtype, gen) for _ in range(max(1, math.ceil(4 * l2 / set_bytes)))]
        ours = time_calls(run_flash_kda, sets, iters)
        theirs = time_calls(fla, sets, iters) if fla is not None else None
        rows.append(Row(case, ours, theirs, case.floor_bytes() / bandwidth * 1e3))
        # One line per case as it finishes, so that a run cut short still reports what it measured.
        print(f"measured {case.name} H={case.heads}: flash_kda {ours:.3f} ms, FLA "
              + ("—" if theirs is None else f"{theirs:.3f} ms"), flush=True)
        del sets
        torch.cuda.empty_cache()
    _progress(len(cases), len(cases), "done")
    if routing.dispatched_elsewhere():
        raise SystemExit(
            f"FLA routed chunk_kda to a backend, not its Triton path: {routing.dispatched_elsewhere()}"
        )

    versions = _versions()
    text = markdown(rows, versions, state, iters, bandwidth)
    print(text)
    if results is not None:
        results.mkdir(parents=True, exist_ok=True)
        gpu = versions["GPU"].replace("NVIDIA ", "").replace(" ", "-")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
        stem = results / f"{gpu}_{stamp}_{versions['commit']}"
        stem.with_suffix(".md").write_text(text)
        plotted = plot(
            rows, stem.with_suffix(".png"), f"KDA forward, {versions['GPU']}, commit {versions['commit']}"
        )
        print(f"wrote {stem.with_suffix('.md')}" + (f" and {stem.with_suffix('.png')}" if plotted else ""))
    return rows


def parse_cases(args: argparse.Namespace) -> list[Case]:
    if args.seqlens is None and args.tokens is None:
        return [c for c in TARGET_CASES if args.heads is None or c.heads == args.heads]
    heads = args.heads or 32
    if args.seqlens is not None:
        return [_varlen([int(s) for s in args.seqlens.split(",")], heads)]
    return [_fixed(args.batch, args.tokens, heads)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", type=int, help="H (default: the TARGETS.md cases; 32 for a custom case)")
    parser.add_argument("--seqlens", help="custom varlen case, comma-separated lengths")
    parser.add_argument("--tokens", type=int, help="custom fixed-length case: tokens per sequence")
    parser.add_argument("--batch", type=int, default=1, help="custom fixed-length case: sequences")
    parser.add_argument("--state-dtype", choices=("fp32", "bf16", "none"), default="fp32")
    parser.add_argument(
        "--iters", type=int, default=100, help="timed calls per case (≥ 100 for reported numbers)"
    )
    parser.add_argument("--no-fla", action="store_true", help="time flash_kda only")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where the .md/.png go")
    parser.add_argument("--no-save", action="store_true", help="print only")


def run_from_arguments(args: argparse.Namespace) -> int:
    results = None if args.no_save else args.results
    run(parse_cases(args), args.state_dtype, args.iters, not args.no_fla, results)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flash-kda bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
