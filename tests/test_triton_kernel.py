"""The Triton kernels, run by Triton's CPU interpreter, against the exact torch reference (fp32).

Acceptance (issue 3): out rel. error < 1e-4, statistics < 1e-4, argmax identical except ties within
1e-6, across causal / non-causal, GQA, window, padding, Sq < Sk, every head_dim, every statistic and
intervention. Outputs are poisoned (NaN / -7777) before each run so an unwritten element fails,
inputs are fresh random draws (seed printed on failure), and `test_checker_catches_errors` shows
the comparison rejects a single wrong element.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import sys
import zlib

import pytest
import torch

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
# Triton decides interpreter vs compiler when a @triton.jit function is *defined*, so the variable
# must be set before the kernel modules are imported (or they are re-imported below).
os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from headscope.kernels import (BackwardNotSupportedError, KernelInputError, KeyBias, KeyScale, StatsRequest,  # noqa: E402
                               attention, attention_reference)

_MODS = ("headscope.kernels.triton_forward", "headscope.kernels.triton_colsum",
         "headscope.kernels.triton_match_pairs", "headscope.kernels.triton_attention")


def _load_interpreted():
    mods = [importlib.import_module(m) for m in _MODS]
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(mods[0]._attn_fwd, InterpretedFunction):
        mods = [importlib.reload(m) for m in mods]
    return mods[3]


ta = _load_interpreted()


@pytest.fixture(scope="module", autouse=True)
def _restore_interpreter_env():
    yield
    # Leave no interpreted kernels behind for later tests (on a GPU machine they would be compiled).
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET
    if _PREV_INTERPRET != "1":
        for m in _MODS:
            sys.modules.pop(m, None)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ta, "POISON_OUTPUTS", True)
    monkeypatch.setattr(ta, "INTERPRET_TILES", (16, 16))


# Fixed by default so CI is reproducible; HEADSCOPE_TEST_SEED=random draws fresh inputs (the seed is
# printed on failure). Fresh draws once found ACT entropy 1.03e-4 off on a 2-key row whose set mass
# is near 1 (KERNEL_NOTES log 16): a known precision limit, not a flake to hide in CI.
_seed_env = os.environ.get("HEADSCOPE_TEST_SEED", "20261123")
SEED = random.randrange(1 << 30) if _seed_env == "random" else int(_seed_env)

ALL = StatsRequest.all(topk=1, sink_k=2, offsets=(1, 3), keyset=True, colsum=True)


def _inputs(c: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, Sq, Sk, D = c["B"], c["H"], c["Hkv"], c["Sq"], c["Sk"], c["D"]
    # Scores of spread ~ qscale: peaked rows (large) and flat rows (small) both occur.
    q = torch.randn(B, H, Sq, D, generator=g) * c.get("qscale", 1.5)
    k = torch.randn(B, Hkv, Sk, D, generator=g)
    if c.get("kgrow"):
        # Key norms rising over the first half, then flat: row maxima jump tile after tile, then
        # creep up by small steps.
        grow = torch.linspace(0.2, c["kgrow"], Sk)
        grow[Sk // 2:] = grow[Sk // 2]
        k = k * grow[:, None]
    v = torch.randn(B, Hkv, Sk, D, generator=g)
    kw: dict = dict(causal=c.get("causal", True), window=c.get("window"), softcap=c.get("softcap"))
    pad = c.get("pad")
    if pad:
        kv = torch.ones(B, Sk, dtype=torch.bool)
        for b in range(B):
            n = int(torch.randint(1, Sk // 3 + 1, (1,), generator=g))
            if pad == "holes":  # masked keys between real ones (packed or hand-made masks)
                kv[b] = torch.rand(Sk, generator=g) > 0.25
            elif pad == "left" or (pad == "mixed" and b % 2 == 0):
                kv[b, :n] = False
            else:
                kv[b, Sk - n:] = False
        if c.get("dead_row"):
            kv[0] = False  # a sequence that is all padding
        kw["attention_mask"] = kv
    kw["token_ids"] = torch.randint(0, c.get("vocab", 5), (B, Sk), generator=g)
    kw["keyset"] = torch.rand(B, Sk, generator=g) < 0.3
    if c.get("head_mask"):
        hm = torch.zeros(H, dtype=torch.bool)
        hm[torch.randperm(H, generator=g)[: max(1, H // 2)]] = True
        kw["head_mask"] = hm
        kw["head_mask_mode"] = c["head_mask"]
    if c.get("key_scale"):
        # one set for all heads, or one per head (ACT's sinks)
        keys = torch.rand(*((B, H, Sk) if c["key_scale"] == "per_head" else (B, Sk)), generator=g) < 0.25
        keys[..., 0] = True  # the first key is a sink in ACT: its first row sees only the set (guard)
        beta = torch.rand(H, generator=g) * 0.8 + 0.2
        kw["key_scale"] = KeyScale(beta=beta, keys=keys)
    if c.get("key_bias"):
        kw["key_bias"] = KeyBias(bias=torch.randn(H, generator=g) * 2, keys=torch.rand(B, Sk, generator=g) < 0.3)
    dtype = c.get("dtype", torch.float32)
    return q.to(dtype), k.to(dtype), v.to(dtype), kw


def _reference(q, k, v, kw, request):
    ref_kw = dict(kw)
    ref_kw["key_valid"] = ref_kw.pop("attention_mask", None)
    H = q.shape[1]
    out, st = attention_reference(q.float(), k.float(), v.float(), request=request, pattern_heads=list(range(H)),
                                  **ref_kw)
    return out, st


def check(out, stats, ref_out, ref_stats, request, *, out_tol=1e-4, stat_tol=1e-4, where=""):
    """Assert the kernel's result matches the reference; ref_stats carries 'pattern' [B, H, Sq, Sk]."""
    assert out.dtype == ref_out.dtype or ref_out.dtype == torch.float32
    o, ro = out.float(), ref_out.float()
    assert not torch.isnan(o).any(), f"{where}: NaN in output (unwritten element?)"
    denom = ro.norm().clamp_min(1e-12)
    rel = ((o - ro).norm() / denom).item()
    assert rel < out_tol, f"{where}: out rel. error {rel:.3e}"
    assert list(stats) == request.names(), f"{where}: keys {list(stats)} != {request.names()}"
    pattern = ref_stats["pattern"]
    for name in request.names():
        a, r = stats[name], ref_stats[name]
        assert a.shape == r.shape, f"{where}: {name} shape {tuple(a.shape)} != {tuple(r.shape)}"
        assert a.dtype == r.dtype, f"{where}: {name} dtype {a.dtype} != {r.dtype}"
        if name == "argmax":
            continue
        a, r = a.float(), r.float()
        rn = torch.isnan(r)
        assert torch.equal(torch.isnan(a), rn), f"{where}: {name} NaN pattern differs (unwritten element?)"
        ri = torch.isinf(r)
        assert torch.equal(torch.isinf(a), ri) and torch.equal(a[ri], r[ri]), f"{where}: {name} inf differs"
        fin = ~rn & ~ri
        tol = stat_tol * (r.abs().clamp_min(1.0) if name in ("colsum", "lse") else 1.0)
        err = (a - r).abs()
        bad = fin & (err > tol)
        assert not bad.any(), (f"{where}: {name} error {err[fin].max().item():.3e} at "
                               f"{bad.nonzero()[0].tolist()}: {a[bad][0].item()} vs {r[bad][0].item()}")
    if request.topk:
        _check_topk(stats["argmax"], stats["max_prob"], ref_stats["argmax"], ref_stats["max_prob"], pattern, where)


