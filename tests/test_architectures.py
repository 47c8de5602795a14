"""The native recorder on each supported architecture against an independent materialised computation:
transformers' own eager attention (output_attentions=True) and statistics written out here in plain torch."""

import pytest
import torch

from headscope.probe import StatsRequest, load_model

from eager_reference import eager_patterns

REQUEST = StatsRequest(lse=False, entropy=True, topk=1, sink_k=1, offsets=(1,), colsum=True)


def check_against_eager(model, ids, mask):
    _, rec = model.run_recorded(ids, mask, REQUEST, patterns=True)
    P = eager_patterns(model, ids, mask)
    B, L, H, S, _ = P.shape
    q_ok = mask.bool()[:, None, None, :]  # statistics of padded query rows are not meaningful
    P = P * q_ok[..., None] * mask.bool()[:, None, None, None, :]
    assert (rec.patterns - P).abs().max() < 1e-5
    # statistics, written out independently of headscope.kernels
    entropy = -(P * P.clamp_min(1e-30).log()).sum(-1)
    max_prob, argmax = P.max(-1)
    prev = torch.zeros(B, L, H, S)
    prev[..., 1:] = torch.diagonal(P, offset=-1, dim1=-2, dim2=-1)
    first = mask.int().argmax(1)
    sink = P[torch.arange(B), :, :, :, first]  # [B, L, H, S]
    colsum = P.sum(-2)

    def close(a, b, tol=1e-5):
        return (torch.where(q_ok, a, torch.zeros_like(a)) - torch.where(q_ok, b, torch.zeros_like(b))).abs().max() < tol

    assert close(rec.stats["entropy"], entropy, 1e-4)
    assert close(rec.stats["max_prob"][..., 0], max_prob)
    assert close(rec.stats["offset_mass"][..., 0], prev)
    assert close(rec.stats["sink_mass"], sink)
    assert (rec.stats["colsum"] * mask.bool()[:, None, None] - colsum).abs().max() < 1e-4
    top = rec.stats["argmax"][..., 0]
    tie = (P.topk(2, -1).values[..., 0] - P.topk(2, -1).values[..., 1]) < 1e-6
    assert ((top == argmax) | tie | ~q_ok).all()
    return rec, P


def test_llama_gqa_embedded_left_padded(model):
    assert model.meta.n_kv_heads < model.meta.n_heads
    batch = model.tokenize(["The quick brown fox jumps over the lazy dog again and again.", "Hi there."],
                           prepend_bos=True, padding_side="left")
    check_against_eager(model, batch["input_ids"], batch["attention_mask"])


def test_gemma2_sliding_window():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size=32,
                       intermediate_size=64, vocab_size=100, sliding_window=4, max_position_embeddings=64)
    model = load_model(Gemma2ForCausalLM(cfg).eval())
    assert model.meta.sliding_windows == (4, None)
    ids = torch.randint(0, 100, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    rec, P = check_against_eager(model, ids, mask)
    i, j = torch.meshgrid(torch.arange(14), torch.arange(14), indexing="ij")
    outside = i - j >= 4
    assert rec.patterns[:, 0][..., outside].abs().max() == 0  # the sliding layer never looks back 4+ tokens
    assert rec.patterns[:, 1][..., outside & (j >= 0)].sum() > 0.1  # the global layer does


def test_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64,
                                    bos_token_id=0, eos_token_id=0)).eval()
    model = load_model(hf)
    assert (model.meta.n_layers, model.meta.n_heads, model.meta.head_dim, model.meta.causal) == (2, 4, 8, True)
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    check_against_eager(model, ids, mask)


def test_bert_encoder_padded_bidirectional():
    model = load_model("all-minilm-l6-v2")
    assert not model.meta.causal
    batch = model.tokenize(["A man is playing a guitar on the stage tonight.", "Dogs bark."])
    assert not batch["attention_mask"].all()
    rec, P = check_against_eager(model, batch["input_ids"], batch["attention_mask"])
    # non-causal: the first query attends to later keys
    assert rec.patterns[:, :, :, 0, 1:].sum() > 0.1
