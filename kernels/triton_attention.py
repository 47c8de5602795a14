"""`attention_triton`: host side of the fused Triton attention (kernels in triton_forward / triton_colsum).

Launches, per call: the forward kernel (output + one-pass statistics); when match / next_match are
requested on a large problem, their plan (two sorts and a range kernel) and one pair pass that writes
both masses and their counts (`triton_match_pairs`; nothing waits on the device, so the GPU never
idles behind the host), on a small one the comparisons in the forward loop and a token-count kernel
(`MATCH_PATH`, `DENSE_MATCH_MAX_SCORES`); and the colsum pass when colsum is requested. Semantics
are those of `reference.attention_reference`, which the tests hold this to.

Under TRITON_INTERPRET=1 (CPU CI) the kernels run in Triton's interpreter on CPU tensors with one
small block configuration; on CUDA the forward, pair and colsum kernels are autotuned over a few
Hopper configurations keyed on head_dim, a coarse length bucket and (forward) the statistics' class.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import torch
import triton

from .edits import KeyBias, KeyScale
from .errors import BackwardNotSupportedError, KernelInputError
from .stats import StatsRequest
from .triton_colsum import _colsum_kernel
from .triton_forward import LOG2E, NO_TOKEN_ID, _attn_fwd, _match_counts
from .token_columns import fill_hot_columns, hot_counts, hot_row_index, hot_tokens
from .triton_match_pairs import _Q_SENTINEL, _pair_mass_kernel, key_tokens, pair_plan, query_tokens, sort_rows

MAX_TOPK = 16
MAX_OFFSETS = 32
MAX_HEAD_DIM = 256
KEY_W = 16  # columns of the key-weight tile (tl.dot needs >= 16); column 0 carries the key set
# keyset_mass on the tensor cores (p rounded as for P.V) or per element in fp32. None = by head dim:
# measured on H100/H200 (KERNEL_NOTES.md run 10) the tensor-core tile is 14-17% faster for all
# statistics at d64 and the per-element sum 9-10% faster at d128 (same tile config).
KEYSET_TENSOR_CORES: bool | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head_dim, for Hopper (sm_90, 228 KB smem).
# ptxas for sm_90a (compiled offline, benchmarks/kernel_sass.py): with every one-pass statistic on
# the pair path (sink / offsets in the epilogue, keyset on the tensor cores), d64 128x64 at 4 warps
# still spills (192 B stack) and d128 128x128 at 8 warps too (208 B); d64 128x128 at 8 warps no
# longer does (255 registers, no stack). The spilling ones are tried for light requests alone.
_FWD_CONFIGS = {
    16: [(128, 64, 4, 3), (128, 64, 8, 3)],
    32: [(128, 64, 4, 3), (128, 64, 8, 3)],
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}
_LIGHT_ONLY = {(64, 128, 64, 4, 3), (128, 128, 128, 8, 2)}
_COLSUM_CONFIGS = {
    16: [(64, 128, 4, 3), (128, 128, 8, 3)],
    32: [(64, 128, 4, 3), (128, 128, 8, 3)],
    64: [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    128: [(64, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (64, 128, 8, 2)],
}


def _configs(table):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for d, rows in table.items() for (bm, bn, w, s) in rows]


def _prune_for_dim(table):
    def prune(configs, named_args, **kwargs):
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        heavy = kwargs.get("HEAVY", named_args.get("HEAVY", 0))
        keep = {(bm, bn, w, s) for (bm, bn, w, s) in table[d] if not (heavy and (d, bm, bn, w, s) in _LIGHT_ONLY)}
        out, seen = [], set()
        for c in configs:
            key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            if key in keep and key not in seen:
                seen.add(key)
                out.append(c)
        return out
    return prune


# The key is kept small so a model's 30 layers hit one tuning result: head_dim, dtype, the "heavy"
# flag (statistics that add per-element work and registers) and a coarse length bucket (the best
# tile at 1k tokens is not the best at 64k). LEN_BUCKET is a plain int argument the kernels never
# read, always a multiple of 16, so a new bucket re-tunes but never recompiles.
_fwd_tuned = triton.autotune(
    configs=_configs(_FWD_CONFIGS), key=["HEAD_DIM", "PREC", "HEAVY", "LEN_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_for_dim(_FWD_CONFIGS)},
)(_attn_fwd) if not _interpreting() else None
# The pair pass: short programs whose K rows are gathered through the sorted key order (latency-bound
# at 4k: 0.23 ms per statistic with one 64-key stage), so deeper pipelines are tried.
_pair_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=4, num_stages=st) for bn in (32, 64) for st in (2, 3, 4)],
    key=["HEAD_DIM", "PREC", "MATCH", "NEXT", "ADD", "LEN_BUCKET"],
    restore_value=["Out1", "Out2"],  # ADD: each timed run adds to the forward's masses
)(_pair_mass_kernel) if not _interpreting() else None
_colsum_tuned = triton.autotune(
    configs=_configs(_COLSUM_CONFIGS), key=["HEAD_DIM", "PREC", "LEN_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_for_dim(_COLSUM_CONFIGS)},
)(_colsum_kernel) if not _interpreting() else None



# Test hooks. Tiles used under the interpreter (tests vary them so that BLOCK_M != BLOCK_N and the
# interior / edge block split is exercised), and poisoning: when True every output is allocated
# filled with NaN (argmax with -7777) so that an element the kernel forgets to write cannot pass.
INTERPRET_TILES = (16, 16)
POISON_OUTPUTS = False
# Benchmarks: with KEEP_COLSUM_LAUNCH set, `last_colsum_launch` is a no-argument callable that
# relaunches the last colsum pass (same inputs, same lse) so the second pass can be timed alone.
# Off by default: the closure holds q, k and the buffers alive.
KEEP_COLSUM_LAUNCH = False
# match / next_match path: "sparse" = the pair pass after the forward (sorts, plan, pair kernel; no
# host sync), "dense" = in the forward loop (one count kernel), "auto" = dense up to
# DENSE_MATCH_MAX_SCORES scores (B x H x Sq x Sk), the pair pass above. Both give the same sums.
# Measured on H200 (KERNEL_NOTES.md log 29, wall time per call, host included): the pair pass's fixed
# cost (two sorts, three launches, ~0.4 ms) outweighs the dense path's per-score work up to ~6e8
# scores at d64 and d128 (dense 0.36-0.63 ms vs 0.65-0.75 ms; equal at 5.4e8, d128), not from ~7.5e8
# (d128 3k tokens x 16 heads x 5: 0.96 vs 0.89 ms); the embedded model's shape (9 heads, batch 1) stays
# dense up to 8k tokens (0.88 vs 1.10 ms at 8k).
MATCH_PATH = "auto"
DENSE_MATCH_MAX_SCORES = 650_000_000
last_match_paths: dict[str, str] = {}
# On the pair path, with keyset_mass on the tensor cores (its key-weight product runs anyway), causal
# and without key_scale: the HOT_TOKENS most frequent tokens of each sequence ride in the key-weight
# tile's spare columns and their rows leave the pair pass (`token_columns.py`; its N_HOT = 7 fits the
# tile). Off (0) until it is timed on the GPU (KERNEL_NOTES log 42: correct under the interpreter,
# not yet measured; `benchmarks/kernel_switch_ab.py --set HOT_TOKENS=0,7` is the measurement).
HOT_TOKENS = 0
last_hot_tokens = 0  # hot tokens of the last call (0: none), for tests and benchmarks
last_colsum_launch = None


def _small_config(interp: bool, head_dim: int) -> dict:
    """Fixed tiles for the interpreter (tiny, fast to emulate) and for short query blocks (decoding)."""
    if interp:
        return {"BLOCK_M": INTERPRET_TILES[0], "BLOCK_N": INTERPRET_TILES[1]}
    return {"BLOCK_M": 16, "BLOCK_N": 64 if head_dim >= 256 else 128}


def _pair_tiles(interp: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the sparse match pass: the interpreter's small tiles, else 64 x 64
    (BLOCK_N is autotuned on the GPU; BLOCK_M fixes the plan's tiles)."""
    return INTERPRET_TILES if interp else (64, 64)


