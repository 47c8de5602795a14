"""Forward attention throughput and peak memory: the fused kernel (with / without statistics, colsum pass)
against PyTorch SDPA (flash and cuDNN backends) and eager attention that materialises p.

(a) ours, output only; (b) ours with every one-pass statistic (lse, entropy, top-1, sink, offset 1,
match / next_match with counts, keyset); (s) ours with the score statistics only (lse, entropy, top-1,
sink, offset 1: no key set, no token ids), to show each group's cost at every S; (c) ours, the colsum pass alone (given the forward's lse);
(d) SDPA flash; (d') SDPA cuDNN; (e) eager softmax(q k^T) v in bf16, until it runs out of memory.
bf16, causal, MHA (H = Hkv so SDPA runs the same problem), B x H chosen to fill the GPU.
Times are triton.testing.do_bench medians; every input set is >= 64 MB, beyond the 50 MB L2, so
no rotation is needed. FLOPs = 4 B H S^2 D / 2 (causal: half the 2 matmuls).

Usage (GPU):  python3 benchmarks/kernel_bench.py [--quick] [--dims 64,128] [--seqs 1024,4096,...]
The table is printed last; JSON in $OUT/kernel_bench.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from headscope.kernels import StatsRequest
from headscope.kernels import triton_attention as ta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_tokens import EXPONENT, VOCAB, repeat_fraction, zipf_ids  # noqa: E402

TOKENS = 16384  # B * S per problem: 16 x 1k ... 1 x 16k (and 1 x 32k, 1 x 64k beyond)
HIDDEN = 2048   # H * D: 32 heads at d64, 16 at d128 (FlashAttention papers' setting)


def timeit(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak(fn) -> tuple[float, float]:
    """(peak allocated during fn, inputs included; extra over what was allocated before) in GiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    r = fn()
    torch.cuda.synchronize()
    p = torch.cuda.max_memory_allocated()
    del r
    return p / 2**30, (p - base) / 2**30


def eager(q, k, v, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    S = q.shape[2]
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).triu_(1)
    p = torch.softmax(s.masked_fill_(mask, -math.inf), dim=-1)
    return torch.matmul(p, v)


