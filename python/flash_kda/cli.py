"""The `flash-kda` command (also `python -m flash_kda`).

flash-kda info     what is installed: versions, library, compiled CUDA architectures, whether each GPU is
                   supported, FLA
flash-kda check    runs flash_kda.fwd once and compares it with the pure-torch fp64 gold
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import time
from collections.abc import Sequence

import torch

from . import __version__, _native, fwd, reference
from ._device import gpu_support
from .bench import add_arguments as add_bench_arguments
from .bench import run_from_arguments as run_bench

# Tolerances on the relative error ‖x − gold‖ / ‖gold‖ against the fp64 gold.
# CPU: the C++ fp64 recurrence, so only the final rounding counts. Rounding to bf16 (8 significant bits)
# moves each element by at most 2⁻⁸ of itself, hence the whole tensor by at most 2⁻⁸ in norm; rounding to
# fp32 by at most 2⁻²⁴ ≈ 6e-8, with room left for fp64 summation order.
# CUDA: the kernel computes in bf16/fp32 chunks; FlashKDA measures 5.8e-3 (out) and 5.0e-3 (state) on
# these inputs, FLA 4.1e-3 and 2.9e-3 (shared/kda/TARGETS.md), so 1e-2 catches a wrong kernel, not drift.
_TOLERANCES = {"cpu": {"out": 2.0**-8, "state": 1e-6}, "cuda": {"out": 1e-2, "state": 1e-2}}
# Default problem sizes: the CPU reference is single-threaded fp64, the GPU case is closer to real use.
_DEFAULT_SIZES = {"cpu": {"tokens": 256, "heads": 2}, "cuda": {"tokens": 4096, "heads": 8}}
_HEAD_DIM = 128


def _info() -> int:
    archs = _native.cuda_architectures()
    rows = [
        ("flash_kda", __version__),
        ("library", f"{_native.LIBRARY_PATH} (built as {_native.library_version()})"),
        ("CUDA archs", ", ".join(archs) if archs else "none (CPU-only build)"),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU-only torch)"),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            _, verdict = gpu_support(index)
            rows.append(
                (f"GPU {index}", f"{torch.cuda.get_device_name(index)}, sm_{major}{minor}: {verdict}")
            )
    else:
        rows.append(("GPU", "none visible"))
    rows.append(("FLA", _fla_status()))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _fla_status() -> str:
    """FLA's version and whether its chunk_kda may be routed here, without importing FLA (seconds)."""
    try:
        version = importlib.metadata.version("fla-core")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
    if os.environ.get("FLASH_KDA_FLA") == "0":
        return f"fla-core {version}; flash_kda's FLA backend turned off (FLASH_KDA_FLA=0)"
    return f"fla-core {version}; its chunk_kda comes here where it can (FLASH_KDA_FLA=0 turns that off)"


def _seqlens(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(n < 0 for n in lengths):
        raise argparse.ArgumentTypeError(f"sequence lengths must be >= 0, got {text!r}")
    return lengths


def _pick_device(requested: str) -> str | None:
    """The device to check on, or None (after saying why) when the requested one cannot be used."""
    if requested == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        if requested == "cuda":
            print("error: --device cuda, but no CUDA GPU is visible")
            return None
        print("No CUDA GPU visible: checking the CPU path (the C++ fp64 reference).")
        return "cpu"
    supported, verdict = gpu_support(torch.cuda.current_device())
    if supported:
        return "cuda"
    if requested == "cuda":
        print(f"error: --device cuda, but {torch.cuda.get_device_name()} is {verdict}")
        return None
    print(f"{torch.cuda.get_device_name()} is {verdict}: checking the CPU path (the C++ fp64 reference).")
    return "cpu"


def _check(args: argparse.Namespace) -> int:
    device = _pick_device(args.device)
    if device is None:
        return 2
    heads = args.heads or _DEFAULT_SIZES[device]["heads"]
    if args.seqlens is not None:
        if args.tokens is not None and args.tokens != sum(args.seqlens):
            print(f"error: --tokens {args.tokens} differs from the sum of --seqlens ({sum(args.seqlens)})")
            return 2
        inputs = reference.random_inputs(
            heads=heads, seqlens=args.seqlens, initial_state_dtype=torch.float32, device=device
        )
        shape = f"varlen {args.seqlens}"
    else:
        tokens = args.tokens if args.tokens is not None else _DEFAULT_SIZES[device]["tokens"]
        inputs = reference.random_inputs(
            heads=heads, tokens=tokens, initial_state_dtype=torch.float32, device=device
        )
        shape = f"fixed 1x{tokens}"
    print(f"flash_kda {__version__} check on {device}: {shape}, H={heads}, K=V={_HEAD_DIM}, fp32 state")

    # NaN-filled outputs: an element the call forgets to write fails the check.
    out = torch.full_like(inputs.v, math.nan)
    final_state = torch.full(inputs.state_shape(), math.nan, dtype=torch.float32, device=device)
    start = time.perf_counter()
    fwd(out=out, final_state=final_state, **inputs.fwd_kwargs())
    if device == "cuda":
        torch.cuda.synchronize()
    fwd_seconds = time.perf_counter() - start
    start = time.perf_counter()
    gold_out, gold_state = inputs.gold()
    gold_seconds = time.perf_counter() - start

    tolerances = _TOLERANCES[device]
    passed = True
    for name, value, gold in (("out", out, gold_out), ("final state", final_state, gold_state)):
        tolerance = tolerances["out" if name == "out" else "state"]
        error = reference.relative_error(value, gold)
        ok = bool(torch.isfinite(value).all()) and error <= tolerance
        passed &= ok
        print(
            f"  {name:<12} relative error {error:.3e}  (tolerance {tolerance:.1e})  {'ok' if ok else 'FAIL'}"
        )
    print(
        f"  flash_kda.fwd {fwd_seconds * 1e3:.1f} ms (first call: includes one-time set-up), "
        f"pure-torch fp64 gold {gold_seconds * 1e3:.1f} ms"
    )
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flash-kda` console script; returns the exit code."""
    parser = argparse.ArgumentParser(prog="flash-kda", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, library path, CUDA architectures, GPU support")
    check = commands.add_parser("check", help="run flash_kda.fwd and compare it with an fp64 gold")
    check.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                       help="auto: the GPU if it is supported, else the CPU (default)")  # fmt: skip
    check.add_argument("--heads", type=int, help="H (default: 2 on the CPU, 8 on the GPU)")
    check.add_argument("--tokens", type=int, help="T of one fixed-length row (default: 256 CPU, 4096 GPU)")
    check.add_argument("--seqlens", type=_seqlens, help="varlen lengths, e.g. 100,0,37 (T is their sum)")
    bench = commands.add_parser("bench", help="time flash_kda against FLA's chunk_kda (TARGETS.md cases)")
    add_bench_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    return _info() if args.command == "info" else _check(args)