_OFFSETS_CACHE: dict = {}


def _offsets_tensor(offsets: tuple, dev) -> torch.Tensor:
    """The offsets as an int32 device tensor, made once per (offsets, device): building it each call
    is a host-to-device copy, which PyTorch makes blocking (the GPU would idle behind the host)."""
    key = (offsets, str(dev))
    t = _OFFSETS_CACHE.get(key)
    if t is None:
        t = _OFFSETS_CACHE[key] = torch.tensor(offsets, dtype=torch.int32, device=dev)
    return t


def _len_bucket(Sq: int, Sk: int) -> int:
    """16 (<= 2k keys), 32 (<= 8k), 48 (<= 32k), 64 (longer)."""
    b = 16 if Sk <= 2048 else 32 if Sk <= 8192 else 48 if Sk <= 32768 else 64
    return b


def _as_u8(t: torch.Tensor | None, B: int, Sk: int, dev) -> torch.Tensor:
    if t is None:
        return torch.empty(1, dtype=torch.uint8, device=dev)
    return t.to(device=dev, dtype=torch.uint8).contiguous()


# CUDA limits grid axes 1 and 2 to 65,535 programs; the kernels put batch x heads (the count
# kernel: batch) on axis 1, so larger batches are run in slices of whole sequences.
MAX_GRID_Y = 65_535


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fused attention + statistics. q [B, H, Sq, D]; k, v [B, Hkv, Sk, D] (same dtype: fp16/bf16/fp32).

    Masks are [B, Sk] bool, token_ids [B, Sk] int. Returns out [B, H, Sq, D] in q's dtype and the
    float32 statistics of `request` with the shapes of `headscope.kernels.stats` (argmax int64).
    Inputs are assumed validated by `dispatch.attention` (shapes, GQA divisibility, edits).
    Keywords: those of `_attention_call`. Batches with B x H > MAX_GRID_Y run in slices along B
    (every statistic is per sequence, so the slices' results are concatenated unchanged).
    """
    B, H = q.shape[0], q.shape[1]
    step = MAX_GRID_Y // H
    if B * H <= MAX_GRID_Y:
        return _attention_call(q, k, v, **kw)
    if step == 0:
        raise KernelInputError(f"{H} heads exceed the CUDA grid limit of {MAX_GRID_Y}; use backend='torch'.")
    parts = [_attention_call(q[i:i + step], k[i:i + step], v[i:i + step], **_batch_slice(kw, i, i + step))
             for i in range(0, B, step)]
    out = torch.cat([o for o, _ in parts])
    return out, {name: torch.cat([s[name] for _, s in parts]) for name in parts[0][1]}


def _map_key_inputs(kw: dict, fn) -> dict:
    """kw with fn applied to every per-key input [B, (H,) S]: masks, token ids and the edits' key sets."""
    out = dict(kw)
    for name in ("key_valid", "token_ids", "keyset"):
        if out.get(name) is not None:
            out[name] = fn(out[name])
    for name in ("key_scale", "key_bias"):
        if out.get(name) is not None:
            out[name] = replace(out[name], keys=fn(out[name].keys))
    return out


def _batch_slice(kw: dict, lo: int, hi: int) -> dict:
    """The per-sequence keyword arguments of `_attention_call` cut to sequences lo..hi-1."""
    return _map_key_inputs(kw, lambda t: t[lo:hi])


def _attention_call(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    causal: bool = True, sm_scale: float | None = None, window: int | None = None,
    softcap: float | None = None, key_valid: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None, keyset: torch.Tensor | None = None,
    request: StatsRequest = StatsRequest(), head_mask: torch.Tensor | None = None,
    head_mask_mode: str = "zero", key_scale: KeyScale | None = None, key_bias: KeyBias | None = None,
    key_start: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One launch set of `attention_triton` (B x H <= MAX_GRID_Y).

    key_start > 0: k[:, :, 0] sits at sequence position key_start, the per-key inputs span all
    key_start + Sk positions (validated by `dispatch.attention`: the dropped keys are outside every
    window). Masks and offsets are relative, so the kernels run on the Sk keys as given; only the
    sink's first key, the previous token of key 0, and argmax / colsum are placed here."""
    full_valid, full_tok = key_valid, token_ids
    if key_start:
        cut = _map_key_inputs(dict(key_valid=key_valid, token_ids=token_ids, keyset=keyset, key_scale=key_scale,
                                   key_bias=key_bias), lambda t: t[..., key_start:])
        key_valid, token_ids, keyset, key_scale, key_bias = (
            cut[n] for n in ("key_valid", "token_ids", "keyset", "key_scale", "key_bias"))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise BackwardNotSupportedError(
            "the fused Triton attention kernel has no backward pass; use backend='torch' or "
            "attn_implementation='sdpa'/'eager' for gradients.")
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    dev = q.device
    interp = _interpreting()
    if not interp and not q.is_cuda:
        raise KernelInputError("the Triton kernel needs CUDA tensors; use backend='torch' on CPU.")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise KernelInputError(f"Triton attention takes q, k, v of one dtype among fp16/bf16/fp32; got "
                               f"{q.dtype}, {k.dtype}, {v.dtype}. Cast them, or use backend='torch'.")
    if D > MAX_HEAD_DIM:
        raise KernelInputError(f"head_dim {D} > {MAX_HEAD_DIM} is not supported by the Triton kernel; "
                               "use backend='torch'.")
    if request.topk > MAX_TOPK:
        raise KernelInputError(f"topk {request.topk} > {MAX_TOPK} is too many for the in-kernel top-k; "
                               "use backend='torch' (exact, chunked) for larger k.")
    if len(request.offsets) > MAX_OFFSETS:
        raise KernelInputError(f"{len(request.offsets)} offsets > {MAX_OFFSETS} in one call; split the "
                               "request or use backend='torch'.")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise KernelInputError(f"{name} must be contiguous in its last (head_dim) dimension; "
                                   f"call .contiguous() first (stride {t.stride()}).")
    HEAD_DIM = max(16, _next_pow2(D))
    G = H // Hkv
    OFF = Sk - Sq
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(D)
    has_uniform = head_mask is not None and head_mask_mode == "uniform" and bool(head_mask.any())
    has_zero = head_mask is not None and head_mask_mode == "zero" and bool(head_mask.any())
    prescaled = softcap is not None or key_bias is not None or has_uniform
    if softcap is not None:
        qk_scale, cap2 = scale / float(softcap), float(softcap) * LOG2E
    else:
        qk_scale, cap2 = scale * LOG2E, 1.0
    f32 = dict(dtype=torch.float32, device=dev)
    dummy_f = torch.empty(1, **f32)
    kv_u8 = _as_u8(key_valid, B, Sk, dev)
    tok = token_ids.to(device=dev, dtype=torch.int32).contiguous() if token_ids is not None \
        else torch.empty(1, dtype=torch.int32, device=dev)
    keyset_tc = KEYSET_TENSOR_CORES if KEYSET_TENSOR_CORES is not None else HEAD_DIM <= 64
    key_w = KEY_W if keyset_tc else 2
    if request.keyset and keyset_tc:
        # Key weights for the tensor-core masses: [B, Sk, KEY_W] in q's dtype, column 0 the key set.
        kset = torch.zeros(B, Sk, KEY_W, dtype=q.dtype, device=dev)
        kset[:, :, 0] = keyset.to(device=dev, dtype=q.dtype)
    elif request.keyset:
        kset = keyset.to(device=dev, dtype=torch.float32).contiguous()  # per-element path: [B, Sk] weights
    else:
        kset = torch.empty(1, dtype=q.dtype, device=dev)
    if request.next_match:
        # The token before each key, NO_TOKEN_ID where there is none or it is padding: the kernel then
        # compares it like a plain token instead of loading and masking j - 1 in every tile. Made
        # over the whole sequence: key 0's previous token may be a dropped key's.
        ftok = full_tok.to(device=dev, dtype=torch.int32)
        prev_tok = torch.full_like(ftok, NO_TOKEN_ID)
        prev_tok[:, 1:] = ftok[:, :-1]
        if full_valid is not None:
            prev_tok[:, 1:].masked_fill_(~full_valid[:, :-1].to(dev), NO_TOKEN_ID)
        prev_tok = prev_tok[:, key_start:].contiguous()
    else:
        prev_tok = tok
    ks_keys = _as_u8(key_scale.keys if key_scale is not None else None, B, Sk, dev)
    # ACT's key set: one for all heads [B, Sk], or one per head [B, H, Sk] (sinks found per head)
    per_head = key_scale is not None and key_scale.keys.dim() == 3
    ks_strides = (H * Sk, Sk) if per_head else (Sk, 0)
    ks_beta = key_scale.beta.to(**f32).contiguous() if key_scale is not None else dummy_f
    kb_keys = _as_u8(key_bias.keys if key_bias is not None else None, B, Sk, dev)
    kb_bias = key_bias.bias.to(**f32).contiguous() if key_bias is not None else dummy_f
    hmask = head_mask.to(device=dev, dtype=torch.uint8).contiguous() if head_mask is not None \
        else torch.empty(1, dtype=torch.uint8, device=dev)
    if request.sink_k:
        # the first real key of the sequence, counted from key 0 of this call (< 0: dropped)
        first = ((full_valid.to(dev).int().argmax(dim=1) if full_valid is not None
                  else torch.zeros(B, dtype=torch.int64, device=dev)) - key_start).to(torch.int32).contiguous()
    else:
        first = torch.empty(1, dtype=torch.int32, device=dev)
    noff = len(request.offsets)
    offs = _offsets_tensor(tuple(request.offsets) or (0,), dev)

    def empty(*shape, dtype=torch.float32):
        t = torch.empty(*shape, dtype=dtype, device=dev)
        if POISON_OUTPUTS:
            t.fill_(-7777 if not dtype.is_floating_point else math.nan)
        return t

    out = empty(B, H, Sq, D, dtype=q.dtype)
    stats: dict[str, torch.Tensor] = {}

    def alloc(name, *shape, dtype=torch.float32):
        stats[name] = t = empty(*shape, dtype=dtype)
        return t

    lse_o = alloc("lse", B, H, Sq) if request.lse else dummy_f
    ent_o = alloc("entropy", B, H, Sq) if request.entropy else dummy_f
    amax_o = alloc("argmax", B, H, Sq, request.topk, dtype=torch.int64) if request.topk \
        else torch.empty(1, dtype=torch.int64, device=dev)
    mprob_o = alloc("max_prob", B, H, Sq, request.topk) if request.topk else dummy_f
    sink_o = alloc("sink_mass", B, H, Sq) if request.sink_k else dummy_f
    off_o = alloc("offset_mass", B, H, Sq, noff) if noff else dummy_f
    match_o = alloc("match_mass", B, H, Sq) if request.match else dummy_f
    next_o = alloc("next_match_mass", B, H, Sq) if request.next_match else dummy_f
    kset_o = alloc("keyset_mass", B, H, Sq) if request.keyset else dummy_f
    # Token statistics go to the sparse pair pass (plans queued on the device: nothing here syncs).
    plans: dict[str, tuple] = {}
    last_match_paths.clear()
    global last_hot_tokens
    last_hot_tokens = 0
    hot_count: dict[str, torch.Tensor] = {}
    hot_row = torch.empty(1, dtype=torch.int32, device=dev)
    wanted = [n for n, w in (("match_mass", request.match), ("next_match_mass", request.next_match)) if w]
    dense_auto = MATCH_PATH == "auto" and B * H * Sq * Sk <= DENSE_MATCH_MAX_SCORES
    if wanted and (Sq == 0 or MATCH_PATH == "dense" or dense_auto):
        last_match_paths.update({n: "dense" for n in wanted})
    elif wanted:
        tq = query_tokens(tok, key_valid, Sq)
        sq = sort_rows(tq)
        sq_plan = sq
        bm = _pair_tiles(interp)[0]
        key_tok = {n: key_tokens(tok if n == "match_mass" else prev_tok, key_valid) for n in wanted}
        if 0 < HOT_TOKENS and 1 + 2 * HOT_TOKENS <= key_w and request.keyset and keyset_tc and causal \
                and key_scale is None:
            hot = hot_tokens(sq[1], HOT_TOKENS)
            hot_row = hot_row_index(tq, hot)
            fill_hot_columns(kset, key_tok, hot)
            hot_count = {n: c for n, c in hot_counts(kset, hot_row, HOT_TOKENS, window).items() if n in wanted}
            # hot rows leave the walk: as padded rows do, they carry the sentinel, which no key equals
            sq_plan = sort_rows(torch.where(hot_row >= 0, _Q_SENTINEL, tq))
            last_hot_tokens = HOT_TOKENS
        for name in wanted:
            # Without padding and with Sq == Sk the match keys are the query tokens: one sort serves both.
            same = name == "match_mass" and key_valid is None and Sq == Sk
            plans[name] = pair_plan(*sq_plan, key_tok[name], bm, bool(causal), sorted_keys=sq if same else None)
            last_match_paths[name] = "sparse"
    save_lse = request.colsum or bool(plans)
    lse2_int = empty(B, H, Sq) if save_lse else dummy_f
    coef_int = empty(B, H, Sq, 2) if (save_lse and key_scale is not None) else dummy_f

    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    flags = dict(
        HEAD_DIM=HEAD_DIM, D_TRUE=D, CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        HAS_KV=key_valid is not None, SOFTCAP=softcap is not None, KEY_BIAS=key_bias is not None,
        KEY_SCALE=key_scale is not None, HAS_ZERO=has_zero, HAS_UNIFORM=has_uniform,
        PRESCALED=prescaled, PREC=prec,
    )
    # Tuning class: 0 output / lse / sink / offsets (epilogue only), 1 per-element statistics without
    # token ids (entropy, top-k) and keyset (tensor cores), 2 dense token comparisons or ACT (most
    # registers). Measured on H100: the tile that suits class 1 is not the one that suits class 2.
    dense_match = request.match and "match_mass" not in plans
    dense_next = request.next_match and "next_match_mass" not in plans
    if dense_match or dense_next or key_scale is not None:
        heavy = 2
    elif request.entropy or request.topk or request.keyset:
        heavy = 1
    else:
        heavy = 0
    topk = request.topk
    bucket = _len_bucket(Sq, Sk)
    fwd_args = (
        q, k, v, out, *q.stride(), *k.stride(), *v.stride(),
        H, G, Sq, Sk, OFF, qk_scale, cap2, int(window or 0), int(request.sink_k),
        kv_u8, tok, prev_tok, kset, ks_keys, *ks_strides, ks_beta, kb_keys, kb_bias, hmask, first, offs,
        lse_o, ent_o, amax_o, mprob_o, sink_o, off_o, match_o, next_o, kset_o, lse2_int, coef_int, hot_row,
    )
    fwd_flags = dict(
        flags, LSE=request.lse, ENT=request.entropy, TOPK=topk, KPAD=max(2, _next_pow2(max(topk, 1))),
        FAST_TOP1=(topk == 1 and key_scale is None), SINK=request.sink_k > 0, NOFF=noff,
        MATCH=dense_match, NEXT=dense_next, KEYSET=request.keyset, KW=key_w, SAVE_LSE=save_lse,
        HOT_M="match_mass" in hot_count, HOT_N="next_match_mass" in hot_count, N_HOT=HOT_TOKENS if hot_count else 1,
    )
    # Short query blocks (decoding, Sq < 64) would waste most of a 128-row tile: fixed small tiles.
    if interp or Sq < 64:
        small = _small_config(interp, HEAD_DIM)
        grid = (triton.cdiv(Sq, small["BLOCK_M"]), B * H)
        _attn_fwd[grid](*fwd_args, **fwd_flags, HEAVY=heavy, LEN_BUCKET=bucket, **small, num_warps=4,
                        num_stages=2)
    else:
        grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _fwd_tuned[grid](*fwd_args, **fwd_flags, HEAVY=heavy, LEN_BUCKET=bucket)

    counts: dict[str, torch.Tensor] = {}
    if plans:
        # One launch for both statistics: each program loads its sorted query rows, q and lse once.
        sets = []
        for name in ("match_mass", "next_match_mass"):
            if name in plans:
                _, _, perm_k, sorted_k, k_lo, k_hi = plans[name]
                counts[name] = empty(B, Sq)
                sets.append((stats[name], counts[name], perm_k, sorted_k, k_lo, k_hi))
            else:
                sets.append((dummy_f, dummy_f, tok, tok, tok, tok))
        n_tiles = triton.cdiv(Sq, _pair_tiles(interp)[0])
        # Both plans sort the same query rows (sq_plan): one (perm_q, sorted_q) serves both statistics.
        pair_args = (q, k, lse2_int, coef_int, *sq_plan, *sets[0], *sets[1],
                     *q.stride(), *k.stride(), H, G, Sq, Sk, OFF, qk_scale, cap2, int(window or 0), n_tiles,
                     kb_keys, kb_bias, ks_keys, *ks_strides, hmask)
        pair_flags = dict(
            HEAD_DIM=HEAD_DIM, D_TRUE=D, BLOCK_M=_pair_tiles(interp)[0], CAUSAL=bool(causal),
            HAS_WINDOW=window is not None, MATCH="match_mass" in plans, NEXT="next_match_mass" in plans,
            SOFTCAP=softcap is not None, KEY_BIAS=key_bias is not None, KEY_SCALE=key_scale is not None,
            HAS_ZERO=has_zero, HAS_UNIFORM=has_uniform, PRESCALED=prescaled, PREC=prec, ADD=bool(hot_count),
            LEN_BUCKET=bucket)
        if interp:
            _pair_mass_kernel[(n_tiles, B * H)](*pair_args, **pair_flags, BLOCK_N=_pair_tiles(interp)[1],
                                                num_warps=4, num_stages=2)
        else:
            _pair_tuned[(n_tiles, B * H)](*pair_args, **pair_flags)
        for name, c in hot_count.items():  # the walk counted 0 for the hot rows
            counts[name] += c

    if dense_match or dense_next:
        # Counts of the statistics left on the dense path (the pair pass wrote its own).
        mc = empty(B, Sq) if dense_match else dummy_f
        nc = empty(B, Sq) if dense_next else dummy_f
        bm = 16 if interp else 64
        _match_counts[(triton.cdiv(Sq, bm), B)](
            tok, prev_tok, kv_u8, mc, nc, Sq, Sk, OFF, int(window or 0),
            BLOCK_M=bm, BLOCK_N=16 if interp else 128, CAUSAL=bool(causal), HAS_WINDOW=window is not None,
            HAS_KV=key_valid is not None, MATCH=dense_match, NEXT=dense_next)
        if dense_match:
            counts["match_mass"] = mc
        if dense_next:
            counts["next_match_mass"] = nc
    if request.match or request.next_match:
        for name, c in (("match_count", counts.get("match_mass")),
                        ("next_match_count", counts.get("next_match_mass"))):
            if c is None:
                continue
            full = c[:, None, :].expand(B, H, Sq).contiguous()
            if has_zero:
                full[:, head_mask.to(dev)] = math.nan
            stats[name] = full

    if request.colsum:
        colsum = empty(B, H, Sk)
        cs_args = (q, k, lse2_int, coef_int, colsum, *q.stride(), *k.stride(),
                   H, G, Sq, Sk, OFF, qk_scale, cap2, int(window or 0),
                   kv_u8, ks_keys, *ks_strides, kb_keys, kb_bias, hmask)

        def launch():
            if interp or Sq < 64:
                small = _small_config(interp, HEAD_DIM)
                grid = (triton.cdiv(Sk, small["BLOCK_N"]), B * H)
                _colsum_kernel[grid](*cs_args, **flags, LEN_BUCKET=bucket, **small, num_warps=4, num_stages=2)
            else:
                grid = lambda meta: (triton.cdiv(Sk, meta["BLOCK_N"]), B * H)  # noqa: E731
                _colsum_tuned[grid](*cs_args, **flags, LEN_BUCKET=bucket)

        launch()
        if KEEP_COLSUM_LAUNCH:
            global last_colsum_launch
            last_colsum_launch = launch
        stats["colsum"] = colsum

    if key_start:
        if "argmax" in stats:
            stats["argmax"] = torch.where(stats["argmax"] >= 0, stats["argmax"] + key_start, stats["argmax"])
        if "colsum" in stats:  # the dropped keys receive nothing (NaN on zero-ablated heads, as their kept keys)
            colsum = torch.nn.functional.pad(stats["colsum"], (key_start, 0))
            if has_zero:
                colsum[:, head_mask.to(dev), :key_start] = math.nan
            stats["colsum"] = colsum
    # Same key order as the reference (request.names()).
    return out, {name: stats[name] for name in request.names()}
