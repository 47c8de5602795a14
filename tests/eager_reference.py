"""The independent reference several tests compare against: transformers' own eager attention."""

import torch


def eager_patterns(model, ids, mask=None) -> torch.Tensor:
    """[B, L, H, S, S] attention probabilities from transformers' eager implementation (no headscope code)."""
    impl = model.hf.config._attn_implementation
    model.hf.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.hf(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    finally:
        model.hf.set_attn_implementation(impl)
    return torch.stack(out.attentions, 1).float()
