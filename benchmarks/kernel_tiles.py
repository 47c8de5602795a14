"""Forward tile configs side by side in one run (GPU): which (BLOCK_M, BLOCK_N, warps, stages) the
autotune table should offer.

For each head_dim, length and config, the forward is forced to that config (autotune
bypassed) and two calls are timed: (a) output only and (b) every one-pass statistic (the benchmark's
request, sparse match path, so (b) includes the pair pass and sorts, which do not depend on the
config). Registers and spills come from the compiled kernel of this Triton. SDPA flash is timed on
the same inputs. bf16, causal, MHA, B x H as in kernel_bench.py. `--pair` sweeps the pair pass's
tile instead; `--paths` times the pair pass against the dense in-loop match path at short lengths
(wall time, host included), which sets `DENSE_MATCH_MAX_SCORES`.

Usage (GPU):  python3 benchmarks/kernel_tiles.py [--dims 64,128] [--seqs 4096,16384] [--pair | --paths]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from headscope.kernels import StatsRequest
from headscope.kernels import triton_attention as ta
from headscope.kernels.triton_forward import _attn_fwd
from headscope.kernels.triton_match_pairs import _pair_mass_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import HIDDEN, TOKENS, bench_inputs, timeit  # noqa: E402
from kernel_tokens import zipf_ids  # noqa: E402

# (BLOCK_M, BLOCK_N, warps, stages, register cap or 0). A cap of 128 at 64x64 x 4 warps lets 4
# programs share an SM instead of 3 (168 registers); 168 at d128 lets 3 share it instead of 2 (255).
CANDIDATES = {
    64: [(64, 64, 4, 3, 0), (64, 128, 4, 2, 0), (64, 128, 4, 3, 0), (128, 128, 8, 3, 0), (128, 64, 8, 3, 0),
         (64, 64, 4, 2, 128), (64, 64, 4, 3, 128), (128, 64, 8, 2, 128)],
    128: [(64, 64, 4, 3, 0), (64, 64, 4, 2, 0), (128, 64, 8, 2, 0), (128, 64, 8, 3, 0), (64, 32, 4, 3, 168),
          (64, 32, 4, 2, 168), (64, 64, 4, 2, 168)],
}


class Forced:
    """Stands in for the autotuned forward: launches `_attn_fwd` with one config, keeps the kernel."""

    def __init__(self, bm, bn, w, s, regs=0):
        self.cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        if regs:
            self.cfg["maxnreg"] = regs
        self.kernel = None

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.kernel = _attn_fwd[grid](*args, **kw, **self.cfg)
        return launch


REQ_SCORE = StatsRequest(lse=True, entropy=True, topk=1)


def problem(D: int, S: int):
    """The benchmark's inputs (as kernel_bench.py: B x S = 16k tokens, H x D = 2048) and SDPA flash's time."""
    q, k, v, tok, kset = bench_inputs(D, S, S * 1000 + D)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        t_flash = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    return q, k, v, tok, kset, t_flash


PAIR_VARIANTS = [(64, 4, 0), (64, 4, 96), (64, 4, 80), (64, 4, 64), (128, 8, 0)]  # BLOCK_M, warps, register cap


def pair_sweep(dims, seqs, req_b):
    """The pair pass's query tile (BLOCK_M, which also sets the plan's tiles), warps and register
    cap (a lower cap: more programs per SM to hide its gathers' latency): (b) timed whole with the
    forward autotuned as usual, the pair kernel alone from the profiler."""
    tiles, tuned = ta._pair_tiles, ta._pair_tuned
    print("pair pass: BLOCK_M, warps, register cap | (b) ms | pair kernel ms | b/flash | tuned config", flush=True)
    for D in dims:
        for S in seqs:
            q, k, v, tok, kset, t_flash = problem(D, S)
            first = None
            for bm, warps, regs in PAIR_VARIANTS:
                cap = {"maxnreg": regs} if regs else {}
                ta._pair_tiles = lambda interp, bm=bm: (bm, 64)
                ta._pair_tuned = triton.autotune(
                    configs=[triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=st, **cap)
                             for bn in (32, 64) for st in (2, 3, 4)],
                    key=["HEAD_DIM", "PREC", "MATCH", "NEXT", "LEN_BUCKET"])(_pair_mass_kernel)
                fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req_b, token_ids=tok,  # noqa: E731
                                                 keyset=kset)
                try:
                    out, st = fn()
                    t_b = timeit(fn)
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(5):
                            fn()
                        torch.cuda.synchronize()
                    t_pair = sum(e.device_time_total for e in prof.key_averages()
                                 if "_pair_mass" in e.key) / 5e3
                    if first is None:
                        first = st
                    diff = max((st[n] - first[n]).abs().nan_to_num(0).max().item()
                               for n in ("match_mass", "next_match_mass"))
                    best = ta._pair_tuned.best_config
                    print(f"  d{D} S={S} BLOCK_M={bm:<3d} warps={warps} cap={regs:<3d} | {t_b:7.3f} | {t_pair:7.3f} | "
                          f"{t_flash / t_b:5.2f} | {best} | match diff {diff:.1e}", flush=True)
                except Exception as exc:
                    print(f"  d{D} S={S} BLOCK_M={bm} warps={warps} cap={regs}: {type(exc).__name__}: "
                          f"{str(exc)[:200]}", flush=True)
            del q, k, v
            torch.cuda.empty_cache()
    ta._pair_tiles, ta._pair_tuned = tiles, tuned


def wall_ms(fn, calls: int = 50) -> float:
    """Wall time per call of `calls` back-to-back calls: the host's share included (short inputs)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e3


def path_sweep(dims, seqs, req_b):
    """match / next_match by the pair pass (sorts, plan, pair kernel) against the dense in-loop path
    (one count kernel), wall time per call with the host included, at short lengths: on the
    benchmark's shape (B x S = 16k tokens, H x D = 2048) for each head dim, and on the embedded
    model's (B 1, 9 heads, 3 kv heads, d64)."""
    print("match path: shape S | scores | wall ms pair pass | wall ms dense | GPU ms pair / dense | max diff",
          flush=True)
    for shape in [f"d{D}" for D in dims] + ["model"]:
        for S in seqs:
            if shape != "model":
                q, k, v, tok, kset = bench_inputs(int(shape[1:]), S, S + 3)
            else:
                g = torch.Generator(device="cuda").manual_seed(S)
                q = torch.randn(1, 9, S, 64, generator=g, device="cuda", dtype=torch.bfloat16)
                k, v = (torch.randn(1, 3, S, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
                tok = zipf_ids(1, S, g, "cuda")
                kset = torch.rand(1, S, generator=g, device="cuda") < 0.05
            fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req_b, token_ids=tok,  # noqa: E731
                                             keyset=kset)
            res = {}
            for path in ("sparse", "dense", "sparse", "dense"):  # alternated; the faster of two
                ta.MATCH_PATH = path
                out, st = fn()
                t = (wall_ms(fn), timeit(fn), st)
                res[path] = t if path not in res else (min(t[0], res[path][0]), min(t[1], res[path][1]), st)
            ta.MATCH_PATH = "auto"
            diff = max((res["sparse"][2][n] - res["dense"][2][n]).abs().nan_to_num(0).max().item()
                       for n in ("match_mass", "next_match_mass", "match_count", "next_match_count"))
            scores = q.shape[0] * q.shape[1] * S * S
            print(f"  {shape:5s} S={S:<5d} | {scores:.2e} | {res['sparse'][0]:7.3f} | {res['dense'][0]:7.3f} | "
                  f"{res['sparse'][1]:7.3f} / {res['dense'][1]:7.3f} | {diff:.1e}", flush=True)
            del q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqs", default="4096,16384")
    ap.add_argument("--pair", action="store_true", help="sweep the pair pass's tile instead of the forward's")
    ap.add_argument("--paths", action="store_true", help="pair pass against dense match path at short lengths")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)
    req_b = StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)
    dims, seqs = ([int(x) for x in arg.split(",")] for arg in (a.dims, a.seqs))
    if a.paths or a.pair:
        (path_sweep if a.paths else pair_sweep)(dims, seqs, req_b)
        return
    tuned = ta._fwd_tuned
    rows = []
    t_start = time.perf_counter()
    for D in dims:
        for S in seqs:
            q, k, v, tok, kset, t_flash = problem(D, S)
            ref = {}
            for cfg in CANDIDATES[D]:
                forced = Forced(*cfg)
                ta._fwd_tuned = forced
                r = dict(D=D, S=S, cfg=cfg, t_flash=t_flash)
                try:
                    for tag, req, kw in (("a", StatsRequest(), {}), ("s", REQ_SCORE, {}),
                                         ("b", req_b, dict(token_ids=tok, keyset=kset))):
                        fn = lambda: ta.attention_triton(q, k, v, causal=True, request=req, **kw)  # noqa: E731
                        out, st = fn()
                        r[f"regs_{tag}"] = forced.kernel.n_regs
                        r[f"spills_{tag}"] = forced.kernel.n_spills
                        r[f"t_{tag}"] = timeit(fn)
                        # Every variant must give the same numbers as the first (same inputs).
                        if tag not in ref:
                            ref[tag] = (out, st)
                        else:
                            o0, s0 = ref[tag]
                            r[f"dout_{tag}"] = ((out.float() - o0.float()).norm() / o0.float().norm()).item()
                            r[f"dstat_{tag}"] = max(
                                ((st[n].float() - s0[n].float()).abs().nan_to_num(0).max().item()
                                 for n in st if n not in ("argmax", "match_count", "next_match_count")),
                                default=0.0)
                except Exception as exc:  # a config that does not compile here is reported, not fatal
                    r["err"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(r)
                print(json.dumps(r), flush=True)
            ta._fwd_tuned = tuned
            del q, k, v, ref
            torch.cuda.empty_cache()
    print(f"wall {time.perf_counter() - t_start:.0f} s")
    print("ms per call (s = lse, entropy, top-1: no token statistics); TFLOP/s; b/flash; regs/spills of (s), (b);"
          " max |diff| to the first variant (out rel., stats abs.)")
    print(f"{'D':>4} {'S':>6} {'config':>20} | {'t_a':>7} {'t_s':>7} {'t_b':>7} {'flash':>7} | {'TF a':>5} {'TF s':>5}"
          f" {'TF b':>5} {'s/fl':>5} {'b/fl':>5} | {'regs s':>8} {'regs b':>8} | {'d out':>8} {'d stat':>8}")
    for r in rows:
        if "err" in r:
            print(f"{r['D']:>4} {r['S']:>6} {str(r['cfg']):>20} | {r['err']}")
            continue
        flops = 4 * max(1, TOKENS // r["S"]) * (HIDDEN // r["D"]) * r["S"] ** 2 * r["D"] / 2
        tf = lambda t: flops / t / 1e9  # noqa: E731
        print(f"{r['D']:>4} {r['S']:>6} {str(r['cfg']):>20} | {r['t_a']:7.3f} {r['t_s']:7.3f} {r['t_b']:7.3f} "
              f"{r['t_flash']:7.3f} | {tf(r['t_a']):5.0f} {tf(r['t_s']):5.0f} {tf(r['t_b']):5.0f} "
              f"{r['t_flash'] / r['t_s']:5.2f} {r['t_flash'] / r['t_b']:5.2f} | {r['regs_s']:>4}/{r['spills_s']:<3} "
              f"{r['regs_b']:>4}/{r['spills_b']:<3} | {max(r.get('dout_s', 0), r.get('dout_b', 0)):8.1e} "
              f"{max(r.get('dstat_s', 0), r.get('dstat_b', 0)):8.1e}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kernel_tiles.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
