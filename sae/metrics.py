"""SAE evaluation: L0, fraction of variance unexplained, dead / dense latents, CE loss recovered
with the SAE spliced into the model, top-activating contexts and per-head attribution.

Definitions (over all evaluated tokens t, latents i):
- L0 = mean_t #{i : f_ti > 0}.
- FVU = sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2.
- density_i = fraction of tokens where latent i fires; dead: density 0, dense: density > 0.1.
- CE loss recovered = (L_zero - L_sae) / (L_zero - L_clean), with L the next-token cross-entropy
  of the model when the site's activations are left alone (clean), replaced by the SAE
  reconstruction (sae) or by zeros (zero ablation), at every position except the first (BOS),
  which the SAE was not trained on and which both edits leave alone.
- head attribution of latent i (site z): ||W_dec[i, block h]|| / sum_h' ||W_dec[i, block h']||.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F

from headscope.probe.edits import LayerEdit
from headscope.probe.native import ContextHook

from .activations import ActivationError, block_module, stream_activations


@torch.no_grad()
def reconstruction_metrics(sae, activations: Iterable[torch.Tensor], dense_threshold: float = 0.1) -> dict:
    """L0, FVU, dead / dense fractions and per-latent density over batches x [n, d_in].

    Returns {"tokens", "l0", "fvu", "mse" (squared error summed over d_in, mean over tokens),
    "dead_frac", "dense_frac" (density > dense_threshold), "density" [d_sae] float32}.
    """
    sae.eval()
    n, l0, err = 0, 0.0, 0.0
    s1, s2 = None, None
    dev = sae.W_enc.device
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=dev)
    for x in activations:
        x = x.to(dev).float()
        out = sae(x)
        f = out["f"]
        n += x.shape[0]
        l0 += float((f > 0).sum())
        err += float((out["x_hat"] - x).double().pow(2).sum())
        s1 = x.double().sum(0) if s1 is None else s1 + x.double().sum(0)
        s2 = x.double().pow(2).sum() if s2 is None else s2 + x.double().pow(2).sum()
        fires += (f > 0).sum(0)
    if n == 0:
        raise ActivationError("no activations to evaluate on.")
    total_var = float(s2 - s1.pow(2).sum() / n)
    density = fires.double().cpu() / n
    return {"tokens": n, "l0": l0 / n, "fvu": err / total_var, "mse": err / n,
            "dead_frac": float((fires == 0).double().mean()), "dense_frac": float((density > dense_threshold).double().mean()),
            "density": density.float()}


def _splice_fn(sae, n_heads: int, skip_first: bool):
    def z_fn(z: torch.Tensor, layer: int) -> torch.Tensor:
        B, H, S, D = z.shape
        flat = z.transpose(1, 2).reshape(B, S, H * D)
        rec = sae(flat.float().reshape(-1, H * D))["x_hat"].reshape(B, S, H * D).to(z.dtype)
        if skip_first:
            rec = torch.cat([flat[:, :1], rec[:, 1:]], dim=1)
        return rec.reshape(B, S, H, D).transpose(1, 2)
    return z_fn


def _zero_fn(skip_first: bool):
    def z_fn(z: torch.Tensor, layer: int) -> torch.Tensor:
        out = torch.zeros_like(z)
        if skip_first:
            out[:, :, :1] = z[:, :, :1]
        return out
    return z_fn


@contextmanager
def _block_output_replaced(model, layer: int, fn):
    """The residual stream after block `layer` (site "resid") replaced by fn(x [B, S, d_model])."""
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        y = fn(x)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = block_module(model, layer).register_forward_hook(ContextHook(hook))
    try:
        yield
    finally:
        handle.remove()


def _site_edits(model, sae, layer: int, skip_first: bool) -> dict:
    """{"sae", "zero"}: context managers that splice the SAE's reconstruction into the site, or zero it
    (position 0 left alone with skip_first)."""
    if sae.cfg.site == "z":
        return {"sae": lambda: model.edit_attention({layer: LayerEdit(z_fn=_splice_fn(sae, model.meta.n_heads, skip_first))}),
                "zero": lambda: model.edit_attention({layer: LayerEdit(z_fn=_zero_fn(skip_first))})}
    if sae.cfg.site == "resid":
        def keep_first(x, new):
            return torch.cat([x[:, :1], new[:, 1:]], 1) if skip_first else new

        def splice(x):
            rec = sae(x.float().reshape(-1, x.shape[-1]))["x_hat"].reshape(x.shape).to(x.dtype)
            return keep_first(x, rec)

        return {"sae": lambda: _block_output_replaced(model, layer, splice),
                "zero": lambda: _block_output_replaced(model, layer, lambda x: keep_first(x, torch.zeros_like(x)))}
    raise ActivationError(f"CE loss recovered: unknown SAE site {sae.cfg.site!r} (z or resid).")


def _next_token_loss(model, ids: torch.Tensor) -> tuple[float, int]:
    logits = model.hf(input_ids=ids, use_cache=False).logits.float()
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(loss), ids[:, 1:].numel()


@torch.no_grad()
def ce_loss_recovered(model, sae, layer: int, token_batches: Iterable[torch.Tensor], *, skip_first: bool = True) -> dict:
    """Clean / SAE-spliced / zero-ablated next-token loss of a z-site (head outputs, spliced before
    the output projection) or resid-site (block output) SAE, and the fraction recovered.

    token_batches: token ids [B, S]. Returns {"ce_clean", "ce_sae",
    "ce_zero" (nats/token over every next-token target), "tokens", "ce_recovered"}.
    """
    model.meta.check_layer(layer)
    sae.eval()
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    edits = _site_edits(model, sae, layer, skip_first)
    for ids in token_batches:
        ids = ids.to(model.device)
        loss, n = _next_token_loss(model, ids)
        totals["clean"] += loss
        for name, edit in edits.items():
            with edit():
                totals[name] += _next_token_loss(model, ids)[0]
        count += n
    if count == 0:
        raise ActivationError("no token batches to evaluate CE loss on.")
    L = {k: v / count for k, v in totals.items()}
    denom = L["zero"] - L["clean"]
    return {"ce_clean": L["clean"], "ce_sae": L["sae"], "ce_zero": L["zero"], "tokens": count,
            "ce_recovered": (L["zero"] - L["sae"]) / denom if denom != 0 else float("nan")}


def head_attribution(sae, n_heads: int | None = None, head_dim: int | None = None) -> torch.Tensor:
    """[d_sae, H]: each latent's decoder norm share per head block (rows sum to 1).

    n_heads / head_dim: the model's, for SAEs whose config does not carry them (SAELens files
    written elsewhere); by default the SAE's own."""
    H, D = sae.cfg.n_heads or n_heads, sae.cfg.head_dim or head_dim
    if sae.cfg.site != "z":
        raise ActivationError("head attribution needs an SAE on concatenated head outputs (site z).")
    if not H or not D or H * D != sae.cfg.d_in:
        raise ActivationError(f"head attribution: d_in {sae.cfg.d_in} is not n_heads x head_dim ({H} x {D}); "
                              "pass the model's n_heads and head_dim.")
    norms = sae.W_dec.detach().reshape(sae.cfg.d_sae, H, D).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def top_activating(model, sae, layer: int, token_batches: Iterable[torch.Tensor], latents, *, n: int = 10,
                   context: int = 8) -> list[dict]:
    """Top-n activating token positions of each latent in `latents` over token batches [B, S]
    (position 0 is never a candidate), with text context (`context` tokens either side; the top
    token in [[ ]]). One dict per (latent, rank): latent, rank (0 = highest), activation, row (the
    sequence's index over all batches), position, token, context; latents that never fire have none."""
    latents = list(latents)
    best: dict[int, list] = {i: [] for i in latents}
    idx = torch.tensor(latents, dtype=torch.long)
    rows = []
    for ids in token_batches:
        a = next(stream_activations(model, layer, sae.cfg.site, [ids], skip_first=True))
        # the stream yields CPU tensors; the SAE may sit on the model's GPU (`sae eval --device cuda`)
        f = sae.encode(a.to(sae.W_enc.device).float())[:, idx.to(sae.W_enc.device)].cpu()  # [B * (S - 1), n_latents]
        S1 = ids.shape[1] - 1
        rows.append(ids.cpu())
        base = sum(r.shape[0] for r in rows[:-1])
        k = min(n, f.shape[0])
        v, pos = f.topk(k, dim=0)
        for j, lat in enumerate(latents):
            for val, p in zip(v[:, j].tolist(), pos[:, j].tolist()):
                if val > 0:
                    best[lat].append((val, base + p // S1, p % S1 + 1))
            best[lat] = sorted(best[lat], reverse=True)[:n]
    # one sequence per row, whatever each batch's length (a prompt beside 128-token corpus windows)
    allrows = [r for batch in rows for r in batch]
    tok = model.tokenizer
    out = []
    for lat in latents:
        for rank, (val, r, p) in enumerate(best[lat]):
            seq = allrows[r].tolist()
            left = tok.decode(seq[max(1, p - context):p])
            mid = tok.decode([seq[p]])
            right = tok.decode(seq[p + 1:p + 1 + context])
            out.append({"latent": lat, "rank": rank, "activation": val, "row": r, "position": p,
                        "token": mid, "context": f"{left}[[{mid}]]{right}"})
    return out
