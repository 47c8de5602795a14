"""Experiment (GPU, not part of the library): would an explicitly pipelined Hopper kernel carry the
per-element statistics faster than the Triton kernel? A Gluon (Triton 3.6's layout-explicit dialect)
forward for causal bf16 attention, head_dim 64, MHA, S a multiple of 64, with lse, entropy and top-1
(the statistics that cost per score), written the FlashAttention-3 way inside one warpgroup: the next
tile's S = Q K^T is issued asynchronously before this tile's softmax, so the tensor cores and the
softmax's ALU work overlap; K and V arrive by TMA into a ring of shared-memory buffers.

Checked against a float32 torch reference on small shapes, then timed beside our Triton kernel (same
request) and SDPA flash. Run 20 (KERNEL_NOTES log 25): correct, and as fast as the Triton kernel within
3%, not faster. The starting point for a warp-specialised kernel (producer warp, two consumer
warpgroups in ping-pong), which is what this loop lacks. Usage (GPU): python3 benchmarks/gluon_probe.py
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@gluon.jit
def _softmax(s, m_i, l_i, ent, top1, col, n0, rows_pos, qk_scale, MASKED: gl.constexpr, STATS: gl.constexpr):
    """One tile's online softmax on S [BM, BN] (raw scores): p, alpha and the updated row sums."""
    if MASKED:
        s = gl.where(col[None, :] + n0 <= rows_pos[:, None], s, float("-inf"))
    tmax = gl.max(s, 1)
    m_new = gl.maximum(m_i, tmax * qk_scale)
    if STATS:
        targ = gl.min(gl.where(s == tmax[:, None], col[None, :], 1 << 30), 1)
        top1 = gl.where(m_new > m_i, targ + n0, top1)
    alpha = gl.exp2(m_i - m_new)
    d = s * qk_scale - m_new[:, None]
    p = gl.exp2(d)
    if STATS:
        shift = gl.where(m_i == float("-inf"), 0.0, m_i - m_new)
        if MASKED:
            pd = p * gl.maximum(d, -1.0e30)
        else:
            pd = p * d
        ent = alpha * (ent + shift * l_i) + gl.sum(pd, 1)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i, ent, top1


