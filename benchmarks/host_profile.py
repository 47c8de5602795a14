"""Host (Python + launch) cost of one `attention_triton` call, and where it goes (GPU).

The GPU is kept busy (`torch.cuda._sleep`) so that no launch waits for the device: the time until
the call returns is then host work alone. Few calls per measurement: past ~1000 queued launches
the launch itself blocks (a (b) call queues a few tens of kernels, with the sorts). cProfile over
the same calls lists the functions that take it. S = 1024, bf16, causal, B x H as in kernel_bench.py.
Measured (run 25 / 25b, H200): output only 0.155 ms, + score statistics 0.275 ms, (b) on the pair
pass ~0.9 ms per call.

Usage (GPU):  python3 benchmarks/host_profile.py [--calls 10] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

from headscope.kernels import StatsRequest
from headscope.kernels import triton_attention as ta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import bench_inputs  # noqa: E402

REQUESTS = [
    ("(a) output only", StatsRequest(), False),
    ("score-only: lse, entropy, top-1, sink, offset",
     StatsRequest(lse=True, entropy=True, topk=1, sink_k=1, offsets=(1,)), False),
    ("(b) every one-pass statistic", StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False),
     True),
]


def host_ms(fn, calls: int) -> float:
    """Mean host time per call while the GPU is busy with a sleep kernel queued ahead."""
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~0.1 s of GPU time at ~2 GHz: every launch below only queues
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return t * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seq", type=int, default=1024)
    a = ap.parse_args()
    q, k, v, tok, kset = bench_inputs(64, a.seq, 11)
    for name, req, tokens in REQUESTS:
        kw = dict(token_ids=tok, keyset=kset) if tokens else {}
        fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req, **kw)  # noqa: E731
        fn()
        fn()
        t = min(host_ms(fn, a.calls) for _ in range(3))
        prof = cProfile.Profile()
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2e8))
        prof.enable()
        for _ in range(a.calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(a.top)
        print(f"== {name}: host {t:.3f} ms per call (S={a.seq}, d64, {a.calls} calls, GPU busy)")
        print("\n".join(s.getvalue().splitlines()[4:4 + a.top + 6]), flush=True)


if __name__ == "__main__":
    main()
