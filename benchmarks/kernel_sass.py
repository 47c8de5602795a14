"""Offline SASS of the forward kernel for sm_90a (no GPU, no device time): registers, spills and the
instruction count of each loop that issues HGMMA (the interior loop is what bounds throughput).

The local Triton wheel compiles `_attn_fwd` for GPUTarget("cuda", 90, 32) with the divisibility-16
attributes the runtime JIT would add on the benchmark shapes, ptxas reports registers / spills, and
cuobjdump disassembles. Triton versions differ (3.9 here, 3.6 on the GPU machine): counts are leads.

Usage:  python benchmarks/kernel_sass.py [--variant all|out|...] [--tile 128,64,4,3] [--dim 64]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from headscope.kernels.triton_forward import _attn_fwd  # noqa: E402

PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "KeyValid": "*u8", "Tok": "*i32",
       "PrevTok": "*i32", "Keyset": "*fp32", "KeyW": "*bf16", "KsKeys": "*u8", "KsBeta": "*fp32",
       "KbKeys": "*u8", "KbBias": "*fp32", "HeadMask": "*u8", "First": "*i32", "Offs": "*i32",
       "AmaxO": "*i64", "HotIdx": "*i32"}
ONE = {"sqd", "skd", "svd", "G"}  # == 1 on the benchmark shapes: specialised away by the JIT
INTS = {"H", "Sq", "Sk", "OFF", "LEN_BUCKET", "window", "sink_k"}

VARIANTS = {
    "out": dict(),
    "lse": dict(LSE=True),
    "ent": dict(LSE=True, ENT=True),
    "top1": dict(LSE=True, ENT=True, TOPK=1, FAST_TOP1=True),
    "sinkoff": dict(LSE=True, ENT=True, TOPK=1, FAST_TOP1=True, SINK=True, NOFF=1),
    "all": dict(LSE=True, ENT=True, TOPK=1, FAST_TOP1=True, SINK=True, NOFF=1, KEYSET=True, SAVE_LSE=True),
    "all_hot": dict(LSE=True, ENT=True, TOPK=1, FAST_TOP1=True, SINK=True, NOFF=1, KEYSET=True, SAVE_LSE=True,
                    HOT_M=True, HOT_N=True),
    "all_dense": dict(LSE=True, ENT=True, TOPK=1, FAST_TOP1=True, SINK=True, NOFF=1, KEYSET=True,
                      MATCH=True, NEXT=True),
}


MAXNREG = int(os.environ.get("MAXNREG", "0"))  # a register cap (Triton's maxnreg), 0: none


def compile_fwd(flags: dict, bm: int, bn: int, warps: int, stages: int, dim: int):
    fn = _attn_fwd
    base = dict(HEAD_DIM=dim, D_TRUE=dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, HAS_WINDOW=False, HAS_KV=False,
                SOFTCAP=False, KEY_BIAS=False, KEY_SCALE=False, HAS_ZERO=False, HAS_UNIFORM=False, LSE=False,
                ENT=False, TOPK=0, KPAD=2, SINK=False, NOFF=0, MATCH=False, NEXT=False,
                KEYSET=False, KW=16, SAVE_LSE=False, PREC="tf32", PRESCALED=False, FAST_TOP1=False, HEAVY=0,
                HOT_M=False, HOT_N=False, N_HOT=7)
    base.update(flags)
    names = fn.arg_names
    sig, const, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in base:
            sig[n] = "constexpr"
            const[(i,)] = base[n]
        elif n in ONE:
            sig[n] = "constexpr"
            const[(i,)] = 1
        elif n not in INTS and (n in PTR or n[0].isupper()):
            sig[n] = PTR.get(n, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("qk_scale", "cap2"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            if n not in ("window", "sink_k"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages,
                                       **({"maxnreg": MAXNREG} if MAXNREG else {})))


def sass_report(k, top_n: int = 12) -> str:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
        path = f.name
    sass = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-sass", path], capture_output=True, text=True).stdout
    res = subprocess.run([os.path.join(bin_dir, "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    res = " ".join(re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+|LOCAL:\d+)", res))
    os.unlink(path)
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", ln).group(1), 16) for ln in lines]
    loops = []
    for i, ln in enumerate(lines):
        m = re.search(r"BRA\s+(?:`?\(?\.L_x_\d+\)?|0x([0-9a-f]+))", ln)
        if m and m.group(1):
            tgt = int(m.group(1), 16)
            if tgt < addr[i]:
                j = addr.index(tgt) if tgt in addr else None
                if j is not None:
                    body = lines[j:i + 1]
                    if any("HGMMA" in b for b in body):
                        ops = {}
                        for b in body:
                            op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", b)
                            if op:
                                key = op.group(1).split(".")[0]
                                ops[key] = ops.get(key, 0) + 1
                        top = sorted(ops.items(), key=lambda x: -x[1])[:top_n]
                        loops.append(f"loop @{tgt:#x}: {len(body)} instr; " + " ".join(f"{a}:{b}" for a, b in top))
    return f"{res}, total {len(lines)} instr\n  " + "\n  ".join(loops)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="out,all")
    ap.add_argument("--tile", default="128,64,4,3")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per loop")
    a = ap.parse_args()
    bm, bn, w, s = (int(x) for x in a.tile.split(","))
    for v in a.variant.split(","):
        k = compile_fwd(VARIANTS[v], bm, bn, w, s, a.dim)
        print(f"[{v}] d{a.dim} {bm}x{bn} w{w} s{s}: {sass_report(k, a.top)}", flush=True)


if __name__ == "__main__":
    main()