@gluon.jit
def _step(j, n_tiles, s_cur, acc, m_i, l_i, ent, top1, col, rows_pos, qk_scale, q_smem, k_smem, v_smem, k_bars,
          v_bars, k_desc, v_desc, row0, s_zero, MASKED: gl.constexpr, STATS: gl.constexpr, BLOCK_N: gl.constexpr,
          STAGES: gl.constexpr, orow: gl.constexpr, p_layout: gl.constexpr):
    """Tile j (not the last): issue S of tile j + 1, softmax of tile j, P V of tile j, refill buffers."""
    nb = (j + 1) % STAGES
    mbarrier.wait(k_bars.index(nb), ((j + 1) // STAGES) & 1)
    s_next = warpgroup_mma(q_smem, k_smem.index(nb).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    p, alpha, m_i, l_i, ent, top1 = _softmax(s_cur, m_i, l_i, ent, top1, col, j * BLOCK_N, rows_pos, qk_scale,
                                             MASKED, STATS)
    acc = warpgroup_mma_wait(1, deps=(acc,))  # P V of the previous tile done; S next may run on
    acc = acc * gl.convert_layout(alpha, orow)[:, None]
    cb = j % STAGES
    mbarrier.wait(v_bars.index(cb), (j // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(cb), acc, is_async=True)
    s_cur = warpgroup_mma_wait(1, deps=(s_next,))  # S next done; this P V may run on
    # Refill: K of this tile (its S is done), V of the previous tile (its P V is done).
    nk = j + STAGES
    if nk < n_tiles:
        mbarrier.expect(k_bars.index(cb), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + nk * BLOCK_N, 0], k_bars.index(cb), k_smem.index(cb))
    nv = j - 1 + STAGES
    if (j >= 1) & (nv < n_tiles):
        vb = (j - 1) % STAGES
        mbarrier.expect(v_bars.index(vb), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row0 + nv * BLOCK_N, 0], v_bars.index(vb), v_smem.index(vb))
    return s_cur, acc, m_i, l_i, ent, top1


@gluon.jit
def _fwd(q_desc, k_desc, v_desc, Out, Lse, Ent, Amax, S, qk_scale,
         STATS: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
         STAGES: gl.constexpr, num_warps: gl.constexpr):
    n_blocks = gl.num_programs(0)
    pid_m = n_blocks - 1 - gl.program_id(0)  # longest rows first: better tail for causal
    pid_bh = gl.program_id(1)
    row0 = pid_bh * S
    m0 = pid_m * BLOCK_M

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow: gl.constexpr = gl.SliceLayout(1, s_layout)
    scol: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol: gl.constexpr = gl.SliceLayout(0, o_layout)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    n_tiles = (m0 + BLOCK_M + BLOCK_N - 1) // BLOCK_N
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row0 + m0, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        if i < n_tiles:
            mbarrier.expect(k_bars.index(i), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [row0 + i * BLOCK_N, 0], k_bars.index(i), k_smem.index(i))
            mbarrier.expect(v_bars.index(i), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [row0 + i * BLOCK_N, 0], v_bars.index(i), v_smem.index(i))

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s_cur = warpgroup_mma_wait(0, deps=(s_cur,))

    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, srow)
    l_i = gl.zeros([BLOCK_M], gl.float32, srow)
    ent = gl.zeros([BLOCK_M], gl.float32, srow)
    top1 = gl.full([BLOCK_M], -1, gl.int32, srow)
    col = gl.arange(0, BLOCK_N, scol)
    rows_pos = m0 + gl.arange(0, BLOCK_M, srow)

    # Tiles below the diagonal need no mask; the rest of the loop and the last tile do.
    n_full = m0 // BLOCK_N
    for j in range(0, n_full):
        s_cur, acc, m_i, l_i, ent, top1 = _step(
            j, n_tiles, s_cur, acc, m_i, l_i, ent, top1, col, rows_pos, qk_scale, q_smem, k_smem, v_smem, k_bars,
            v_bars, k_desc, v_desc, row0, s_zero, False, STATS, BLOCK_N, STAGES, orow, p_layout)
    for j in range(n_full, n_tiles - 1):
        s_cur, acc, m_i, l_i, ent, top1 = _step(
            j, n_tiles, s_cur, acc, m_i, l_i, ent, top1, col, rows_pos, qk_scale, q_smem, k_smem, v_smem, k_bars,
            v_bars, k_desc, v_desc, row0, s_zero, True, STATS, BLOCK_N, STAGES, orow, p_layout)

    j = n_tiles - 1
    p, alpha, m_i, l_i, ent, top1 = _softmax(s_cur, m_i, l_i, ent, top1, col, j * BLOCK_N, rows_pos, qk_scale,
                                             True, STATS)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    acc = acc * gl.convert_layout(alpha, orow)[:, None]
    cb = j % STAGES
    mbarrier.wait(v_bars.index(cb), (j // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_smem.index(cb), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    out = acc / gl.convert_layout(l_i, orow)[:, None]
    offs_m = m0 + gl.arange(0, BLOCK_M, orow)
    offs_d = gl.arange(0, HEAD_DIM, ocol)
    gl.store(Out + (row0 + offs_m)[:, None].to(gl.int64) * HEAD_DIM + offs_d[None, :], out.to(gl.bfloat16))
    if STATS:
        rows = row0 + rows_pos
        log2l = gl.log2(l_i)
        gl.store(Lse + rows, (m_i + log2l) * 0.6931471805599453)
        gl.store(Ent + rows, 0.6931471805599453 * (log2l - ent / l_i))
        gl.store(Amax + rows, top1)


def gluon_attention(q, k, v, stats=True, block=(64, 64), stages=3, num_warps=4):
    """q, k, v [B, H, S, 64] bf16 contiguous, causal: out and (lse, entropy, argmax) [B, H, S]."""
    B, H, S, D = q.shape
    bm, bn = block
    assert D == 64 and S % bm == 0 and S % bn == 0 and q.dtype == torch.bfloat16
    q2, k2, v2 = (t.reshape(B * H * S, D) for t in (q, k, v))
    desc = lambda t, rows: TensorDescriptor(  # noqa: E731
        t, list(t.shape), list(t.stride()), [rows, D], gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16))
    qd, kd, vd = desc(q2, bm), desc(k2, bn), desc(v2, bn)
    out = torch.empty_like(q)
    lse = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    ent = torch.empty_like(lse)
    amax = torch.empty(B, H, S, device=q.device, dtype=torch.int32)
    _fwd[(S // bm, B * H)](qd, kd, vd, out, lse, ent, amax, S, LOG2E / math.sqrt(D),
                              STATS=stats, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, STAGES=stages,
                              num_warps=num_warps)
    return out, lse, ent, amax


def reference(q, k, v):
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    S = q.shape[2]
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(s, -1)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    return p @ v.float(), torch.logsumexp(s, -1), ent, p


def check(**cfg):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1024, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse, ent, amax = gluon_attention(q, k, v, **cfg)
    ro, rl, re, p = reference(q, k, v)
    rel = ((out.float() - ro).norm() / ro.norm()).item()
    pa = p.gather(-1, amax.long()[..., None])[..., 0]
    tie_gap = (p.max(-1).values - pa).abs().max().item()
    res = dict(out_rel=rel, lse=(lse - rl).abs().max().item(), ent=(ent - re).abs().max().item(),
               argmax_diff=int((amax.long() != p.argmax(-1)).sum()), argmax_p_gap=tie_gap)
    print(f"check (S=1k, B=2, H=4) {cfg}:", res, flush=True)
    return rel < 1e-2 and res["lse"] < 1e-3 and res["ent"] < 1e-3 and tie_gap <= 1e-6


def bench():
    from headscope.kernels import StatsRequest
    from headscope.kernels import triton_attention as ta
    timeit = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
    req = StatsRequest(lse=True, entropy=True, topk=1)
    print(f"{'S':>6} {'BxH':>6} | ms: {'flash':>7} {'tri out':>8} {'tri lse+ent+top1':>17} | "
          f"{'gl out':>7} {'gl stats':>9} | gl/tri (stats) | gl stats/flash | tri stats/flash", flush=True)
    for S in (4096, 16384):
        B = max(1, 16384 // S)
        g = torch.Generator(device="cuda").manual_seed(S)
        q, k, v = (torch.randn(B, 32, S, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            t_fl = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        t_ta = timeit(lambda: ta.attention_triton(q, k, v, causal=True, request=StatsRequest()))
        t_tb = timeit(lambda: ta.attention_triton(q, k, v, causal=True, request=req))
        for cfg in (((64, 64), 2, 4), ((64, 64), 4, 4), ((128, 64), 2, 8), ((128, 64), 3, 8), ((64, 128), 2, 4),
                    ((128, 128), 2, 8)):
            t_ga = timeit(lambda: gluon_attention(q, k, v, stats=False, block=cfg[0], stages=cfg[1], num_warps=cfg[2]))
            t_gb = timeit(lambda: gluon_attention(q, k, v, stats=True, block=cfg[0], stages=cfg[1], num_warps=cfg[2]))
            print(f"{S:>6} {B}x32 | ms: {t_fl:7.3f} {t_ta:8.3f} {t_tb:17.3f} | {t_ga:7.3f} {t_gb:9.3f} | "
                  f"{t_tb / t_gb:14.2f} | {t_fl / t_gb:14.2f} | {t_fl / t_tb:15.2f}   (block, stages, warps) {cfg}",
                  flush=True)
        del q, k, v


if __name__ == "__main__":
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)
    ok = all([check(block=(64, 64), stages=2), check(block=(128, 64), stages=2, num_warps=8),
              check(block=(64, 128), stages=2), check(block=(128, 128), stages=2, num_warps=8)])
    if not ok:
        sys.exit("gluon kernel does not match the reference")
    bench()
