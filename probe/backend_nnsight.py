"""nnsight backend: record a user's nnsight model into a headscope `Recording`.

    from nnsight import TransformersModel      # nnsight >= 0.8; LanguageModel before (deprecated there)
    lm = TransformersModel(model.hf, tokenizer=model.tokenizer, task="text-generation")
    rec = record_nnsight(lm, "The cat sat on the mat.", stats=StatsRequest.all(), patterns=[0, 5])

Inside one `lm.trace`, each layer's self-attention module's second output (the attention
probabilities, which transformers returns only from eager attention) is turned into statistics
right away, so at most one layer's S x S matrix is alive at a time. The model is switched to eager
attention for the trace and restored afterwards. nnsight never sees the pre-softmax scores, so
`lse` cannot be recorded through it (asking for it raises; use the native or TransformerLens backend).
"""

from __future__ import annotations

import torch

from headscope.kernels.stats import StatsRequest

from .errors import InputError, RecordingError
from .external import add_layer_probs, batch_inputs, extra_inputs, finish, make_recorder
from .meta import ModelMeta
from .model import find_attention_modules
from .native import ModelState
from .recording import Recording


def _envoy(lm, path: str):
    env = lm
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


@torch.no_grad()
def record_nnsight(lm, inputs, stats: StatsRequest | None = None, *, patterns=None, head_out=None,
                   attention_mask: torch.Tensor | None = None, keyset: torch.Tensor | None = None,
                   prepend_bos: bool = False, padding_side: str = "right",
                   max_pattern_bytes: int | None = None) -> Recording:
    """One traced forward of `lm` over `inputs` -> Recording (backend "nnsight").

    Args:
        lm: an `nnsight.TransformersModel` (or the older `LanguageModel`) wrapping a transformers model
            whose attention layers return their probabilities under eager attention (Llama family,
            Gemma, GPT-2, BERT, ...).
        inputs: a text, a list of texts, token ids [S] / [B, S] (then attention_mask [B, S] optional), or a
            tokenizer's output (input_ids, attention_mask, token_type_ids).
        stats, patterns, keyset, max_pattern_bytes: as `HeadscopeModel.record` (no `lse`, see module doc).
        head_out: not available here (nnsight does not see z before the output projection); must be None.
    Returns:
        Recording with stats [B, L, H, S].
    """
    request = stats or StatsRequest()
    if request.lse:
        raise InputError("the nnsight backend cannot record `lse`: transformers does not expose pre-softmax "
                         "scores. Drop lse from the StatsRequest, or use the native / TransformerLens backend.")
    if head_out:
        raise InputError("the nnsight backend does not record head_out; use the native backend "
                         "(model.record(head_out=...)).")
    if getattr(lm, "dispatched", True) is False:
        lm.dispatch()  # TransformersModel(path) holds meta tensors until its weights are loaded
    hf = lm._module
    state = ModelState.existing(hf)  # set when a HeadscopeModel wraps the same transformers model
    if state is not None and state.in_use:
        what = "an edit (model.edit_attention)" if state.edits else "a native recording (model.record)"
        raise InputError(f"{what} is active on this model: the nnsight backend traces under eager attention, "
                         "which bypasses headscope's attention function, so the trace would show the unedited "
                         "model. Record edited runs with the native backend (model.record inside "
                         "model.edit_attention), or call record_nnsight outside those blocks.")
    meta = ModelMeta.from_config(hf.config, getattr(hf, "name_or_path", None) or type(hf).__name__)
    device = next(hf.parameters()).device
    ids, mask = batch_inputs(inputs, lm.tokenizer, meta, device, attention_mask, prepend_bos, padding_side)
    extra = extra_inputs(inputs, ids)
    recorder, request = make_recorder(meta, device, request, patterns, None, keyset, max_pattern_bytes)
    recorder.begin_call(ids, mask, ids.shape[1], ids.shape[0], 0)
    names = {m: n for n, m in hf.named_modules()}
    paths = [names[m] for m in find_attention_modules(hf, meta.n_layers)]
    saved_impl = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with lm.trace({"input_ids": ids, "attention_mask": mask, **extra}):
            for layer, path in enumerate(paths):
                p = _envoy(lm, path).output[1]
                if p is None:
                    raise RecordingError(f"{path} returned no attention probabilities under eager attention; "
                                         "this architecture is not supported by the nnsight backend.")
                add_layer_probs(recorder, layer, p)
    finally:
        hf.set_attn_implementation(saved_impl)
    return finish(recorder, "nnsight")
