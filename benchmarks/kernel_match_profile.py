"""Where the time of match / next_match goes: CUDA kernel times (torch.profiler) of one call with
only those two statistics, sparse pair pass against the dense in-kernel path, plus the pair plan
(sorts + range kernel, no sync) timed alone. bf16, causal, batch 1, Zipf ids (kernel_tokens).

Usage (GPU):  python3 benchmarks/kernel_match_profile.py [--seq 16384] [--dims 64,128]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

from headscope.kernels import StatsRequest
from headscope.kernels import triton_attention as ta
from headscope.kernels.triton_match_pairs import key_tokens, pair_plan, query_tokens, sort_rows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_tokens import zipf_ids  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--dims", default="64,128")
    a = ap.parse_args()
    S = a.seq
    req = StatsRequest(match=True, next_match=True)
    for D in (int(x) for x in a.dims.split(",")):
        H = 2048 // D
        g = torch.Generator(device="cuda").manual_seed(D)
        q, k, v = (torch.randn(1, H, S, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        tok = zipf_ids(1, S, g, "cuda")
        t32 = tok.to(torch.int32)
        plan_ms = triton.testing.do_bench(
            lambda: pair_plan(*sort_rows(query_tokens(t32, None, S)), key_tokens(t32, None), 64, True),
            return_mode="median")
        plan = pair_plan(*sort_rows(t32), t32, 64, True)
        walked = ((plan[5] - plan[4]).sum() * 64).item()
        print(f"d{D} S={S}: pair plan (device, one statistic) {plan_ms:.3f} ms; walked {walked} = "
              f"{walked / (S * S / 2):.4f} of the causal scores", flush=True)
        for path in ("sparse", "dense", "none"):
            ta.MATCH_PATH = "dense" if path == "none" else path
            r = StatsRequest() if path == "none" else req
            fn = lambda: ta.attention_triton(q, k, v, causal=True, request=r, token_ids=tok)  # noqa: E731
            fn()
            t = triton.testing.do_bench(fn, return_mode="median")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn()
                torch.cuda.synchronize()
            print(f"  {path:6s} wall median {t:.3f} ms; CUDA kernels (total over 5 calls):")
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
                print(f"    {e.device_time_total / 5e3:8.3f} ms/call  x{e.count // 5:<3d} {e.key[:70]}")
        ta.MATCH_PATH = "auto"


if __name__ == "__main__":
    main()
