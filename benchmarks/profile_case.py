"""One flash_kda forward on a TARGETS.md case, for Nsight Compute (scripts/device_gpu_suite.sh profile).

ncu -k regex:kda_forward -c 1 python benchmarks/profile_case.py [heads] [tokens]
"""

import sys

import torch

from flash_kda.bench import _fixed, make_inputs, run_flash_kda

heads = int(sys.argv[1]) if len(sys.argv) > 1 else 96
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
inputs = make_inputs(_fixed(1, tokens, heads), torch.float32, torch.Generator(device="cuda").manual_seed(0))
run_flash_kda(inputs)
torch.cuda.synchronize()
print(f"profiled fixed 1x{tokens} H={heads}")
