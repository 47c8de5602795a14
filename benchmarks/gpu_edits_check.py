"""Interventions on the GPU (the Triton kernel) against the exact torch path on the same GPU.

The CPU tests check every intervention on the torch path; on CUDA the native backend sends the same
edits through the Triton kernel (head masks, ACT key scaling with one key set per head, key bias,
and value edits, which read the kernel's keyset_mass). Each case runs a forward and a greedy
generate() with the edit, once with the automatic backend (Triton) and once with
`model.state.backend = "torch"`, and compares the logits (and the generated tokens in fp32). Also
runs an SAE's metrics and top-activating examples with the SAE and model on the GPU against the
same SAE on the CPU (never run on a GPU before this script).

Model: a random tiny Llama with head_dim 64 (the keyset statistic on the tensor cores), 8 heads,
2 kv heads, 2 layers; batch 2 with left padding; fp32 and bf16.

Usage (GPU): python3 benchmarks/gpu_edits_check.py   (without CUDA it compares the torch path with itself)
"""

from __future__ import annotations

import json
import os
import torch

from headscope.circuits.ablation import ablate_heads
from headscope.circuits.value_edit import edit_values
from headscope.probe import LayerEdit, load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-4, torch.bfloat16: 5e-2}


def tiny(dtype, tokenizer=None):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
    hf = T.LlamaForCausalLM(cfg)
    for p in hf.parameters():  # peaked attention: edits move the logits visibly
        if p.dim() > 1:
            p.data.mul_(3.0)
    return load_model(hf.eval(), device=DEVICE, dtype=dtype, tokenizer=tokenizer)


def word_tokenizer(n: int = 64):
    """A tokenizer for the tiny model's ids, built in code (no model files reach the GPU machine):
    id i is the word t<i>. Top-activating examples decode their contexts with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(n)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def cases(model, ids):
    B, S = ids.shape
    H, D = model.meta.n_heads, model.meta.head_dim
    g = torch.Generator().manual_seed(2)
    keys = torch.zeros(B, S, dtype=torch.bool)
    keys[:, 7] = True
    per_head = torch.rand(B, H, S, generator=g) < 0.2  # ACT: one key set per head
    beta = torch.linspace(0.2, 1.0, H)
    deltas = {(0, 1): 6 * torch.randn(D, generator=g), (1, 5): 6 * torch.randn(D, generator=g)}

    return {
        "value_edit": lambda: edit_values(model, deltas, [7, 9]),
        "ablate_zero": lambda: ablate_heads(model, [(0, 2), (1, 0)]),
        "ablate_uniform": lambda: ablate_heads(model, [(0, 3), (1, 6)], mode="uniform"),
        "key_scale_per_head": lambda: model.edit_attention(
            {0: LayerEdit(key_scale_beta=beta, keys=per_head.to(model.device))}),
        "key_bias": lambda: model.edit_attention({1: LayerEdit(key_bias=torch.full((H,), 2.0), keys=keys.to(model.device))}),
    }


def run(model, ids, mask, make_edit):
    with torch.no_grad(), make_edit():
        logits = model.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return logits, out.sequences, torch.stack(out.scores).float()


def check_edits(dtype) -> list[dict]:
    model = tiny(dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, 24), generator=g).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    rows = []
    for name, make_edit in cases(model, ids).items():
        model.state.backend = "auto"
        fast = run(model, ids, mask, make_edit)
        model.state.backend = "torch"
        exact = run(model, ids, mask, make_edit)
        model.state.backend = "auto"
        with torch.no_grad():
            plain = model.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        real = mask.bool()[:, :, None]
        d = float(((fast[0] - exact[0]) * real).abs().max())
        moved = float(((exact[0] - plain) * real).abs().max())
        same_tokens = bool(torch.equal(fast[1], exact[1]))
        d_scores = float((fast[2] - exact[2]).abs().max()) if same_tokens else float("nan")
        ok = d < TOL[dtype] and moved > 10 * TOL[dtype] and (same_tokens or dtype != torch.float32)
        if same_tokens:
            ok = ok and d_scores < 2 * TOL[dtype]
        rows.append({"case": name, "dtype": str(dtype).split(".")[-1], "logits_diff": d, "edit_moves_logits": moved,
                     "same_generated_tokens": same_tokens, "generate_scores_diff": d_scores, "pass": ok})
    return rows


def check_sae() -> dict:
    """SAE metrics and top-activating examples with everything on the GPU = the same SAE on the CPU."""
    from headscope.sae.architectures import SAE, SAEConfig
    from headscope.sae.metrics import reconstruction_metrics, top_activating

    tokenizer = word_tokenizer()
    model = tiny(torch.float32, tokenizer)
    torch.manual_seed(3)
    sae = SAE(SAEConfig(d_in=model.meta.n_heads * model.meta.head_dim, d_sae=256, arch="topk", k=8, layer=0,
                        site="z", n_heads=model.meta.n_heads, head_dim=model.meta.head_dim))
    tokens = [torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    acts = [model.run_recorded(t.to(DEVICE), head_out=[0], stop_after_layer=0)[1].z(0).flatten(2).flatten(0, 1).float()
            for t in tokens]
    m_cpu = reconstruction_metrics(sae, [a.cpu() for a in acts])
    top_cpu = top_activating(model, sae, 0, tokens, [0, 1, 2], n=3) if DEVICE == "cpu" else None
    sae_gpu = sae.to(DEVICE)
    m_gpu = reconstruction_metrics(sae_gpu, acts)
    top_gpu = top_activating(model, sae_gpu, 0, [t.to(DEVICE) for t in tokens], [0, 1, 2], n=3)
    if top_cpu is None:  # the CPU reference needs the model on the CPU too
        model_cpu = load_model(model.hf.to("cpu"), device="cpu", dtype=torch.float32, tokenizer=tokenizer)
        top_cpu = top_activating(model_cpu, sae.to("cpu"), 0, tokens, [0, 1, 2], n=3)
    same_top = [(r["latent"], r["row"], r["position"]) for r in top_cpu] == \
               [(r["latent"], r["row"], r["position"]) for r in top_gpu]
    act_diff = max((abs(a["activation"] - b["activation"]) for a, b in zip(top_cpu, top_gpu)), default=0.0)
    fvu_diff = abs(m_cpu["fvu"] - m_gpu["fvu"])
    return {"case": "sae_on_gpu", "fvu_cpu": m_cpu["fvu"], "fvu_gpu": m_gpu["fvu"], "same_top_examples": same_top,
            "top_activation_diff": act_diff, "pass": same_top and fvu_diff < 1e-4 and act_diff < 1e-3}


def main():
    rows = check_edits(torch.float32) + check_edits(torch.bfloat16) + [check_sae()]
    for r in rows:
        print(json.dumps(r))
    print(f"gpu_edits_check ({DEVICE}): {sum(r['pass'] for r in rows)}/{len(rows)} PASS")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_edits_check.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
