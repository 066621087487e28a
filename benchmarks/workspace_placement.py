"""Does the forward's time depend on where its scratch workspace lies? (The `grid` schedule keeps its L2 ring and
counters there; docs/kernel_sm90.md, "The `grid` schedule", "Measured".)

One process, one set of inputs; the workspace is placed at several 2 MiB offsets of one pool, and each placement is
timed twice (median of 100 calls, CUDA events). Within a process a placement's time repeats; between processes the
pool's physical pages differ, so run it more than once.

    python3 benchmarks/workspace_placement.py --heads 32 --tokens 32768 --offsets 0,1,2,3,5,8,13,21
"""

from __future__ import annotations

import argparse
import statistics

import torch

from flash_kda import _native, bench

MiB2 = 2 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--offsets", default="0,1,2,3,5,8,13,21", help="workspace offsets, in 2 MiB units")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    offsets = [int(x) for x in args.offsets.split(",")]

    gen = torch.Generator(device="cuda").manual_seed(1)
    x = bench.make_inputs(bench._fixed(1, args.tokens, args.heads), torch.float32, gen)
    options = _native.ForwardOptions(
        scale=bench.K**-0.5,
        l2norm_qk=1,
        gate=_native.GateMode.LOWER_BOUND,
        lower_bound=-5.0,
        beta=_native.BetaMode.SIGMOID,
        state_layout=_native.StateLayout.VALUE_FIRST,
    )
    problem = _native.make_problem(
        q=x.q, k=x.k, v=x.v, g=x.g, beta=x.beta, out=x.out, A_log=x.A_log, dt_bias=x.dt_bias,
        initial_state=x.initial_state, final_state=x.final_state, cu_seqlens=None, options=options,
    )  # fmt: skip
    nbytes = _native.cuda_workspace_bytes(problem)
    if nbytes == 0:
        print("this case's schedule uses no workspace (FLASH_KDA_SM90_SCHEDULE=grid forces one that does)")
        return
    pool = torch.empty(max(offsets) * MiB2 + nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def median_ms(offset: int) -> float:
        def call() -> None:
            _native.cuda_forward(problem, stream, pool.data_ptr() + offset * MiB2, nbytes)

        for _ in range(10):
            call()
        samples: list[float] = []
        while len(samples) < 100:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(21)]
            torch.cuda._sleep(2_000_000)  # lets the host queue the batch ahead of the GPU
            events[0].record()
            for i in range(20):
                call()
                events[i + 1].record()
            torch.cuda.synchronize()
            samples += [events[i].elapsed_time(events[i + 1]) for i in range(20)]
        return statistics.median(samples)

    print(f"1x{args.tokens} H{args.heads}, workspace {nbytes / 2**20:.1f} MiB; ms per offset (x 2 MiB):")
    for r in range(args.rounds):
        print(f"round {r}: " + "  ".join(f"{o}: {median_ms(o):.3f}" for o in offsets), flush=True)


if __name__ == "__main__":
    main()