def _check_topk(idx, prob, ref_idx, ref_prob, pattern, where):
    """Indices identical, except where the reference's probabilities of the two keys tie within 1e-6."""
    assert torch.equal(idx < 0, ref_idx < 0), f"{where}: argmax -1 pattern differs"
    nan_rows = torch.isnan(ref_prob)
    same = (idx == ref_idx) | nan_rows
    if same.all():
        return
    p_ours = pattern.gather(-1, idx.clamp_min(0))
    p_ref = pattern.gather(-1, ref_idx.clamp_min(0))
    tie = (p_ours - p_ref).abs() <= 1e-6
    bad = ~same & ~tie
    assert not bad.any(), (f"{where}: argmax differs at {bad.nonzero()[0].tolist()}: "
                           f"{idx[bad][0].item()} (p={p_ours[bad][0].item():.6g}) vs "
                           f"{ref_idx[bad][0].item()} (p={p_ref[bad][0].item():.6g})")
    # No key twice in one row's top-k.
    srt = idx.sort(-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    assert not dup.any(), f"{where}: a key appears twice in a row's top-k"


def run_case(c: dict, request: StatsRequest = ALL, seed: int | None = None, **check_kw):
    seed = SEED + zlib.crc32(c["name"].encode()) % 1000 if seed is None else seed
    q, k, v, kw = _inputs(c, seed)
    where = f"{c['name']} (seed {seed})"
    out, stats = attention(q, k, v, stats=request, backend="triton", **kw)
    ref_out, ref_stats = _reference(q, k, v, kw, request)
    check(out, stats, ref_out, ref_stats, request,
          where=where, **check_kw)
    return out, stats


def _case(name, **kw):
    c = dict(name=name, B=2, H=4, Hkv=2, Sq=40, Sk=40, D=64)
    c.update(kw)
    return pytest.param(c, id=name)


CASES = [
    _case("causal_gqa_d64"),
    _case("noncausal_mha", H=2, Hkv=2, causal=False),
    _case("causal_window", window=7, Sq=48, Sk=48),
    _case("noncausal_window", causal=False, window=5, H=2, Hkv=1),
    _case("left_pad", pad="left"),
    _case("right_pad", pad="right", H=2, Hkv=1),
    _case("noncausal_mixed_pad", pad="mixed", causal=False, H=2, Hkv=2),
    _case("all_padding_sequence", pad="left", dead_row=True, H=2, Hkv=1),
    _case("chunk_sq_lt_sk", Sq=20, Sk=45, pad="left"),
    _case("decode_sq1", Sq=1, Sk=37, H=6, Hkv=2, window=9),
    _case("d128", D=128, H=2, Hkv=1, Sq=36, Sk=36),
    _case("d256", D=256, B=1, H=2, Hkv=1, Sq=33, Sk=33),
    _case("d96_padded_dim", D=96, B=1, H=2, Hkv=2, Sq=24, Sk=24),
    _case("softcap", softcap=4.0, qscale=3.0),
    _case("key_bias", key_bias=True, pad="right"),
    _case("head_mask_zero", head_mask="zero"),
    _case("head_mask_uniform", head_mask="uniform", pad="left"),
    _case("key_scale", key_scale=True),
    _case("key_scale_window_pad", key_scale=True, window=6, pad="mixed", Sq=30, Sk=44),
    _case("key_scale_per_head", key_scale="per_head", pad="left", Sq=30, Sk=44, H=4, Hkv=2),
    _case("everything", key_scale=True, key_bias=True, softcap=5.0, head_mask="uniform", window=11,
          pad="left", Sq=28, Sk=40, H=4, Hkv=1),
    _case("noncausal_key_scale_bias", causal=False, key_scale=True, key_bias=True, pad="right", H=2, Hkv=1),
]


@pytest.mark.parametrize("c", CASES)
def test_matches_reference(c):
    run_case(c)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
def test_uneven_tiles(tiles, monkeypatch):
    """BLOCK_M != BLOCK_N (as on the GPU) moves the interior / diagonal split; window and Sq < Sk too."""
    monkeypatch.setattr(ta, "INTERPRET_TILES", tiles)
    run_case(dict(name=f"tiles{tiles}_causal", B=1, H=2, Hkv=1, Sq=50, Sk=61, D=64, window=23, pad="left"))
    run_case(dict(name=f"tiles{tiles}_noncausal", B=1, H=2, Hkv=1, Sq=45, Sk=45, D=64, causal=False,
                  window=20, key_scale=True))


@pytest.mark.parametrize("match_path", ["dense", "sparse"])
def test_batch_split_at_the_grid_limit(match_path, monkeypatch):
    """B x H above CUDA's grid-axis limit runs in slices of sequences (3 + 3 + 1 here, with a limit of
    3 x H); each sequence's edits, masks and tokens must follow it into its slice."""
    monkeypatch.setattr(ta, "MATCH_PATH", match_path)
    c = dict(name="batch_split", B=7, H=4, Hkv=2, Sq=20, Sk=26, D=64, pad="mixed", key_scale="per_head",
             key_bias=True, head_mask="uniform", window=9)
    q, k, v, kw = _inputs(c, SEED)
    calls = []
    real = ta._attention_call
    monkeypatch.setattr(ta, "_attention_call", lambda q, *a, **k: calls.append(q.shape[0]) or real(q, *a, **k))
    monkeypatch.setattr(ta, "MAX_GRID_Y", 3 * c["H"] + 2)
    out, stats = attention(q, k, v, stats=ALL, backend="triton", **kw)
    assert calls == [3, 3, 1]
    ref_out, ref_stats = _reference(q, k, v, kw, ALL)
    check(out, stats, ref_out, ref_stats, ALL, where="batch split")


@pytest.mark.parametrize("match_path", ["dense", "sparse"])
@pytest.mark.parametrize("Sq,key_start", [(1, 31), (5, 26), (1, 2), (4, 1)])
def test_key_start_reads_only_the_kept_keys(Sq, key_start, match_path, monkeypatch):
    """A sliding-window cache's call (the first key_start keys dropped, all outside the window) gives
    the statistics of the whole sequence: the reference sees every key, random ones in the dropped
    places. key_start 2 and 1 keep sink keys (sink_k 2, left padding up to 3) and key 0's previous
    token in view."""
    monkeypatch.setattr(ta, "MATCH_PATH", match_path)
    W, S = 9, 40
    c = dict(name=f"key_start{key_start}", B=3, H=4, Hkv=2, Sq=Sq, Sk=S, D=64, window=W,
             key_scale="per_head" if Sq > 1 else True,
             key_bias=True, vocab=3)
    q, k, v, kw = _inputs(c, SEED + key_start)
    kv = torch.ones(3, S, dtype=torch.bool)
    kv[0, :3] = False  # left padding: the sink's first key moves to 3
    kw["attention_mask"] = kv
    Sk = S - key_start
    assert Sk - Sq >= W - 1  # every dropped key outside the first query's window
    req = StatsRequest.all(topk=1, sink_k=2, offsets=(1, 3), keyset=True, colsum=True, content=True)
    out, stats = attention(q, k[:, :, key_start:], v[:, :, key_start:], stats=req, backend="triton",
                           key_start=key_start, pattern_heads=[1], **kw)
    ref_out, ref_stats = _reference(q, k, v, kw, req)
    assert torch.allclose(stats.pop("pattern"), ref_stats["pattern"][:, [1]], atol=1e-6)
    check(out, stats, ref_out, ref_stats, req, where=f"key_start {key_start}")
    # the same call on the torch path
    out_t, stats_t = attention(q, k[:, :, key_start:], v[:, :, key_start:], stats=req, backend="torch",
                               key_start=key_start, **kw)
    check(out_t, stats_t, ref_out, ref_stats, req, where=f"key_start {key_start}, torch")


def test_probe_records_sliding_window_decode_through_the_kernel():
    """generate() on a sliding-window model, recorded through the (interpreted) Triton kernel: the
    decode steps' key_start calls must give the one-forward recording's statistics."""
    from decode_reference import check_decode_matches_forward, tiny_mistral

    model = tiny_mistral(window=5)
    model.state.backend = "triton"
    check_decode_matches_forward(model, StatsRequest.all(topk=2, sink_k=2, offsets=(1, 2), colsum=True),
                                 prompt_len=7, new=5, tol=1e-4)


def test_act_calibration_runs_through_the_kernel():
    """ACT's sinks are per head ([B, H, S] key sets): through the (interpreted) Triton kernel,
    calibration must give the logits of the exact torch path, and change them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscope.circuits.calibration import calibrate
    from headscope.probe import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=60, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = load_model(LlamaForCausalLM(cfg).eval())
    ids = torch.randint(3, 60, (2, 14))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["attention_mask"][1, :3] = 0
    heads = [(0, 1), (0, 2), (1, 0), (1, 3)]
    logits = {}
    for backend in ("torch", "triton"):
        model.state.backend = backend
        with torch.no_grad(), calibrate(model, heads, batch) as used:
            logits[backend] = model.hf(**batch).logits
    assert all(u[:, [h for l, h in heads if l == layer]].any() for layer, u in used.items())
    model.state.backend = "torch"
    with torch.no_grad():
        plain = model.hf(**batch).logits
    real = batch["attention_mask"].bool()
    assert (logits["triton"] - logits["torch"])[real].abs().max() < 1e-4
    assert (logits["torch"] - plain)[real].abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["zero", "uniform"])
def test_key_start_with_head_mask(mode):
    """Heads ablated with head_mask under key_start: a zero-ablated head's statistics are NaN over
    the whole sequence, its colsum at the dropped keys too (the reference on all keys says so)."""
    W, S, ks = 5, 20, 9
    c = dict(name="key_start_head_mask", B=2, H=4, Hkv=2, Sq=2, Sk=S, D=16, window=W, head_mask=mode,
             key_scale="per_head", pad="mixed")
    q, k, v, kw = _inputs(c, SEED + 7)
    out, stats = attention(q, k[:, :, ks:], v[:, :, ks:], stats=ALL, backend="triton", key_start=ks, **kw)
    ref_out, ref_stats = _reference(q, k, v, kw, ALL)
    check(out, stats, ref_out, ref_stats, ALL, where=f"key_start head_mask {mode}")


def test_key_start_refuses_dropped_keys_in_view():
    q, k, v = torch.randn(1, 2, 2, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(KernelInputError, match="still sees 1 of them"):
        attention(q, k, v, window=8, key_start=4, backend="triton")  # 8 - 2 < 8 - 1
    with pytest.raises(KernelInputError, match="needs causal attention with a window"):
        attention(q, k, v, key_start=4, backend="triton")
    with pytest.raises(KernelInputError, match="needs causal attention with a window"):
        attention(q, k, v, window=3, causal=False, key_start=4, backend="torch")
    with pytest.raises(KernelInputError, match=r"\[B, Sk\] = \[1, 12\]"):
        attention(q, k, v, window=3, key_start=4, attention_mask=torch.ones(1, 8, dtype=torch.bool))
    for bad in ("4", 2.5, 0, True):  # the window's own message, not a TypeError from the key_start check
        with pytest.raises(KernelInputError, match="window must be an integer"):
            attention(q, k, v, window=bad, key_start=4, backend="torch")


def test_rising_row_maxima():
    """Row maxima that jump tile after tile, then creep: every accumulator is rescaled many times."""
    for extra in (dict(), dict(key_scale=True, window=20), dict(pad="left", causal=False)):
        run_case(dict(name="rising_maxima", B=2, H=2, Hkv=1, Sq=48, Sk=48, D=64, kgrow=6.0, **extra))


@pytest.mark.parametrize("topk", [3, 5])
@pytest.mark.parametrize("key_scale", [False, True])
def test_topk(topk, key_scale):
    req = StatsRequest(lse=True, topk=topk)
    run_case(dict(name=f"topk{topk}_ks{key_scale}", B=1, H=2, Hkv=1, Sq=36, Sk=36, D=64, key_scale=key_scale,
                  pad="left"), request=req)


@pytest.mark.parametrize("topk", [2, 4])
def test_topk_filling_the_list_with_rows_that_see_nothing(topk):
    """topk = KPAD (no spare slot) on blocks where some rows see no key (left-padded queries): those
    rows get -1 / 0, the others the reference's list (the interpreter once failed on an all-NaN row)."""
    g = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(1, 1, 8, 16, generator=g) for _ in range(3))
    mask = torch.tensor([[True] * 4 + [False] * 4])  # with window 2, rows 6 and 7 see no key
    req = StatsRequest(lse=True, topk=topk)
    _, st = attention(q, k, v, window=2, attention_mask=mask, stats=req, backend="triton")
    _, ref = attention(q, k, v, window=2, attention_mask=mask, stats=req, backend="torch")
    assert torch.equal(st["argmax"], ref["argmax"]) and st["argmax"][0, 0, 6:].eq(-1).all()
    assert (st["max_prob"] - ref["max_prob"]).abs().max() < 1e-5


