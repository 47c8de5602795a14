"""Side-by-side A/B of two installed versions of the kernel: (b) every one-pass statistic, the
pair-pass share of it, and SDPA flash, alternated between the versions in one run.

Each version is a directory made by `pip install --target DIR .` of a commit; each round runs one
subprocess per version (a package cannot be imported twice in one process), in A B B A order, so
drift in clocks or temperature falls on both. Printed last: the median of each version per shape.

Usage (GPU):  python3 benchmarks/kernel_version_ab.py OLD_DIR NEW_DIR [--rounds 2] [--dims 64,128]
                  [--seqs 4096,16384,65536]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(dims, seqs) -> None:
    """One version (the one on sys.path): JSON rows of ms for (b), (b) without token statistics, flash."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, HERE)
    from kernel_bench import bench_inputs, timeit  # noqa: E402

    from headscope.kernels import StatsRequest
    from headscope.kernels import triton_attention as ta

    every = StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)
    no_tokens = StatsRequest(lse=True, entropy=True, topk=1, sink_k=1, offsets=(1,), keyset=True)
    for D in dims:
        for S in seqs:
            q, k, v, tok, kset = bench_inputs(D, S, S * 1000 + D)
            row = dict(D=D, S=S)
            for tag, req, kw in (("b", every, dict(token_ids=tok, keyset=kset)), ("b_notok", no_tokens, dict(keyset=kset))):
                fn = lambda req=req, kw=kw: ta.attention_triton(q, k, v, causal=True, request=req, **kw)  # noqa: E731
                fn()
                if tag == "b":  # the match path (b) took; b_notok has no token statistics
                    row["path"] = "/".join(sorted(set(ta.last_match_paths.values())))
                    row["path"] += f"+hot{ta.last_hot_tokens}" if getattr(ta, "last_hot_tokens", 0) else ""
                row[tag] = timeit(fn)

            def flash():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            flash()
            row["flash"] = timeit(flash)
            print("ROW " + json.dumps(row), flush=True)
            del q, k, v
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqs", default="4096,16384,65536")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    dims = [int(x) for x in a.dims.split(",")]
    seqs = [int(x) for x in a.seqs.split(",")]
    if a.child:
        child(dims, seqs)
        return
    rows: dict[str, list[dict]] = {"old": [], "new": []}
    order = []
    for r in range(a.rounds):
        order += ["old", "new"] if r % 2 == 0 else ["new", "old"]
    for name in order:
        env = dict(os.environ, PYTHONPATH=getattr(a, name))
        out = subprocess.run([sys.executable, __file__, a.old, a.new, "--child", "--dims", a.dims, "--seqs", a.seqs],
                             env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{name} failed")
        got = [json.loads(line[4:]) for line in out.stdout.splitlines() if line.startswith("ROW ")]
        print(name, json.dumps(got), flush=True)
        rows[name] += got
    print(f"\norder: {' '.join(order)}")
    print(f"{'D':>4} {'S':>6} | {'b old':>8} {'b new':>8} {'new/old':>7} | {'notok old':>9} {'notok new':>9} | "
          f"{'flash':>8} | {'flash/b old':>11} {'flash/b new':>11} | path")
    for D in dims:
        for S in seqs:
            med = {}
            for name in ("old", "new"):
                rs = [r for r in rows[name] if r["D"] == D and r["S"] == S]
                med[name] = {k: statistics.median(r[k] for r in rs) for k in ("b", "b_notok", "flash")}
                med[name]["path"] = rs[-1]["path"]
            fl = statistics.median([med["old"]["flash"], med["new"]["flash"]])
            o, n = med["old"], med["new"]
            print(f"{D:>4} {S:>6} | {o['b']:8.3f} {n['b']:8.3f} {n['b'] / o['b']:7.3f} | {o['b_notok']:9.3f} "
                  f"{n['b_notok']:9.3f} | {fl:8.3f} | {fl / o['b']:11.3f} {fl / n['b']:11.3f} | {n['path']}")


if __name__ == "__main__":
    main()
