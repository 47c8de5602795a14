"""Every head of a SmolLM2-135M-shaped model recorded at 32k and 128k tokens on one GPU, through the kernel.

A randomly initialised LlamaForCausalLM with the embedded model's shapes (30 layers, hidden 576,
9 heads, 3 kv heads, head_dim 64, intermediate 1536, vocab 49152; weights cannot travel to the GPU
machine, and speed / memory do not depend on their values) in bf16. Every one-pass statistic of
every head is recorded through `headscope.probe` (`load_model(hf)` + `model.record(stats=...)`,
the native backend, which calls the Triton kernel on CUDA). Layer 0's statistics at 32k are
checked against the exact torch reference on the recorded q, k, v.

Beside it: the same forward with SDPA and no recording (the price of the statistics), and the
length at which eager attention runs out of memory, (i) keeping every layer's pattern as
TransformerLens' run_with_cache keeps hook_pattern (output_attentions=True) and (ii) keeping none.

Usage (GPU): python3 benchmarks/e2e_long_context.py   (--smoke: CPU, 2 layers, 256 tokens)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from headscope.kernels import StatsRequest, attention_reference

REQUEST = StatsRequest.all(topk=1, sink_k=1, offsets=(1,), keyset=True, colsum=False)


def build(n_layers: int, max_pos: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=n_layers,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=max_pos,
                      rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(dev, fn):
    """(result, seconds, peak GiB allocated)."""
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    r = fn()
    sync(dev)
    dt = time.perf_counter() - t0
    pk = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return r, dt, pk


def record_all(hs, ids, kset, qkv_layers=None):
    with torch.no_grad(), hs.record(stats=REQUEST, keyset=kset, qkv=qkv_layers) as rec:
        hs.hf(input_ids=ids, use_cache=False, logits_to_keep=1)
    return rec


def sanity(rec, L, H, S) -> list[str]:
    bad = []
    for name, t in rec.stats.items():
        if tuple(t.shape[:4]) != (1, L, H, S):
            bad.append(f"{name} shape {tuple(t.shape)}")
        if name != "argmax" and not torch.isfinite(t).all():
            bad.append(f"{name} has non-finite values")
    for name in ("sink_mass", "offset_mass", "match_mass", "next_match_mass", "keyset_mass", "max_prob"):
        t = rec.stats[name]
        if (t < -1e-3).any() or (t > 1 + 1e-3).any():
            bad.append(f"{name} outside [0, 1]")
    if (rec.stats["entropy"] < -1e-3).any():
        bad.append("negative entropy")
    return bad


def check_layer0(rec, kset) -> dict:
    """Layer 0 stats from the kernel vs the exact reference on the q, k, v the model produced."""
    q, k, v = rec.q[:, 0], rec.k[:, 0], rec.v[:, 0]
    tok = rec.tokens
    _, ref = attention_reference(q.float(), k.float(), v.float(), causal=True, token_ids=tok, keyset=kset,
                                 request=REQUEST, chunk=256)
    errs = {}
    for name in REQUEST.names():
        a, r = rec.stats[name][:, 0], ref[name]
        if name == "argmax":
            errs[name] = float((a != r).float().mean())
        else:
            errs[name] = float((a.float() - r).abs().max())
    return errs


def eager_oom_length(model, dev, lengths, keep_patterns: bool) -> dict:
    """Longest length that ran and the first that ran out of memory, eager attention."""
    model.set_attn_implementation("eager")
    res = {"ran": [], "oom_at": None}
    try:
        for S in lengths:
            ids = torch.randint(0, 49152, (1, S), device=dev)
            try:
                def f():
                    with torch.no_grad():
                        out = model(input_ids=ids, use_cache=False, logits_to_keep=1, output_attentions=keep_patterns)
                    return out.attentions if keep_patterns else None
                att, dt, pk = measure(dev, f)
                res["ran"].append({"S": S, "s": dt, "peak_gib": pk})
                print(f"  eager keep_patterns={keep_patterns} S={S}: {dt:.2f}s peak {pk:.1f} GiB", flush=True)
                del att
            except torch.OutOfMemoryError:
                res["oom_at"] = S
                print(f"  eager keep_patterns={keep_patterns} S={S}: OOM", flush=True)
                break
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        model.set_attn_implementation("sdpa")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--lengths", default="32768,131072")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    L = 2 if args.smoke else 30
    lengths = [256] if args.smoke else [int(x) for x in args.lengths.split(",")]
    import transformers
    import triton
    import headscope.probe as probe

    info = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    print(info, flush=True)
    model = build(L, max(lengths) + 1, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    hs = probe.load_model(model)
    print(hs, flush=True)
    results = {"info": info, "request": REQUEST.to_dict(), "runs": []}

    # Compile, autotune and warm both paths (kernel and SDPA) outside the measurements; the kernel's
    # autotune key has a length bucket, so warm each measured length's bucket too.
    for n in ([4096] + lengths if dev.type == "cuda" else [128]):
        warm = torch.randint(0, 49152, (1, n), device=dev)
        record_all(hs, warm, torch.rand(warm.shape, device=dev) < 0.01)
        with torch.no_grad():
            hs.hf(input_ids=warm, use_cache=False, logits_to_keep=1)
        del warm

    for S in lengths:
        g = torch.Generator(device=dev).manual_seed(S)
        ids = torch.randint(0, 49152, (1, S), device=dev, generator=g)
        kset = torch.rand(1, S, device=dev, generator=g) < 0.01
        first = S == lengths[0]
        rec, dt, pk = measure(dev, lambda: record_all(hs, ids, kset, qkv_layers=[0] if first else None))
        bad = sanity(rec, L, 9, S)
        run = {"S": S, "record_s": dt, "record_peak_gib": pk, "sanity": bad or "ok",
               "stats_gib": sum(t.numel() * t.element_size() for t in rec.stats.values()) / 2**30}
        if first:
            run["layer0_vs_reference"] = check_layer0(rec, kset)
        del rec
        with torch.no_grad():
            _, dt2, pk2 = measure(dev, lambda: hs.hf(input_ids=ids, use_cache=False, logits_to_keep=1))
        run.update(sdpa_forward_s=dt2, sdpa_peak_gib=pk2)
        print(f"S={S}: record every head {dt:.2f}s peak {pk:.2f} GiB ({run['sanity']}); "
              f"plain SDPA forward {dt2:.2f}s peak {pk2:.2f} GiB", flush=True)
        if first:
            print(f"  layer 0 vs reference: {run['layer0_vs_reference']}", flush=True)
        results["runs"].append(run)

    if dev.type == "cuda":
        results["eager_keep_patterns"] = eager_oom_length(model, dev, [2048, 4096, 8192, 16384, 32768], True)
        results["eager_no_patterns"] = eager_oom_length(model, dev, [8192, 16384, 32768, 65536], False)

    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "e2e_long_context.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
    print("\nEnd to end, SmolLM2-135M shapes (30 x 9 heads, 3 kv, d64), random weights, bf16, batch 1:")
    print(f"{'tokens':>8} | {'record all heads':>16} {'peak GiB':>9} | {'SDPA fwd':>9} {'peak GiB':>9} | stats")
    for r in results["runs"]:
        print(f"{r['S']:>8} | {r['record_s']:>15.2f}s {r['record_peak_gib']:>9.2f} | {r['sdpa_forward_s']:>8.2f}s "
              f"{r['sdpa_peak_gib']:>9.2f} | {r['sanity']}")
    for key in ("eager_keep_patterns", "eager_no_patterns"):
        if key in results:
            e = results[key]
            last = e["ran"][-1] if e["ran"] else None
            print(f"{key}: ran up to {last['S'] if last else '-'} tokens "
                  f"({last['peak_gib']:.1f} GiB)" if last else f"{key}: nothing ran", end="")
            print(f"; out of memory at {e['oom_at']}" if e["oom_at"] else "; no OOM in the lengths tried")


if __name__ == "__main__":
    main()