def test_topk_keeps_a_visible_key_whose_probability_underflows():
    """-1 marks a row with no further visible key, not a probability that rounds to 0 in float32."""
    q = torch.zeros(1, 1, 4, 64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 4, 64)
    k[0, 0, 0, 0] = 2000.0  # key 0 beats key 1 by 250 nats at scale 1/8: exp underflows
    v = torch.randn(1, 1, 4, 64)
    _, st = attention(q, k, v, stats=StatsRequest(topk=2), backend="triton")
    _, ref = attention(q, k, v, stats=StatsRequest(topk=2), backend="torch")
    # keys 1..3 all underflow (the reference clamps them to one tiny value: their order is a tie)
    assert torch.equal(st["argmax"] < 0, ref["argmax"] < 0)
    assert st["argmax"][0, 0, 1].tolist() == [0, 1] and (st["argmax"][0, 0, 1:] >= 0).all()
    assert (st["max_prob"] - ref["max_prob"]).abs().max() < 1e-6


def test_v_head_dim_must_match_on_the_triton_path():
    q = torch.randn(1, 2, 8, 64)
    v = torch.randn(1, 2, 8, 32)
    with pytest.raises(KernelInputError, match="backend='torch'"):
        attention(q, q, v, backend="triton")
    out, _ = attention(q, q, v, backend="torch")  # MLA-style shapes: the torch path handles them
    assert out.shape == (1, 2, 8, 32)