def bench_inputs(D: int, S: int, seed: int):
    """One benchmark problem, bf16 on the GPU: q, k, v [B, H, S, D] (B x S = TOKENS, H x D = HIDDEN),
    Zipf token ids [B, S] and a 5% key set [B, S]."""
    B, H = max(1, TOKENS // S), HIDDEN // D
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    tok = zipf_ids(B, S, g, "cuda")
    kset = torch.rand(B, S, generator=g, device="cuda") < 0.05
    return q, k, v, tok, kset


def run(dims, seqs) -> list[dict]:
    rows = []
    all_stats = StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)
    for D in dims:
        H = HIDDEN // D
        eager_oom = False
        for S in seqs:
            B = max(1, TOKENS // S)
            q, k, v, tok, kset = bench_inputs(D, S, S * 1000 + D)
            scale = 1.0 / math.sqrt(D)
            flops = 4 * B * H * S * S * D / 2
            # Fewest bytes: read q, k, v, write out (bf16); stats add 4-8 bytes per row each.
            bytes_min = 4 * B * H * S * D * 2
            r = dict(D=D, S=S, B=B, H=H, flops=flops, bytes_min=bytes_min, repeat=repeat_fraction(tok))

            def ours(req, **kw):
                return lambda: ta.attention_triton(q, k, v, causal=True, request=req, **kw)

            fa = ours(StatsRequest())
            fb = ours(all_stats, token_ids=tok, keyset=kset)
            fs = ours(SCORE_STATS)
            fc_setup = ours(StatsRequest(colsum=True))
            cases = [("a", fa, "auto"), ("b", fb, "auto"), ("s", fs, "auto")] + ([] if NO_DENSE else [("bd", fb, "dense")])
            t0 = time.perf_counter()
            for tag, fn, path in cases:
                ta.MATCH_PATH = path
                try:
                    fn()  # autotune / compile outside the timing
                    r[f"path_{tag}"] = "/".join(sorted(set(ta.last_match_paths.values())))
                    r[f"t_{tag}"] = timeit(fn)
                    r[f"mem_{tag}"], r[f"extra_{tag}"] = peak(fn)
                except Exception as exc:  # reported in the table, the other columns still run
                    r[f"t_{tag}"], r[f"err_{tag}"] = None, f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"{tag} failed: {r[f'err_{tag}']}", flush=True)
                ta.MATCH_PATH = "auto"
            ta.KEEP_COLSUM_LAUNCH = True
            fc_setup()
            r["t_c"] = timeit(ta.last_colsum_launch)
            ta.KEEP_COLSUM_LAUNCH, ta.last_colsum_launch = False, None
            r["mem_c"], r["extra_c"] = peak(fc_setup)

            def sdpa(backend):
                def f():
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return f

            for tag, backend in (("d", SDPBackend.FLASH_ATTENTION), ("dp", SDPBackend.CUDNN_ATTENTION)):
                try:
                    sdpa(backend)()
                    r[f"t_{tag}"] = timeit(sdpa(backend))
                    r[f"mem_{tag}"], r[f"extra_{tag}"] = peak(sdpa(backend))
                except Exception as exc:  # a backend that refuses the shape is reported, not fatal
                    r[f"t_{tag}"] = None
                    r[f"err_{tag}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if not eager_oom and not NO_EAGER:
                try:
                    r["mem_e"], r["extra_e"] = peak(lambda: eager(q, k, v, scale))
                    r["t_e"] = timeit(lambda: eager(q, k, v, scale))
                except torch.OutOfMemoryError:
                    eager_oom = True
                    r["t_e"] = "OOM"
                torch.cuda.empty_cache()
            else:
                r["t_e"] = "OOM"
            for tag in ("a", "b", "bd", "s", "c", "d", "dp", "e"):
                t = r.get(f"t_{tag}")
                if isinstance(t, float):
                    # colsum does one q.k product: half the forward's matrix FLOPs.
                    r[f"tflops_{tag}"] = (flops / 2 if tag == "c" else flops) / (t * 1e-3) / 1e12
            r["wall_s"] = time.perf_counter() - t0
            rows.append(r)
            print(f"D={D} S={S}: " + ", ".join(f"{t}={r.get('t_' + t)}" for t in ("a", "b", "bd", "s", "c", "d", "dp", "e")),
                  flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


# The statistics read off the scores alone (no key set, no token ids): the group a flash kernel could
# be asked for without extra inputs. Printed beside (b) so that each group's cost is visible at every S.
SCORE_STATS = StatsRequest(lse=True, entropy=True, topk=1, sink_k=1, offsets=(1,))
NO_EAGER = False
NO_DENSE = False
BREAKDOWN_DENSE = False  # also time each token-statistic row with match / next_match in the loop


def fmt(x, spec=".0f"):
    return format(x, spec) if isinstance(x, (int, float)) else str(x or "-")


def table(rows) -> str:
    lines = [
        "TFLOP/s (forward, causal, bf16; colsum counted at its own FLOPs = half a forward) and ratios;",
        f"token ids Zipf(a={EXPONENT}) over {VOCAB} ids; (b) match/next_match path auto, (b-dn) forced dense:",
        f"{'D':>4} {'S':>6} {'BxH':>7} | {'(a)out':>7} {'(b)stats':>8} {'(b-dn)':>7} {'(c)cols':>7} {'(d)flash':>8} "
        f"{'(d)cudnn':>8} {'(e)eager':>8} | {'b/d':>5} {'s/d':>5} {'b/dp':>5} {'tc/tb':>5} {'b/a':>5} | "
        f"{'peak b':>7} {'peak d':>7} {'peak e':>7} {'mem b/d':>7} {'xtra b/d':>8}",
    ]
    for r in rows:
        tf = {t: r.get(f"tflops_{t}") for t in ("a", "b", "bd", "s", "c", "d", "dp", "e")}
        ratio = lambda x, y: f"{x / y:5.2f}" if x and y else "    -"  # noqa: E731
        tc_tb = f"{r['t_c'] / r['t_b']:5.2f}" if isinstance(r.get("t_c"), float) else "    -"
        pe = f"{r['mem_e']:7.1f}" if isinstance(r.get("mem_e"), float) else f"{'OOM':>7s}"
        pd = r.get("mem_d")
        lines.append(
            f"{r['D']:>4} {r['S']:>6} {str(r['B']) + 'x' + str(r['H']):>7} | {fmt(tf['a']):>7} {fmt(tf['b']):>8} "
            f"{fmt(tf['bd']):>7} {fmt(tf['c']):>7} {fmt(tf['d']):>8} {fmt(tf['dp']):>8} "
            f"{fmt(tf['e']) if tf['e'] else ('OOM' if r.get('t_e') == 'OOM' else '-'):>8} | "
            f"{ratio(tf['b'], tf['d'])} {ratio(tf['s'], tf['d'])} {ratio(tf['b'], tf['dp'])} {tc_tb} {ratio(tf['b'], tf['a'])} | "
            f"{fmt(r.get('mem_b'), '7.2f'):>7} {fmt(pd, '7.2f'):>7} {pe} {ratio(r.get('mem_b'), pd)}    "
            f"{ratio(r.get('extra_b'), r.get('extra_d'))}  path {r.get('path_b')}, repeat {r['repeat']:.4f}")
    lines.append("s/d: (s) = lse, entropy, top-1, sink_mass (k=1), offset_mass (1) only: no keyset, no token"
                 " statistics (their cost is b/d against s/d; `--breakdown` splits it further).")
    lines.append("peak = GiB allocated at the peak of one call, inputs included (same inputs for every column);"
                 " xtra = the part above what was allocated before the call (outputs, statistics, workspace).")
    return "\n".join(lines)


BREAKDOWN = [
    ("output only", StatsRequest()),
    ("+ lse", StatsRequest(lse=True)),
    ("+ entropy", StatsRequest(lse=True, entropy=True)),
    ("+ top-1", StatsRequest(lse=True, entropy=True, topk=1)),
    ("+ sink, offset 1", StatsRequest(lse=True, entropy=True, topk=1, sink_k=1, offsets=(1,))),
    ("+ keyset", StatsRequest(lse=True, entropy=True, topk=1, sink_k=1, offsets=(1,), keyset=True)),
    ("+ match", StatsRequest(lse=True, entropy=True, topk=1, sink_k=1, offsets=(1,), keyset=True, match=True)),
    ("+ next_match (= all)", StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)),
    ("match + next_match only", StatsRequest(match=True, next_match=True)),
    ("all but top-1", StatsRequest(lse=True, entropy=True, sink_k=1, offsets=(1,), keyset=True, match=True,
                                   next_match=True)),
    ("all but entropy", StatsRequest(lse=True, topk=1, sink_k=1, offsets=(1,), keyset=True, match=True,
                                     next_match=True)),
    ("all, keyset per element", StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False),
     dict(KEYSET_TENSOR_CORES=False)),
]


