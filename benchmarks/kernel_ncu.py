"""Hardware counters of the forward and pair kernels (GPU, under Nsight Compute): where the loop stalls.

Timings say (b) runs at about half its instruction-issue ceiling (KERNEL_NOTES "Two numbers"); the
counters say why the other half is idle: warp stall reasons, issue-slot use, pipe use, occupancy.
Each request is called once outside the profiled range (autotune, compile), then once inside it, so
ncu sees exactly one launch of each kernel per request. Needs a machine where ncu reads counters
(Firecracker: nvidia-h100-x1; KINDS.md).

Usage (GPU):
  ncu --profile-from-start off --clock-control none --set full \\
      --kernel-name regex:'_attn_fwd|_pair_mass' -o prof python3 kernel_ncu.py [--dims 64] [--seqs 4096]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from headscope.kernels import StatsRequest
from headscope.kernels import triton_attention as ta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import bench_inputs  # noqa: E402

REQUESTS = [
    ("a_output", StatsRequest()),
    ("s_lse_entropy_top1", StatsRequest(lse=True, entropy=True, topk=1)),
    ("b_all", StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64")
    ap.add_argument("--seqs", default="4096")
    args = ap.parse_args()
    for D in (int(x) for x in args.dims.split(",")):
        for S in (int(x) for x in args.seqs.split(",")):
            q, k, v, tok, kset = bench_inputs(D, S, S * 1000 + D)
            for name, req in REQUESTS:
                def call():
                    return ta.attention_triton(q, k, v, causal=True, request=req,
                                               token_ids=tok if req.needs_tokens else None,
                                               keyset=kset if req.keyset else None)
                call()
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
                call()
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
                print(f"profiled d{D} S{S} {name}", flush=True)
            del q, k, v


if __name__ == "__main__":
    main()