def test_top1_with_key_scale_and_uniform_ties():
    """Uniform heads tie every key: any index of the row is right, but it must hold the max prob."""
    req = StatsRequest(topk=1, entropy=True)
    run_case(dict(name="top1_ks_uniform", B=1, H=4, Hkv=2, Sq=33, Sk=33, D=64, key_scale=True,
                  head_mask="uniform"), request=req)


@pytest.mark.parametrize("topk", [1, 3])
def test_exact_ties_go_to_the_first_key(topk):
    """Integer-valued q and k make equal scores bit-identical, whatever the summation order: the
    maximum (3) sits at keys 5, 9, 20 and 33 (three 16-key tiles), so every row that sees key 5
    must name 5 first, and top-3 must list 5, 9, 20 in that order once they are visible."""
    S, D = 48, 64
    g = torch.Generator().manual_seed(3)
    q = torch.zeros(1, 1, S, D)
    q[..., 0] = 1.0
    k = torch.randint(-2, 3, (1, 1, S, D), generator=g).float()
    k[..., 0] = torch.randint(-3, 3, (S,), generator=g).clamp(max=2).float()
    winners = [5, 9, 20, 33]
    k[0, 0, winners, 0] = 3.0
    v = torch.randn(1, 1, S, D, generator=g)
    _, st = attention(q, k, v, stats=StatsRequest(topk=topk), backend="triton")
    _, ref = attention(q, k, v, stats=StatsRequest(topk=topk), backend="torch")
    amax = st["argmax"][0, 0]
    for i in range(S):
        seen = [j for j in winners if j <= i]
        if seen:
            assert amax[i, :min(topk, len(seen))].tolist() == seen[:topk], (i, amax[i].tolist())
    # The maximum probability itself against the reference (torch.topk orders ties arbitrarily).
    torch.testing.assert_close(st["max_prob"][0, 0, 5:, 0], ref["max_prob"][0, 0, 5:, 0], rtol=1e-5, atol=1e-6)


