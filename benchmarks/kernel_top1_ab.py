"""Top-1, side by side (GPU): searched in every tile of the loop (mode 1) against deferred (mode 2:
the loop keeps the tile of each row's maximum, the epilogue searches that tile), which sets
`TOP1_DEFER_MIN_KEYS`.

Forced to the table's tile (64x64, 4 warps, 3 stages), alternated three times per shape; prints the
registers of each compiled variant, whether the outputs agree bit for bit, the share of rows with the
same argmax and the largest max_prob difference (mode 2 recomputes the scores of one tile).
(KERNEL_NOTES log 36 used an earlier form of this script for a block-vote mode, since removed.)

Usage (GPU):  python3 benchmarks/kernel_top1_ab.py [--dims 64,128] [--seqs 4096,16384,32768,65536]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from headscope.kernels import StatsRequest
from headscope.kernels import triton_attention as ta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import bench_inputs, timeit  # noqa: E402
from kernel_tiles import Forced  # noqa: E402

REQ_S = StatsRequest(lse=True, entropy=True, topk=1)
REQ_B = StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)


def with_sink(q, k):
    """q gets a shared direction u (4 sd), key 0 gets 3 sqrt(D) u: scaled sink score ~12 +- 3 against
    ~4.6 for the largest random key."""
    D = q.shape[-1]
    u = torch.nn.functional.normalize(torch.randn(q.shape[1], 1, D, device=q.device), dim=-1)
    q = (q.float() + 4 * u).to(q.dtype)
    k = k.clone()
    k[:, :, 0] = (3 * D ** 0.5 * u[:, 0]).to(k.dtype)
    return q, k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqs", default="4096,16384,32768,65536")
    ap.add_argument("--sink", action="store_true", help="also the input with a sink")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    saved, saved_min = ta._fwd_tuned, ta.TOP1_DEFER_MIN_KEYS
    fwd = Forced(64, 64, 4, 3)
    ta._fwd_tuned = fwd
    print("top-1 mode: input shape request | ms per call, mode 1 / mode 2 (three alternations) | min, change "
          "| flash | out identical, argmax same, max |dprob| | registers 1 / 2")
    try:
        for D in (int(x) for x in a.dims.split(",")):
            for S in (int(x) for x in a.seqs.split(",")):
                q, k, v, tok, kset = bench_inputs(D, S, S * 1000 + D)
                for inp in (("random", "sink") if a.sink else ("random",)):
                    if inp == "sink":
                        q, k = with_sink(q, k)
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        t_flash = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                    for name, req in (("s", REQ_S), ("b", REQ_B)):
                        times = {1: [], 2: []}
                        res, regs = {}, {}
                        for _ in range(3):
                            for mode in (1, 2):
                                ta.TOP1_DEFER_MIN_KEYS = 1 << 40 if mode == 1 else 0
                                fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req,  # noqa: E731
                                                                 token_ids=tok, keyset=kset)
                                res[mode] = fn()
                                regs[mode] = fwd.kernel.n_regs
                                times[mode].append(timeit(fn))
                        o1, s1 = res[1]
                        o2, s2 = res[2]
                        same = torch.equal(o1, o2)
                        agree = (s1["argmax"] == s2["argmax"]).float().mean().item()
                        dprob = (s1["max_prob"] - s2["max_prob"]).abs().max().item()
                        t1, t2 = min(times[1]), min(times[2])
                        pairs = " ".join(f"{x:.3f}/{y:.3f}" for x, y in zip(times[1], times[2]))
                        print(f"  d{D} S={S:<6} {inp:6} {name} | {pairs} | {t1:.3f} / {t2:.3f} "
                              f"({(t2 / t1 - 1) * 100:+.1f}%) | flash {t_flash:.3f} | {same} {agree:.6f} {dprob:.1e} | "
                              f"{regs[1]} / {regs[2]}", flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    finally:
        ta._fwd_tuned = saved
        ta.TOP1_DEFER_MIN_KEYS = saved_min


if __name__ == "__main__":
    main()
