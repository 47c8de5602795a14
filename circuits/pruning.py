"""Physical head pruning: `prune(model, heads)` returns a smaller transformers model.

Layout. Llama-family attention reshapes q/k/v with `view(..., -1, head_dim)` and maps query heads
to kv heads as h // G, so a layer may hold any number of kv groups as long as every group has the
same number G of query heads. Per layer we keep the kv groups that still have a query head
(a kv head goes only with its whole group), G_l = the largest number of kept query heads in a
group, and fill shorter groups with *padding heads* whose q rows and o columns are zero: such a
head attends uniformly and writes exactly 0, so logits equal the masked model's. gpt-oss's per-head
sink logits move with their heads. Attention that keeps heads elsewhere (a q/k norm over all heads,
as in OLMo-2; per-head norm weights, as in Cohere / StableLM qk-norm) is refused, and `prune` checks
the pruned model against the zero-ablated one on a short input before returning it.

Saving. transformers' Llama reads one head count for all layers from the config, so `save_pruned`
pads every layer to the same (kv groups, G) with zero heads and writes a plain Llama checkpoint
(`head_dim` set explicitly) that `AutoModelForCausalLM.from_pretrained` loads with no custom code
and gives the same logits; the per-layer layout is kept in the config field `headscope_pruning`,
and `load_pruned` strips the padding again to get the compact, faster model back.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from headscope.kernels.errors import HeadscopeError
from headscope.probe import HeadscopeModel, ModelMeta

from .ablation import heads_by_layer

CONFIG_FIELD = "headscope_pruning"


class PruningError(HeadscopeError, ValueError):
    """Heads cannot be pruned as asked (e.g. every head of a layer, or an unsupported architecture)."""


def check_prunable(model: HeadscopeModel, heads) -> dict[int, torch.Tensor]:
    """Validate (layer, head) pairs -> {layer: [H] bool}; refuse to empty a layer."""
    masks = heads_by_layer(model, heads)
    full = [l for l, m in masks.items() if bool(m.all())]
    if full:
        raise PruningError(f"cannot prune every head of layers {sorted(full)}: a layer needs at least one "
                           "head (its attention output would vanish); keep one head per layer.")
    return masks


def _groups_for(pruned: torch.Tensor, H: int, Hkv: int) -> tuple[list[tuple[int, list[int]]], int]:
    """Kept (kv head, [query heads]) groups of one layer and G_l, from its [H] pruned mask."""
    G = H // Hkv
    groups = []
    for g in range(Hkv):
        kept = [h for h in range(g * G, (g + 1) * G) if not bool(pruned[h])]
        if kept:
            groups.append((g, kept))
    return groups, max(len(k) for _, k in groups)


def _rebuild(attn: nn.Module, groups: list[tuple[int | None, list[int | None]]], G: int) -> None:
    """Replace attn's projections: `groups` lists (source kv head or None, source query heads or
    None per slot, padded to G); None = a zero (padding) head or kv head."""
    D = attn.head_dim
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj

    def rows(lin: nn.Linear, idx: list[int | None]) -> nn.Linear:
        new = nn.Linear(lin.in_features, len(idx) * D, bias=lin.bias is not None, dtype=lin.weight.dtype,
                        device=lin.weight.device)
        with torch.no_grad():
            new.weight.zero_()
            if new.bias is not None:
                new.bias.zero_()
            for slot, src in enumerate(idx):
                if src is not None:
                    new.weight[slot * D:(slot + 1) * D] = lin.weight[src * D:(src + 1) * D]
                    if new.bias is not None:
                        new.bias[slot * D:(slot + 1) * D] = lin.bias[src * D:(src + 1) * D]
        return new

    q_idx = [h for _, hs in groups for h in hs + [None] * (G - len(hs))]
    kv_idx = [g for g, _ in groups]
    new_o = nn.Linear(len(q_idx) * D, o.out_features, bias=o.bias is not None, dtype=o.weight.dtype,
                      device=o.weight.device)
    with torch.no_grad():
        new_o.weight.zero_()
        for slot, src in enumerate(q_idx):
            if src is not None:
                new_o.weight[:, slot * D:(slot + 1) * D] = o.weight[:, src * D:(src + 1) * D]
        if o.bias is not None:
            new_o.bias.copy_(o.bias)
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = rows(q, q_idx), rows(k, kv_idx), rows(v, kv_idx), new_o
    attn.num_key_value_groups = G
    sinks = getattr(attn, "sinks", None)
    if isinstance(sinks, nn.Parameter):  # gpt-oss: one learned sink logit per query head moves with its head
        new = torch.zeros(len(q_idx), dtype=sinks.dtype, device=sinks.device)
        with torch.no_grad():
            for slot, src in enumerate(q_idx):
                if src is not None:
                    new[slot] = sinks[src]
        attn.sinks = nn.Parameter(new, requires_grad=sinks.requires_grad)


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_attention(attn: nn.Module, layer: int, H: int, Hkv: int, D: int) -> None:
    """Refuse attention layouts whose heads live anywhere but in the q/k/v rows and o columns (plus
    q/k norms over one head_dim, shared by all heads, and gpt-oss's per-head sinks, which `_rebuild`
    moves): cutting q rows alone would leave such a model silently different from the ablated one."""
    cls = type(attn).__name__
    want = {"q_proj": (0, H * D), "k_proj": (0, Hkv * D), "v_proj": (0, Hkv * D), "o_proj": (1, H * D)}
    for name, (dim, n) in want.items():
        lin = getattr(attn, name, None)
        if not isinstance(lin, nn.Linear) or lin.weight.dim() != 2 or lin.weight.shape[dim] != n:
            raise PruningError(f"layer {layer}: {cls} has no plain nn.Linear {name} with {n} "
                               f"{'rows' if dim == 0 else 'columns'} ({H} heads, {Hkv} kv heads, head_dim {D}); "
                               "physical pruning supports Llama-family attention with separate q/k/v/o projections.")
    for pname, p in attn.named_parameters():
        top = pname.split(".", 1)[0]
        if top in _PROJECTIONS or (top in ("q_norm", "k_norm") and p.numel() == D) or (
                pname == "sinks" and tuple(p.shape) == (H,)):
            continue
        raise PruningError(f"layer {layer}: {cls}.{pname} {tuple(p.shape)} spans several heads or holds one entry "
                           "per head, and prune() only cuts q/k/v rows and o columns (q/k norms over one head_dim "
                           "are fine): the pruned model would differ from the ablated one. Ablate these heads "
                           "instead (headscope.circuits.ablate_heads).")


def _probe_logits(hf: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()


def _attn_modules(hf: nn.Module) -> list[nn.Module]:
    try:
        return [layer.self_attn for layer in hf.model.layers]
    except AttributeError as exc:
        raise PruningError(f"physical pruning supports Llama-family decoders (model.layers[i].self_attn with "
                           f"q/k/v/o_proj); {type(hf).__name__} is not one.") from exc


def prune(model: HeadscopeModel, heads) -> HeadscopeModel:
    """A new model with `heads` [(layer, head), ...] physically removed; `model` is not changed.

    Returns a HeadscopeModel around a transformers model whose layers have their own head counts
    (the compact form, for running); save it with `save_pruned`. Recording statistics on it is not
    supported (heads per layer differ); record on the original with `ablate_heads` instead.
    """
    if getattr(model.hf.config, CONFIG_FIELD, None) is not None or model.state is None:
        raise PruningError("this model is already pruned (its head indices are no longer the original ones): "
                           "prune the original model with the union of both head sets.")
    masks = check_prunable(model, heads)
    meta = model.meta
    H, Hkv, D = meta.n_heads, meta.n_kv_heads, meta.head_dim
    for l, attn in enumerate(_attn_modules(model.hf)):
        _check_attention(attn, l, H, Hkv, D)
    hf = copy.deepcopy(model.hf)
    if model.state._users:  # copied inside an edit/record context: run the copy as transformers would
        hf.set_attn_implementation(model.state._saved_impl)
    attns = _attn_modules(hf)
    # Reference for the check below: the copy with the pruned heads' o columns zeroed (columns the
    # rebuild drops anyway), i.e. the zero-ablated model, as transformers runs it.
    V = hf.get_input_embeddings().num_embeddings
    ids = ((torch.arange(8) * 7919 + 1) % V)[None].to(next(hf.parameters()).device)
    with torch.no_grad():
        for l, m in masks.items():
            for h in torch.nonzero(m)[:, 0].tolist():
                attns[l].o_proj.weight[:, h * D:(h + 1) * D] = 0
    want = _probe_logits(hf, ids)
    layout = []
    for l, attn in enumerate(attns):
        mask = masks.get(l, torch.zeros(H, dtype=torch.bool))
        groups, G = _groups_for(mask, H, Hkv)
        padded = [(g, hs + [None] * (G - len(hs))) for g, hs in groups]
        if mask.any():
            _rebuild(attn, padded, G)
        layout.append({"G": G, "groups": [[g, hs] for g, hs in padded]})
    try:
        got = _probe_logits(hf, ids)
    except Exception as exc:  # e.g. an attention that reshapes with a fixed head count
        raise PruningError(f"{type(attns[0]).__name__} does not run with fewer heads per layer ({exc}); physical "
                           "pruning supports attention that infers the head count from q/k/v shapes "
                           "(Llama-family). Ablate the heads instead.") from exc
    tol = (1e-4 if hf.dtype in (torch.float32, torch.float64) else 5e-2) * (1 + float(want.abs().max()))
    err = float((got - want).abs().max())
    if not err <= tol:
        raise PruningError(f"the pruned {type(attns[0]).__name__} model's logits differ from the zero-ablated "
                           f"model's by {err:.3g} (tolerance {tol:.3g}) on a test input: this attention keeps "
                           "per-head state that prune() does not cut. Ablate the heads instead.")
    pruned = sorted((l, int(h)) for l, m in masks.items() for h in torch.nonzero(m)[:, 0].tolist())
    setattr(hf.config, CONFIG_FIELD, {"pruned_heads": pruned, "layout": layout, "n_heads": meta.n_heads,
                                      "n_kv_heads": meta.n_kv_heads, "head_dim": meta.head_dim})
    return _wrap(hf, model)


def _wrap(hf: nn.Module, like: HeadscopeModel | None, tokenizer=None) -> HeadscopeModel:
    out = HeadscopeModel.__new__(HeadscopeModel)
    # Not HeadscopeModel.__init__: its metadata assumes one head count for every layer.
    out.hf = hf.eval()
    out.tokenizer = like.tokenizer if like is not None else tokenizer
    # meta keeps the unpruned shape facts (positions, vocab); heads per layer are in hf.config.headscope_pruning
    out.meta = like.meta if like is not None else ModelMeta.from_config(hf.config, str(hf.name_or_path))
    out.attention_modules = _attn_modules(hf)
    out.state = None
    return out


def n_attention_params(model: HeadscopeModel) -> int:
    """Parameters of every attention projection (q, k, v, o) of the model."""
    return sum(p.numel() for a in _attn_modules(model.hf) for p in a.parameters())


def save_pruned(pruned: HeadscopeModel, path) -> Path:
    """Write a plain transformers Llama checkpoint (uniformly padded; see the module docstring)."""
    hf = pruned.hf
    info = getattr(hf.config, CONFIG_FIELD, None)
    if info is None:
        raise PruningError("this model was not made by headscope.circuits.prune.")
    layout = info["layout"]
    KV = max(len(l["groups"]) for l in layout)
    G = max(l["G"] for l in layout)
    out = copy.deepcopy(hf)
    for attn, lay in zip(_attn_modules(out), layout):
        # slots of the compact layer -> slots of the uniform padded layer
        groups = []
        for gi, (_, hs) in enumerate(lay["groups"]):
            groups.append((gi, [gi * lay["G"] + s if h is not None else None for s, h in enumerate(hs)]
                           + [None] * (G - lay["G"])))
        groups += [(None, [None] * G)] * (KV - len(groups))
        _rebuild(attn, groups, G)
    cfg = out.config
    cfg.head_dim = info["head_dim"]
    cfg.num_attention_heads = KV * G
    cfg.num_key_value_heads = KV
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out.save_pretrained(path)
    if pruned.tokenizer is not None:
        pruned.tokenizer.save_pretrained(path)
    return path


def load_pruned(path, *, compact: bool = True, dtype: torch.dtype = torch.float32) -> HeadscopeModel:
    """Load a `save_pruned` checkpoint with transformers; compact=True strips the padding heads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    info = getattr(hf.config, CONFIG_FIELD, None)
    if info is None:
        raise PruningError(f"{path} has no {CONFIG_FIELD} field: not a headscope pruned checkpoint.")
    if compact:
        G_u = hf.config.num_attention_heads // hf.config.num_key_value_heads
        for attn, lay in zip(_attn_modules(hf), info["layout"]):
            groups = [(gi, [gi * G_u + s for s in range(lay["G"])]) for gi in range(len(lay["groups"]))]
            _rebuild(attn, groups, lay["G"])
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
    return _wrap(hf, None, tok)