def test_top1_after_settled_maxima():
    """A sink (key 0) holds every row's maximum through tiles 1-3; key 65 beats it for the rows that
    see it (tile 4: only those rows' maxima grow) and tile 5 grows none. Argmax and max_prob against
    the reference."""
    S, D = 96, 64
    g = torch.Generator().manual_seed(4)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = torch.randn(2, 2, S, D, generator=g) * 0.3 + 2.0 * u
    k = torch.randn(2, 2, S, D, generator=g) * 0.3
    k[:, :, 0] = 4.0 * u
    k[:, :, 65] = 6.0 * u
    v = torch.randn(2, 2, S, D, generator=g)
    _, st = attention(q, k, v, stats=StatsRequest(topk=1), backend="triton")
    _, ref = attention(q, k, v, stats=StatsRequest(topk=1), backend="torch")
    want = torch.where(torch.arange(S) >= 65, 65, 0).expand(2, 2, S)
    assert torch.equal(ref["argmax"][..., 0], want)  # the construction does what it says
    assert torch.equal(st["argmax"][..., 0], want)
    torch.testing.assert_close(st["max_prob"], ref["max_prob"], rtol=1e-5, atol=1e-6)


def test_offsets_any_int():
    req = StatsRequest(offsets=(0, 1, 2, 17, 39, 40, -3, 100))
    run_case(dict(name="offsets", B=2, H=2, Hkv=1, Sq=40, Sk=40, D=64, pad="mixed"), request=req)
    run_case(dict(name="offsets_noncausal", B=1, H=2, Hkv=1, Sq=40, Sk=40, D=64, causal=False,
                  key_scale=True), request=req)


def test_sink_k_spans_blocks():
    req = StatsRequest(sink_k=19, lse=True)
    run_case(dict(name="sink19", B=2, H=2, Hkv=1, Sq=40, Sk=40, D=64, pad="left"), request=req)


def test_output_only_and_single_stats():
    c = dict(name="plain", B=1, H=2, Hkv=1, Sq=40, Sk=40, D=64)
    run_case(c, request=StatsRequest())
    for req in (StatsRequest(entropy=True), StatsRequest(colsum=True), StatsRequest(match=True),
                StatsRequest(next_match=True), StatsRequest(keyset=True)):
        run_case(dict(c, name=f"only_{req.names()[0]}"), request=req)


