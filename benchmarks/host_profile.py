"""Host (Python + launch) cost of one `attention_triton` call, and where it goes (GPU).

The GPU is kept busy (`torch.cuda._sleep`) so that no launch waits for the device: the time until
the call returns is then host work alone. Few calls per measurement: past ~1000 queued launches
the launch itself blocks (a (b) call queues a few tens of kernels, with the sorts). cProfile over
the same calls lists the functions that take it. S = 1024, bf16, causal, B x H as in kernel_bench.py.
Measured (run 25 / 25b, H200): output only 0.155 ms, + score statistics 0.275 ms, (b) on the pair
pass ~0.9 ms per call.

`--decode`: one decode step of one sliding layer as `gpu_decode_check.py` times it (Mistral-7B
shapes, Sq = 1, key_start, score statistics + colsum), host time beside the GPU time of its kernels
(torch profiler), so a step's wall time can be split into the two.

Usage (GPU):  python3 benchmarks/host_profile.py [--calls 10] [--top 25] [--decode]
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


def profile_host(name: str, fn, calls: int, top: int) -> float:
    """Print and return the host ms per call of fn, with the cProfile table of those calls."""
    fn()
    fn()
    t = min(host_ms(fn, calls) for _ in range(3))
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    print(f"== {name}: host {t:.3f} ms per call ({calls} calls, GPU busy)")
    print("\n".join(s.getvalue().splitlines()[4:4 + top + 6]), flush=True)
    return t


def gpu_ms(fn, calls: int) -> tuple[float, dict[str, float]]:
    """GPU time per call summed over fn's kernels (torch profiler), and the time per kernel name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0:
            per[e.key[:60]] = e.self_device_time_total / 1e3 / calls
    return sum(per.values()), per


def decode(calls: int, top: int) -> None:
    from dataclasses import replace

    from headscope.kernels import attention

    req = replace(StatsRequest.all(topk=1, sink_k=1, offsets=(1,), colsum=True), match=False, next_match=False)
    B, H, Hkv, D, W, S = 4, 32, 8, 128, 4096, 32768
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, W, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for name, kw in (("decode step, score stats + colsum", dict(stats=req)),
                     ("decode step, output only", dict(stats=StatsRequest()))):
        fn = lambda: attention(q, k, v, window=W, key_start=S - W, **kw)  # noqa: E731
        host = profile_host(f"{name} (B {B}, H {H}, window {W}, S {S})", fn, calls, top)
        g, per = gpu_ms(fn, calls)
        print(f"   GPU {g:.3f} ms per call over {len(per)} kernels; host / GPU = {host / g:.1f}")
        for kname, ms in sorted(per.items(), key=lambda x: -x[1]):
            print(f"     {ms:.4f} ms  {kname}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--decode", action="store_true", help="profile one decode step (Sq = 1, key_start)")
    a = ap.parse_args()
    if a.decode:
        return decode(a.calls, a.top)
    q, k, v, tok, kset = bench_inputs(64, a.seq, 11)
    for name, req, tokens in REQUESTS:
        kw = dict(token_ids=tok, keyset=kset) if tokens else {}
        fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req, **kw)  # noqa: E731
        profile_host(f"{name} (S={a.seq}, d64)", fn, a.calls, a.top)


if __name__ == "__main__":
    main()
