"""Recording generate() against one forward over the same tokens (the reference for cached decoding)."""

import torch

from headscope.probe import load_model


def tiny_mistral(window: int):
    """A random 2-layer Mistral whose every layer has a sliding window; weights scaled up so that
    attention is peaked (argmax and masses far from uniform)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                        max_position_embeddings=256)
    hf = MistralForCausalLM(cfg).eval()
    for p in hf.parameters():
        if p.dim() > 1:
            p.data.mul_(4.0)
    return load_model(hf)


def check_decode_matches_forward(model, request, *, prompt_len=9, new=7, tol=2e-5):
    """Record a greedy generation (batch 2, row 1 left-padded by 2) and the same tokens in one
    forward; every statistic and pattern of the decode recording must equal the forward's."""
    ids = torch.randint(3, 50, (2, prompt_len))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the sink keys of row 1 start at position 2
    with torch.no_grad(), model.record(request, patterns=[0]) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True)
    seq = out[:, :-1]
    full_mask = torch.cat([mask, torch.ones(2, new - 1, dtype=mask.dtype)], 1)
    _, ref = model.run_recorded(seq, full_mask, request, patterns=[0])
    q_ok = ref.attention_mask[:, None, None, :]
    for name in request.names():
        a, b = rec.stats[name], ref.stats[name]
        if name != "colsum":
            a = torch.where(q_ok.reshape(q_ok.shape + (1,) * (a.dim() - 4)), a, torch.zeros_like(a))
            b = torch.where(q_ok.reshape(q_ok.shape + (1,) * (b.dim() - 4)), b, torch.zeros_like(b))
        if name == "argmax":
            assert torch.equal(a, b), name
        else:
            assert (a.double() - b.double()).abs().max() < tol, name
    assert (rec.patterns - ref.patterns).abs().max() < tol