@pytest.mark.parametrize("tensor_cores", [True, False])
def test_keyset_paths(tensor_cores, monkeypatch):
    """keyset_mass on the tensor cores (key-weight tile) and per element give the reference's mass."""
    monkeypatch.setattr(ta, "KEYSET_TENSOR_CORES", tensor_cores)
    req = StatsRequest(lse=True, entropy=True, keyset=True, sink_k=2, offsets=(1,))
    run_case(dict(name=f"keyset_tc{tensor_cores}", B=2, H=4, Hkv=2, Sq=40, Sk=40, D=64, pad="left"), request=req)
    run_case(dict(name=f"keyset_tc{tensor_cores}_act", B=1, H=2, Hkv=1, Sq=36, Sk=36, D=64, key_scale=True,
                  window=9), request=req)


@pytest.mark.parametrize("match_path", ["dense", "sparse"])
def test_key_scale_peaked_rows_against_float64(match_path, monkeypatch):
    """ACT on peaked rows (set mass near 1): kernel and float32 reference both within 1e-5 of float64.

    The rest mass used to be 1 - S; its cancellation cost the kernel 3.6e-3 of entropy and 1.5e-4 of
    keyset mass on these seeds (the float32 reference 1.3e-2 of offset mass): each part is now summed
    on its own. Seeds chosen where the old arithmetic failed."""
    monkeypatch.setattr(ta, "MATCH_PATH", match_path)
    req = StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=True)
    for seed in (38, 40, 49, 50):
        c = dict(name="act_peaked", B=1, H=4, Hkv=2, Sq=24, Sk=24, D=64, key_scale=True, qscale=3.0)
        q, k, v, kw = _inputs(c, seed)
        out, st = attention(q, k, v, stats=req, backend="triton", **kw)
        rkw = dict(kw)
        rkw["key_valid"] = rkw.pop("attention_mask", None)
        _, r64 = attention_reference(q.double(), k.double(), v.double(), request=req, **rkw)
        _, r32 = attention_reference(q, k, v, request=req, **rkw)
        for name in req.names():
            if name == "argmax":
                continue
            for who, a in (("kernel", st[name]), ("fp32 reference", r32[name])):
                err = (a.double() - r64[name].double()).abs().nan_to_num(0.0).max().item()
                assert err < 1e-5, f"seed {seed}: {who} {name} off float64 by {err:.2e}"


def test_half_precision_inputs():
    """fp16 runs through the same kernel; p is rounded to the input dtype for P.V as on GPU.

    bf16 is checked on the GPU only (benchmarks/kernel_check.py): Triton 3.9's interpreter computes
    tl.dot of two bf16 tiles wrongly (errors ~1e10 on a bare 16x16 product), whatever the kernel.
    """
    run_case(dict(name="dtype_fp16", B=1, H=2, Hkv=1, Sq=40, Sk=40, D=64, dtype=torch.float16, pad="right"),
             out_tol=1e-2, stat_tol=5e-3)


def test_checker_catches_errors():
    """The comparison must reject one wrong element, one unwritten (NaN) element and a wrong argmax."""
    c = dict(name="mutant", B=1, H=2, Hkv=1, Sq=33, Sk=33, D=64)
    q, k, v, kw = _inputs(c, SEED)
    out, stats = attention(q, k, v, stats=ALL, backend="triton", **kw)
    ref_out, ref_stats = _reference(q, k, v, kw, ALL)
    check(out, stats, ref_out, ref_stats, ALL)
    for mutate in ("out", "entropy", "nan", "argmax", "colsum"):
        o2 = out.clone()
        s2 = {n: t.clone() for n, t in stats.items()}
        if mutate == "out":
            o2[0, 1, 7, 3] += 1e-2 * ref_out.norm()
        elif mutate == "entropy":
            s2["entropy"][0, 0, 20] += 1e-3
        elif mutate == "nan":
            s2["sink_mass"][0, 1, 32] = math.nan
        elif mutate == "argmax":
            row = ref_stats["pattern"][0, 0, 30]
            s2["argmax"][0, 0, 30, 0] = int(row.argmin())
        elif mutate == "colsum":
            s2["colsum"][0, 0, 5] *= 1.001
        with pytest.raises(AssertionError):
            check(o2, s2, ref_out, ref_stats, ALL, where=mutate)


def test_grad_through_triton_raises():
    q = torch.randn(1, 2, 8, 64, requires_grad=True)
    k = torch.randn(1, 2, 8, 64)
    with pytest.raises(BackwardNotSupportedError, match="backend='torch'"):
        attention(q, k, k, backend="triton")


def test_auto_backend_takes_the_differentiable_path_for_gradients():
    """On CUDA 'auto' takes the kernel only when no gradient is asked for: head importance runs a CUDA
    model's backward through 'auto' (it raised BackwardNotSupportedError before). 'triton' itself still
    refuses gradients (test above); CPU always takes the torch path."""
    from types import SimpleNamespace

    from headscope.kernels.dispatch import uses_triton

    def t(cuda=True, grad=False):
        return SimpleNamespace(is_cuda=cuda, requires_grad=grad)

    assert uses_triton("auto", t(), t(), t())
    assert not uses_triton("auto", t(grad=True), t(), t()) and not uses_triton("auto", t(), t(), t(grad=True))
    with torch.no_grad():
        assert uses_triton("auto", t(grad=True), t(), t())
    assert uses_triton("triton", t(grad=True), t(), t())
    assert not uses_triton("auto", t(cuda=False), t(cuda=False), t(cuda=False))
    assert not uses_triton("torch", t(), t(), t())


