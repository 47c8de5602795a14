"""TransformerLens backend: record a user's TL 4 `TransformerBridge` into a headscope `Recording`.

    from transformer_lens.model_bridge import TransformerBridge
    own = load_model(local_dir)   # a copy of its own: booting swaps its attention modules in place
    bridge = TransformerBridge.boot_transformers(local_dir, hf_model=own.hf, tokenizer=own.tokenizer)
    rec = record_transformer_lens(bridge, "The cat sat on the mat.", stats=StatsRequest.all())

Patterns come from each layer's `hook_pattern`, `lse` from `hook_attn_scores` (the scaled, softcapped,
masked pre-softmax scores), head outputs from `hook_z`; statistics are computed layer by layer inside
the hooks, so only one layer's S x S matrix is alive at a time beyond what TransformerLens itself holds.
Booting with `hf_model=` keeps the HF weights unprocessed, so logits and patterns match the HF model.
Booting replaces that model's attention modules with bridge components that never call headscope's
attention function, so a HeadscopeModel around the same transformers model can no longer edit or
record natively (it raises RecordingError); give the bridge a model of its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from headscope.kernels.stats import StatsRequest

from .errors import InputError, ModelLoadError
from .external import add_layer_probs, batch_inputs, extra_inputs, finish, make_recorder
from .meta import ModelMeta
from .recording import Recording


def bridge_meta(bridge) -> ModelMeta:
    """ModelMeta of a TransformerBridge: read from the HF config it wraps (sliding windows included)."""
    hf = getattr(bridge, "original_model", None)
    name = getattr(bridge.cfg, "model_name", None) or type(bridge).__name__
    if hf is None or not hasattr(hf, "config"):
        raise ModelLoadError("this TransformerBridge wraps no transformers model (bridge.original_model); "
                             "boot it with TransformerBridge.boot_transformers(...).")
    meta = ModelMeta.from_config(hf.config, name)
    if (meta.n_layers, meta.n_heads) != (bridge.cfg.n_layers, bridge.cfg.n_heads):
        raise ModelLoadError(f"bridge cfg ({bridge.cfg.n_layers} layers x {bridge.cfg.n_heads} heads) disagrees with "
                             f"its HF config ({meta.n_layers} x {meta.n_heads}).")
    return meta


@torch.no_grad()
def record_transformer_lens(bridge, inputs, stats: StatsRequest | None = None, *, patterns=None, head_out=None,
                            attention_mask: torch.Tensor | None = None, keyset: torch.Tensor | None = None,
                            prepend_bos: bool = False, padding_side: str = "right",
                            max_pattern_bytes: int | None = None) -> Recording:
    """One forward of `bridge` over `inputs` -> Recording (backend "transformer_lens").

    Args:
        bridge: a TransformerLens 4 `TransformerBridge` (attention must run eagerly, as boot_transformers sets).
        inputs: a text, a list of texts, or token ids [S] / [B, S] (then attention_mask [B, S] optional).
        stats, patterns, head_out, keyset, max_pattern_bytes: as `HeadscopeModel.record`.
        prepend_bos / padding_side: for text inputs, as `HeadscopeModel.tokenize`.
    Returns:
        Recording with stats [B, L, H, S] (lse included when the bridge exposes hook_attn_scores).
    """
    if isinstance(inputs, Mapping) and "input_ids" in inputs:
        ids = torch.as_tensor(inputs["input_ids"])
        types = extra_inputs(inputs, ids[None] if ids.dim() == 1 else ids).get("token_type_ids")
        if types is not None and bool(types.any()):
            raise InputError("the TransformerLens backend does not pass token_type_ids to the model (sentence "
                             "pairs); record them with the native or the nnsight backend.")
    meta = bridge_meta(bridge)
    device = next(bridge.original_model.parameters()).device
    ids, mask = batch_inputs(inputs, bridge.tokenizer, meta, device, attention_mask, prepend_bos, padding_side)
    recorder, request = make_recorder(meta, device, stats, patterns, head_out, keyset, max_pattern_bytes)
    recorder.begin_call(ids, mask, ids.shape[1], ids.shape[0], 0)
    scores: dict[int, torch.Tensor] = {}
    z_layers = set(recorder.head_out_layers)

    def on_scores(layer):
        def hook(t, hook):
            scores[layer] = t
        return hook

    def on_pattern(layer):
        def hook(t, hook):
            add_layer_probs(recorder, layer, t, scores.pop(layer, None) if request.lse else None)
        return hook

    def on_z(layer):
        def hook(t, hook):
            # hook_z [B, S, H, D] fires after hook_pattern: attach it to the entry the pattern hook made.
            recorder._seg["layers"][layer]["z"].append(t.detach())
        return hook

    hooks = []
    for layer in range(meta.n_layers):
        if request.lse:
            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", on_scores(layer)))
        hooks.append((f"blocks.{layer}.attn.hook_pattern", on_pattern(layer)))
        if layer in z_layers:
            hooks.append((f"blocks.{layer}.attn.hook_z", on_z(layer)))
    bridge.run_with_hooks(ids, fwd_hooks=hooks, attention_mask=mask, return_type=None)
    missing = [l for l in range(meta.n_layers) if l not in recorder._seg["layers"]]
    if missing:
        raise ModelLoadError(f"hook_pattern never fired for layers {missing}: the bridge's attention does not run "
                             "eagerly. Boot it with TransformerBridge.boot_transformers (which forces eager attention).")
    return finish(recorder, "transformer_lens")
