"""Probe benchmarks (CPU), measured side by side in one run:

1. peak RSS of recording every one-pass statistic for every head of the embedded model at 8,192
   tokens (a fresh subprocess, ru_maxrss), target < 6 GB;
2. time of a recorded forward vs a plain forward at 1,024 tokens (target <= 1.3x), with
   TransformerLens `run_with_cache` on the same weights beside it;
3. cold (fresh HEADSCOPE_CACHE: GGUF conversion) and cached model load, each in a fresh subprocess.

    python benchmarks/probe_bench.py [--seq 1024] [--rss-seq 8192] [--repeats 3] [--skip-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

RSS_CHILD = r"""
import resource, sys, torch
from headscope.probe import load_model, StatsRequest
from headscope.kernels.stats import ONE_PASS
S = int(sys.argv[1])
m = load_model()
ids = torch.randint(1000, 40000, (1, S))
req = StatsRequest.all(topk=1, sink_k=4, offsets=(1, 2), keyset=True, colsum=False)
keyset = torch.zeros(1, S, dtype=torch.bool); keyset[:, :16] = True
t = __import__("time").perf_counter()
_, rec = m.run_recorded(ids, None, req, keyset=keyset)
dt = __import__("time").perf_counter() - t
assert set(rec.stats) >= {"lse", "entropy", "offset_mass", "match_mass", "next_match_mass", "keyset_mass"}
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, dt)
"""

LOAD_CHILD = r"""
import time
t = time.perf_counter()
from headscope.probe import load_model
m = load_model()
print("RESULT", time.perf_counter() - t)
"""


def child(code: str, *args, env=None) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return [float(x) for x in line.split()[1:]]


def overhead(seq: int, repeats: int) -> dict:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    from headscope.probe import StatsRequest, load_model
    from headscope.probe.loading import embedded_cache_dir

    torch.set_grad_enabled(False)
    m = load_model()
    tl_model = load_model()  # boot_transformers rewires the model it is given: its own copy
    bridge = TransformerBridge.boot_transformers(str(embedded_cache_dir()), hf_model=tl_model.hf,
                                                 tokenizer=tl_model.tokenizer)
    ids = torch.randint(1000, 40000, (1, seq))
    one_pass = StatsRequest.all(topk=1, sink_k=4, offsets=(1, 2), colsum=False)
    everything = StatsRequest.all(topk=1, sink_k=4, offsets=(1, 2), colsum=True)
    runs = {
        "plain forward (sdpa)": lambda: m(input_ids=ids),
        "recorded: no stats (headscope attention)": lambda: m.run_recorded(ids, None, StatsRequest()),
        "recorded: all one-pass stats": lambda: m.run_recorded(ids, None, one_pass),
        "recorded: one-pass + colsum": lambda: m.run_recorded(ids, None, everything),
        "TransformerLens run_with_cache (patterns only)": lambda: bridge.run_with_cache(
            ids, names_filter=lambda n: n.endswith("hook_pattern")),
        "TransformerLens run_with_cache (full cache)": lambda: bridge.run_with_cache(ids),
    }
    times = {k: [] for k in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved, so drifting machine load hits every variant alike
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain forward (sdpa)"]
    return {k: {"seconds": v, "ratio": v / base} for k, v in med.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--rss-seq", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = {"torch_threads": __import__("torch").get_num_threads(), "cpu_count": os.cpu_count()}

    res["overhead"] = overhead(args.seq, args.repeats)
    print(f"\nforward at {args.seq} tokens (median of {args.repeats}, interleaved):")
    for k, v in res["overhead"].items():
        print(f"  {k:50s} {v['seconds']:8.3f} s  {v['ratio']:5.2f}x")

    if not args.skip_rss:
        rss, dt = child(RSS_CHILD, args.rss_seq)
        res["rss"] = {"seq": args.rss_seq, "peak_rss_bytes": rss, "seconds": dt}
        print(f"\npeak RSS, all one-pass stats, every head, {args.rss_seq} tokens: {rss / 2**30:.2f} GiB ({dt:.1f} s)")

    cached = child(LOAD_CHILD)[0]
    res["load"] = {"cached_s": cached}
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as d:
            res["load"]["cold_s"] = child(LOAD_CHILD, env={"HEADSCOPE_CACHE": d})[0]
        print(f"\nload: cold {res['load']['cold_s']:.1f} s, cached {cached:.1f} s "
              f"({res['load']['cold_s'] / cached:.1f}x)")
    else:
        print(f"\nload: cached {cached:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