def test_kernel_called_directly_rejects_grad():
    q = torch.randn(1, 2, 8, 64, requires_grad=True)
    with pytest.raises(BackwardNotSupportedError):
        ta.attention_triton(q, q.detach(), q.detach(), request=StatsRequest())


def test_large_topk_names_torch_backend():
    from headscope.kernels import KernelInputError
    q = torch.randn(1, 1, 16, 64)
    with pytest.raises(KernelInputError, match="backend='torch'"):
        attention(q, q, q, stats=StatsRequest(topk=ta.MAX_TOPK + 1), backend="triton")


MATCH_ONLY = StatsRequest(lse=True, match=True, next_match=True)


@pytest.mark.parametrize("c", CASES)
def test_sparse_match_path(c, monkeypatch):
    """The pair pass (forced) gives the reference's match / next_match masses on every case above
    (few distinct tokens: many repeats, long equal-token runs across tiles)."""
    monkeypatch.setattr(ta, "MATCH_PATH", "sparse")
    run_case(dict(c, name=c["name"] + "_sparse"), request=MATCH_ONLY)
    assert ta.last_match_paths == {"match_mass": "sparse", "next_match_mass": "sparse"}


def test_sparse_match_with_every_statistic_and_uneven_tiles(monkeypatch):
    monkeypatch.setattr(ta, "MATCH_PATH", "sparse")
    monkeypatch.setattr(ta, "INTERPRET_TILES", (32, 16))
    run_case(dict(name="sparse_all_stats", B=2, H=4, Hkv=2, Sq=45, Sk=61, D=64, pad="mixed", window=30,
                  key_scale=True, key_bias=True, vocab=7))


@pytest.mark.parametrize("match_path", ["dense", "sparse"])
@pytest.mark.parametrize("causal", [True, False])
def test_match_with_masked_keys_between_real_ones(match_path, causal, monkeypatch):
    """A masked key whose predecessor is real: next_match must not count it (nor match its token)."""
    monkeypatch.setattr(ta, "MATCH_PATH", match_path)
    run_case(dict(name=f"holes_{match_path}_{causal}", B=2, H=2, Hkv=1, Sq=40, Sk=40, D=64, pad="holes",
                  causal=causal, vocab=3), request=MATCH_ONLY)


HOT_CASES = [c for c in CASES if c.values[0].get("causal", True) and not c.values[0].get("key_scale")
             and c.values[0]["D"] <= 64]


@pytest.mark.parametrize("c", HOT_CASES + [_case("holes", pad="holes"), _case("tiles32x16", Sq=50, Sk=61, window=23,
                                                                                pad="left", tiles=(32, 16)),
                                           _case("tiles16x32", Sq=45, Sk=45, pad="mixed", tiles=(16, 32))])
def test_hot_token_columns(c, monkeypatch):
    """Pair path with keyset_mass on the tensor cores: the 7 most frequent tokens' match / next_match
    come from the key-weight product's spare columns (the diagonal key taken out), the other rows from
    the pair walk; every statistic against the reference, on rows of both kinds (12 token ids)."""
    from headscope.kernels.token_columns import hot_row_index, hot_tokens
    from headscope.kernels.triton_match_pairs import sort_rows
    monkeypatch.setattr(ta, "MATCH_PATH", "sparse")
    monkeypatch.setattr(ta, "HOT_TOKENS", 7)
    monkeypatch.setattr(ta, "INTERPRET_TILES", c.get("tiles", (16, 16)))
    c = dict(c, name=c["name"] + "_hot", vocab=12)
    run_case(c)
    assert ta.last_hot_tokens == 7 and ta.last_match_paths["match_mass"] == "sparse"
    tok = _inputs(c, SEED + zlib.crc32(c["name"].encode()) % 1000)[3]["token_ids"][:, c["Sk"] - c["Sq"]:].int()
    hot_row = hot_row_index(tok, hot_tokens(sort_rows(tok)[1], 7))
    assert (hot_row >= 0).any() and ((hot_row < 0).any() or c["Sq"] == 1)  # one query row: its token is hot


def test_hot_token_columns_with_dropped_keys(monkeypatch):
    """key_start (a sliding-window cache) on the hot path: counts and masses over the kept keys, the
    previous token of key 0 a dropped key's."""
    monkeypatch.setattr(ta, "MATCH_PATH", "sparse")
    monkeypatch.setattr(ta, "HOT_TOKENS", 7)
    W, S, key_start, Sq = 9, 40, 20, 12
    c = dict(name="hot_key_start", B=2, H=2, Hkv=1, Sq=Sq, Sk=S, D=64, window=W, vocab=9, pad="left")
    q, k, v, kw = _inputs(c, SEED)
    out, stats = attention(q, k[:, :, key_start:], v[:, :, key_start:], stats=ALL, backend="triton",
                           key_start=key_start, **kw)
    assert ta.last_hot_tokens == 7
    ref_out, ref_stats = _reference(q, k, v, kw, ALL)
    check(out, stats, ref_out, ref_stats, ALL, where="hot key_start")


