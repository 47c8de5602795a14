"""A/B of one switch of the kernel's host module (`headscope.kernels.triton_attention`) in one process.

For each shape: (b) every one-pass statistic on the benchmark inputs (`kernel_bench.bench_inputs`),
timed with each value of the switch in A B B A order (so drift falls on both), the GPU time of the
pair kernel and the host time of one call (GPU kept busy, `host_profile.host_ms`) per value, SDPA
flash beside them, and the largest difference of every statistic between the two values (they
must agree to the statistic's rounding). Printed last: one table.

Usage (GPU):  python3 benchmarks/kernel_switch_ab.py --set HOT_TOKENS=0,7 [--rounds 2] [--dims 64]
                  [--seqs 4096,16384,65536]
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from headscope.kernels import StatsRequest
from headscope.kernels import triton_attention as ta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_profile import gpu_ms, host_ms  # noqa: E402
from kernel_bench import bench_inputs, timeit  # noqa: E402

EVERY = StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", required=True, help="NAME=A,B: a module attribute of triton_attention and two values")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dims", default="64")
    ap.add_argument("--seqs", default="4096,16384,65536")
    a = ap.parse_args()
    name, values = a.set.split("=", 1)
    vals = [ast.literal_eval(x) for x in values.split(",")]
    if len(vals) != 2 or not hasattr(ta, name):
        raise SystemExit(f"--set wants NAME=A,B with NAME an attribute of triton_attention, got {a.set!r}")
    old = getattr(ta, name)
    table = []
    for D in (int(x) for x in a.dims.split(",")):
        for S in (int(x) for x in a.seqs.split(",")):
            q, k, v, tok, kset = bench_inputs(D, S, S * 1000 + D)

            def fn():
                return ta.attention_triton(q, k, v, causal=True, request=EVERY, token_ids=tok, keyset=kset)

            res, ms, pair, host, path = {}, {x: [] for x in vals}, {}, {}, {}
            for x in vals:
                setattr(ta, name, x)
                res[x] = fn()  # autotune, and the result to compare
                path[x] = "/".join(sorted(set(ta.last_match_paths.values()))) + \
                    (f"+hot{ta.last_hot_tokens}" if ta.last_hot_tokens else "")
            diff = max((res[vals[0]][1][n].float() - res[vals[1]][1][n].float()).nan_to_num().abs().max().item()
                       for n in EVERY.names() if n != "argmax")
            amax = (res[vals[0]][1]["argmax"] != res[vals[1]][1]["argmax"]).float().mean().item()
            out_rel = ((res[vals[0]][0].float() - res[vals[1]][0].float()).norm() / res[vals[0]][0].float().norm()).item()
            del res
            for r in range(a.rounds):
                for x in (vals if r % 2 == 0 else vals[::-1]):
                    setattr(ta, name, x)
                    ms[x].append(timeit(fn))
            for x in vals:
                setattr(ta, name, x)
                _, per = gpu_ms(fn, 5)
                pair[x] = sum(t for kname, t in per.items() if "pair" in kname)
                host[x] = min(host_ms(fn, 5) for _ in range(3))

            def flash():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            flash()
            fl = timeit(flash)
            row = dict(D=D, S=S, flash=fl, diff=diff, argmax_diff=amax, out_rel=out_rel,
                       **{f"b[{x}]": statistics.median(ms[x]) for x in vals},
                       **{f"pair[{x}]": pair[x] for x in vals}, **{f"host[{x}]": host[x] for x in vals},
                       **{f"path[{x}]": path[x] for x in vals})
            print("ROW", row, flush=True)
            table.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    setattr(ta, name, old)
    x0, x1 = vals
    print(f"\n{name}: {x0} vs {x1}, {a.rounds} rounds alternated, medians (ms)")
    print(f"{'D':>4} {'S':>6} | {'b ' + str(x0):>9} {'b ' + str(x1):>9} {'ratio':>6} | {'pair':>6} {'pair':>6} | "
          f"{'host':>6} {'host':>6} | {'flash':>7} {'fl/b0':>6} {'fl/b1':>6} | {'max diff':>8} {'argmax':>7} | path")
    for r in table:
        b0, b1 = r[f"b[{x0}]"], r[f"b[{x1}]"]
        print(f"{r['D']:>4} {r['S']:>6} | {b0:9.3f} {b1:9.3f} {b1 / b0:6.3f} | {r[f'pair[{x0}]']:6.3f} "
              f"{r[f'pair[{x1}]']:6.3f} | {r[f'host[{x0}]']:6.3f} {r[f'host[{x1}]']:6.3f} | {r['flash']:7.3f} "
              f"{r['flash'] / b0:6.3f} {r['flash'] / b1:6.3f} | {r['diff']:8.1e} {r['argmax_diff']:7.1e} | "
              f"{r[f'path[{x0}]']} -> {r[f'path[{x1}]']}")


if __name__ == "__main__":
    main()