def breakdown(dims, S=16384) -> str:
    """Cumulative cost of each statistic at one length: where the time of (b) goes."""
    B = max(1, TOKENS // S)
    lines = [f"Cumulative statistics cost, causal bf16, S={S}, batch {B} (ms; TFLOP/s; x of output-only):"]
    for D in dims:
        H = HIDDEN // D
        q, k, v, tok, kset = bench_inputs(D, S, 7 + D)
        flops = 4 * B * H * S * S * D / 2
        base = None
        for name, req, *mod in BREAKDOWN:
            saved = {a: getattr(ta, a) for a in (mod[0] if mod else {})}
            for a, val in (mod[0] if mod else {}).items():
                setattr(ta, a, val)
            for path in (("auto", "dense") if req.needs_tokens and BREAKDOWN_DENSE else ("auto",)):
                ta.MATCH_PATH = path
                fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req, token_ids=tok,  # noqa: E731
                                                 keyset=kset if req.keyset else None)
                fn()
                used = "/".join(sorted(set(ta.last_match_paths.values()))) or "-"
                t = timeit(fn)
                ta.MATCH_PATH = "auto"
                base = base or t
                lines.append(f"  d{D:<4d} {name:26s} {used:6s} {t:8.3f} ms {flops / t / 1e9:6.0f} TFLOP/s"
                             f"  x{base / t:5.2f}")
            for a, val in saved.items():
                setattr(ta, a, val)
        # Kernel times of one (b) call: forward, sorts, plan ranges, pair passes (what the wall adds up to).
        req = BREAKDOWN[7][1]
        fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req, token_ids=tok, keyset=kset)  # noqa: E731
        fn()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        t_host = (time.perf_counter() - t0) / 50
        torch.cuda.synchronize()
        t_all = (time.perf_counter() - t0) / 50
        lines.append(f"  d{D} (b): host returns after {t_host * 1e3:.3f} ms per call, wall {t_all * 1e3:.3f} ms per call "
                     f"(50 calls back to back); CUDA kernels per call (mean of 5):")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:10]:
            lines.append(f"    {e.device_time_total / 5e3:8.3f} ms  x{e.count // 5:<3d} {e.key[:80]}")
        del q, k, v
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqs", default="1024,4096,16384,32768,65536")
    ap.add_argument("--quick", action="store_true", help="d64/d128 at 4k and 16k only")
    ap.add_argument("--breakdown", action="store_true", help="also: cumulative cost of each statistic")
    ap.add_argument("--breakdown-seqs", default="16384", help="lengths of the breakdown (B = 16k / S)")
    ap.add_argument("--no-eager", action="store_true", help="skip (e), the materialising baseline")
    ap.add_argument("--no-dense", action="store_true", help="skip (b-dn), match/next_match forced into the loop")
    args = ap.parse_args()
    global NO_EAGER, NO_DENSE
    NO_EAGER, NO_DENSE = args.no_eager, args.no_dense
    dims = [int(x) for x in args.dims.split(",")]
    seqs = [4096, 16384] if args.quick else [int(x) for x in args.seqs.split(",")]
    # Tune at 4k first: the autotune key has no length, so the first call's shape picks the config.
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}, "
          f"cudnn {torch.backends.cudnn.version()}", flush=True)
    t0 = time.perf_counter()
    order = sorted(seqs, key=lambda s: (s != 4096, s))
    rows = run(dims, order)
    rows.sort(key=lambda r: (r["D"], r["S"]))
    tuned = {}
    for name, tuner in (("forward", ta._fwd_tuned), ("colsum", ta._colsum_tuned)):
        for key, cfg in getattr(tuner, "cache", {}).items():
            tuned[f"{name} {key}"] = str(cfg)
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
            json.dump({"rows": rows, "tuned": tuned, "torch": torch.__version__, "triton": triton.__version__,
                       "device": torch.cuda.get_device_name()}, f, indent=1, default=str)
    print(f"\nbench wall {time.perf_counter() - t0:.0f}s; autotuned configs:")
    for k_, v_ in tuned.items():
        print(f"  {k_}: {v_}")
    if args.breakdown:
        for S in (int(x) for x in args.breakdown_seqs.split(",")):
            print(breakdown(dims, S))
    print(table(rows))


if __name__ == "__main__":
    main()