def test_hot_tokens_are_the_most_frequent():
    """hot_tokens against collections.Counter: the n most frequent query tokens, padded rows never,
    the sentinel in slots past the distinct tokens; hot_row_index finds each row's slot."""
    from collections import Counter

    from headscope.kernels.token_columns import hot_row_index, hot_tokens
    from headscope.kernels.triton_match_pairs import _Q_SENTINEL, sort_rows
    g = torch.Generator().manual_seed(SEED)
    tok = torch.randint(0, 30, (3, 200), generator=g, dtype=torch.int32)
    tok[0, :50] = _Q_SENTINEL  # padded rows: the most frequent "token" of row 0, never hot
    tok[2] = torch.tensor([5, 9, 5, 2] * 50, dtype=torch.int32)  # three distinct tokens
    hot = hot_tokens(sort_rows(tok)[1], 7)
    for b in range(3):
        counts = Counter(t for t in tok[b].tolist() if t != _Q_SENTINEL)
        got = [t for t in hot[b].tolist() if t != _Q_SENTINEL]
        assert len(got) == min(7, len(counts)) and len(set(got)) == len(got)
        kth = sorted(counts.values(), reverse=True)[len(got) - 1]
        assert all(counts[t] >= kth for t in got) and all(counts[t] <= kth for t in counts if t not in got)
    assert sorted(hot[2, :3].tolist()) == [2, 5, 9] and (hot[2, 3:] == _Q_SENTINEL).all()
    row = hot_row_index(tok, hot)
    for b in range(3):
        for i in range(200):
            t = tok[b, i].item()
            assert (row[b, i].item() >= 0) == (t in hot[b].tolist() and t != _Q_SENTINEL)
            if row[b, i] >= 0:
                assert hot[b, row[b, i]].item() == t


def test_match_path_auto_and_agreement(monkeypatch):
    """auto takes the in-loop dense path up to DENSE_MATCH_MAX_SCORES scores (B x H x Sq x Sk) and the
    pair pass above, for text-like ids and for one repeated token (its sorted walk is then the dense
    causal pass, in key order); the two give the same numbers."""
    c = dict(name="choice", B=2, H=2, Hkv=1, Sq=96, Sk=96, D=64, pad="left")
    scores = 2 * 2 * 96 * 96
    for vocab in (10000, 1):
        monkeypatch.setattr(ta, "DENSE_MATCH_MAX_SCORES", scores - 1)
        _, pairs = run_case(dict(c, name=f"auto_vocab{vocab}", vocab=vocab), request=MATCH_ONLY, seed=7 + vocab)
        assert ta.last_match_paths == {"match_mass": "sparse", "next_match_mass": "sparse"}
        monkeypatch.setattr(ta, "DENSE_MATCH_MAX_SCORES", scores)
        _, dense = run_case(dict(c, name=f"dense_vocab{vocab}", vocab=vocab), request=MATCH_ONLY, seed=7 + vocab)
        assert ta.last_match_paths == {"match_mass": "dense", "next_match_mass": "dense"}
        for name in ("match_mass", "next_match_mass", "match_count", "next_match_count"):
            torch.testing.assert_close(pairs[name], dense[name], rtol=0, atol=1e-5)


def test_pair_plan_ranges_match_searchsorted():
    """The binary-search range kernel against torch.searchsorted on (token, position) keys."""
    from headscope.kernels.triton_match_pairs import pair_plan, sort_rows
    g = torch.Generator().manual_seed(SEED)
    for causal, vocab, Sq, Sk, bm in ((True, 3, 50, 61, 16), (False, 7, 45, 45, 16), (True, 1000, 33, 70, 8)):
        tok = torch.randint(0, vocab, (2, Sk), generator=g, dtype=torch.int32)
        tq = tok[:, Sk - Sq:].contiguous()
        tq[0, :5] = -2147483647  # padded query rows carry the sentinel
        tq[1, :20] = -2147483647  # hot rows too: whole sentinel tiles, then a tile that starts with some
        perm_q, sorted_q, perm_k, sorted_k, k_lo, k_hi = pair_plan(*sort_rows(tq), tok, bm, causal)
        ck = sorted_k.long() * (Sk + 1) + perm_k
        last = torch.clamp(torch.arange(0, Sq, bm) + bm - 1, max=Sq - 1)
        # a tile's lower end comes from its first row that is not the sentinel (sorted first)
        n_sent = (sorted_q == -2147483647).sum(1, keepdim=True)
        first = torch.minimum(torch.maximum(torch.arange(0, Sq, bm)[None], n_sent), last[None])
        pos_last = perm_q[:, last] + (Sk - Sq) if causal else torch.full((2, len(last)), Sk)
        lo = torch.searchsorted(ck, (sorted_q.gather(1, first).long() * (Sk + 1)).contiguous())
        hi = torch.searchsorted(ck, (sorted_q[:, last].long() * (Sk + 1) + pos_last).contiguous(), right=True)
        assert torch.equal(k_lo.long(), lo) and torch.equal(k_hi.long(), torch.maximum(hi, lo)), (causal, vocab)
