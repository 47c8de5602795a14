"""Direct logit effect of each head's output: W_U (norm gain) W_O^h z_h, for copying scores.

The final norm is linearised with its gain only: RMSNorm(x) = g * x / rms(x), and the 1/rms(x)
factor of a position is common to every head at that position (transformers returns only the
normalised final residual, so rms(x) is not available without hooks). Effects are therefore in
logits per unit of final-residual RMS: they rank heads exactly within a position and are
comparable across positions up to that positive scale. LayerNorm additionally centres o; Gemma's
RMSNorm uses gain (1 + w).
"""

from __future__ import annotations

import torch

from headscope.probe.errors import InputError

_OUT_PROJECTIONS = ("o_proj", "out_proj", "dense", "c_proj")
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


def output_projection(module) -> torch.Tensor:
    """[d_model, H * head_dim] weight of an attention module's output projection (y = W z)."""
    for name in _OUT_PROJECTIONS:
        proj = getattr(module, name, None)
        if proj is not None and hasattr(proj, "weight"):
            w = proj.weight
            # GPT-2's Conv1D stores [in, out].
            return w.T if type(proj).__name__ == "Conv1D" else w
    raise InputError(f"{type(module).__name__} has no output projection among {_OUT_PROJECTIONS}; "
                     "direct logit effects are not available for this architecture.")


def final_norm(hf) -> torch.nn.Module:
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf
    for name in _FINAL_NORMS:
        norm = getattr(decoder, name, None)
        if isinstance(norm, torch.nn.Module) and hasattr(norm, "weight"):
            return norm
    raise InputError(f"{type(hf).__name__}: no final norm found among {_FINAL_NORMS}.")


def unembedding_with_gain(model) -> tuple[torch.Tensor, bool]:
    """(W_U * g [V, d_model], centre) where centre says the final norm subtracts the mean (LayerNorm)."""
    norm = final_norm(model.hf)
    g = norm.weight.detach().float()
    if type(norm).__name__.startswith("Gemma"):
        g = 1 + g
    w_u = model.hf.get_output_embeddings().weight.detach().float()
    return w_u * g, isinstance(norm, torch.nn.LayerNorm)


def head_logit_effect(model, layer: int, z: torch.Tensor, targets: torch.Tensor, unembed=None) -> torch.Tensor:
    """Each head's direct effect on the target token's logit, minus its mean effect over the vocab.

    z [B, S, H, D] per-head outputs of `layer`; targets [B, S] token ids (any value where unused).
    Returns [B, S, H] float32. Subtracting the vocab mean makes the number softmax-relevant
    (a constant shift of all logits changes nothing).
    """
    ug, centre = unembed if unembed is not None else unembedding_with_gain(model)
    H, D = model.meta.n_heads, model.meta.head_dim
    w_o = output_projection(model.attention_modules[layer]).detach().float()
    o = torch.einsum("bshd,mhd->bshm", z.float(), w_o.view(w_o.shape[0], H, D))
    if centre:
        o = o - o.mean(-1, keepdim=True)
    direction = ug[targets] - ug.mean(0)
    return torch.einsum("bshm,bsm->bsh", o, direction)
