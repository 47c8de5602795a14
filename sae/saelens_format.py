"""The SAELens on-disk format (sae-lens 6.x), read and written by our own code (sae-lens itself
cannot be installed beside transformer-lens 4).

A directory with:
- cfg.json: {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
  "normalize_activations", "reshape_activations", "metadata": {"model_name", "hook_name",
  "hook_head_index", "prepend_bos", "context_size", "sae_lens_version", ...}, "k" (topk)}; ours
  adds "headscope": our SAEConfig (SAELens ignores unknown keys).
- sae_weights.safetensors: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
  threshold [d_sae] (jumprelu).
- sparsity.safetensors: {"sparsity": log10 firing frequency per latent [d_sae]} (optional).

Architecture mapping (ours -> SAELens): relu -> standard, topk -> topk, jumprelu -> jumprelu
(threshold = exp(log_threshold)), batchtopk -> jumprelu with its inference threshold (what
SAELens itself saves a trained BatchTopK SAE as). Pre-6.0 configs (hook_point, activation_fn_str,
activation_fn_kwargs.k) are read too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from headscope.kernels.errors import HeadscopeError

from .architectures import SAE, SAEConfig

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
_SAELENS_VERSION = "6.54.12"  # the release whose format this follows (checked by benchmarks/saelens_interop.py)


class SAEFormatError(HeadscopeError, ValueError):
    """A directory that is not a readable SAELens-format SAE."""


def to_saelens(sae: SAE, *, context_size: int = 256, prepend_bos: bool = True,
               dataset_path: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg dict, state dict) of `sae` in SAELens' conventions."""
    c = sae.cfg
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[c.arch]
    state = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if c.arch == "jumprelu":
        state["threshold"] = sae.log_threshold.exp()
    elif c.arch == "batchtopk":
        if float(sae.threshold) < 0:
            # SAELens reads it as a JumpReLU threshold: 0 would turn the SAE into a plain ReLU
            raise SAEFormatError("this BatchTopK SAE has no inference threshold yet (it is estimated during "
                                 "training); train it for at least one step before saving.")
        state["threshold"] = sae.threshold.expand(c.d_sae)
    state = {k: v.detach().float().contiguous().cpu().clone() for k, v in state.items()}
    hook = (f"blocks.{c.layer}.attn.hook_z" if c.site == "z" else f"blocks.{c.layer}.hook_resid_post") if c.layer >= 0 else ""
    cfg = {"architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "hook_z" if c.site == "z" else "none",
           "metadata": {"model_name": c.model, "hook_name": hook, "hook_head_index": None,
                        "prepend_bos": prepend_bos, "context_size": context_size, "dataset_path": dataset_path,
                        "sae_lens_version": _SAELENS_VERSION, "sae_lens_training_version": None},
           "headscope": c.to_dict()}
    if arch == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    return cfg, state


def save_sae(sae: SAE, directory, *, log_sparsity: torch.Tensor | None = None, overwrite: bool = True, **meta) -> Path:
    """Write `sae` as a SAELens directory and return its path. log_sparsity [d_sae]: log10 firing
    frequencies (without it, a sparsity file already in the directory is removed: it described
    another SAE). meta: `to_saelens` options (context_size, prepend_bos, dataset_path)."""
    d = Path(directory)
    if d.exists() and not overwrite and any(d.iterdir()):
        raise SAEFormatError(f"{d} already holds files; refusing to overwrite.")
    d.mkdir(parents=True, exist_ok=True)
    cfg, state = to_saelens(sae, **meta)
    _atomic(d / WEIGHTS_FILENAME, lambda p: save_file(state, str(p)))
    if log_sparsity is not None:
        ls = log_sparsity.detach().float().cpu().contiguous()
        _atomic(d / SPARSITY_FILENAME, lambda p: save_file({"sparsity": ls}, str(p)))
    else:
        (d / SPARSITY_FILENAME).unlink(missing_ok=True)
    _atomic(d / CFG_FILENAME, lambda p: p.write_text(json.dumps(cfg, indent=1)))
    return d


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _read_cfg(d: Path) -> dict:
    try:
        cfg = json.loads((d / CFG_FILENAME).read_text())
    except FileNotFoundError:
        raise SAEFormatError(f"{d} has no {CFG_FILENAME}: not an SAELens-format SAE directory.") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{d / CFG_FILENAME} is not readable JSON: {e}") from None
    if not isinstance(cfg, dict) or "d_in" not in cfg or "d_sae" not in cfg:
        raise SAEFormatError(f"{d / CFG_FILENAME} lacks d_in / d_sae.")
    return cfg


def _our_config(cfg: dict) -> SAEConfig:
    if isinstance(cfg.get("headscope"), dict):
        return SAEConfig.from_dict(cfg["headscope"])
    meta = cfg.get("metadata") or {}
    head_index = meta.get("hook_head_index", cfg.get("hook_head_index"))
    if head_index is not None:
        raise SAEFormatError(f"this SAE reads one head's output (hook_head_index={head_index}); headscope's "
                             "SAEs read every head of a layer (hook_z concatenated), so it cannot be used here.")
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or ""
    arch = cfg.get("architecture", "standard")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    act = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
    if arch == "standard" and act == "topk":
        arch = "topk"
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}.get(arch)
    if ours is None:
        raise SAEFormatError(f"SAELens architecture {arch!r} is not supported (standard, topk, jumprelu, batchtopk).")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise SAEFormatError(f"normalize_activations={cfg['normalize_activations']!r} is not supported; "
                             "only 'none' reproduces the SAE's outputs here.")
    if cfg.get("apply_b_dec_to_input", True) is False:
        raise SAEFormatError("apply_b_dec_to_input=False is not supported.")
    parts = hook.split(".")
    layer = int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else -1
    if hook.endswith("hook_z"):
        site = "z"
    elif hook.endswith("hook_resid_post") or not hook:
        site = "resid"
    else:
        # our "resid" site is resid_post; reading a resid_pre / mlp_out SAE there would feed it the
        # wrong vectors without an error
        raise SAEFormatError(f"hook {hook!r} is not supported: headscope reads SAEs on hook_z (head outputs) "
                             "or hook_resid_post.")
    k = int(cfg.get("k", kwargs.get("k", 32)))
    return SAEConfig(d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), arch=ours, k=min(k, int(cfg["d_sae"])),
                     model=meta.get("model_name") or cfg.get("model_name") or "", layer=layer, site=site)


def load_sae(directory, *, device="cpu") -> SAE:
    """Read an SAELens-format directory (ours or one SAELens saved) into an `SAE`."""
    d = Path(directory)
    cfg = _read_cfg(d)
    sc = _our_config(cfg)
    try:
        w = load_file(str(d / WEIGHTS_FILENAME))
    except FileNotFoundError:
        raise SAEFormatError(f"{d} has no {WEIGHTS_FILENAME}.") from None
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise SAEFormatError(f"{d / WEIGHTS_FILENAME} is corrupted: {e}") from None
    want = {"W_enc": (sc.d_in, sc.d_sae), "b_enc": (sc.d_sae,), "W_dec": (sc.d_sae, sc.d_in), "b_dec": (sc.d_in,)}
    for name, shape in want.items():
        if name not in w or tuple(w[name].shape) != shape:
            got = tuple(w[name].shape) if name in w else "missing"
            raise SAEFormatError(f"{d / WEIGHTS_FILENAME}: {name} is {got}, cfg.json implies {shape}.")
    if not isinstance(cfg.get("headscope"), dict) and cfg.get("finetuning_scaling_factor"):
        raise SAEFormatError("finetuning_scaling_factor=True (activations scaled by a stored factor) is not "
                             "supported.")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm")) and not isinstance(cfg.get("headscope"), dict)
    if rescale and sc.arch != "topk":
        raise SAEFormatError(f"rescale_acts_by_decoder_norm=True is only understood for topk SAEs, not {sc.arch}.")
    sae = SAE(sc)
    with torch.no_grad():
        for name in want:
            getattr(sae, name).copy_(w[name].float())
        if rescale:
            # SAELens: f = TopK(pre * ||W_dec_i||), x_hat = (f / ||W_dec_i||) @ W_dec + b_dec; folding the
            # norms into the weights (its own _fold_norm_topk) gives the same f and x_hat unrescaled
            n = sae.W_dec.norm(dim=1)
            sae.W_enc.mul_(n)
            sae.b_enc.mul_(n)
            sae.W_dec.div_(n[:, None])
        if sc.arch in ("jumprelu", "batchtopk"):
            if "threshold" not in w and "log_threshold" not in w:
                raise SAEFormatError(f"{d / WEIGHTS_FILENAME}: a jumprelu SAE needs `threshold`.")
            th = w["threshold"].float() if "threshold" in w else w["log_threshold"].float().exp()
            if sc.arch == "jumprelu":
                sae.log_threshold.copy_(th.clamp_min(1e-30).log())
            else:
                sae.threshold.copy_(th[0])
    return sae.to(device).eval()


def load_sparsity(directory) -> torch.Tensor | None:
    """log10 firing frequencies [d_sae] from sparsity.safetensors, or None when absent."""
    p = Path(directory) / SPARSITY_FILENAME
    if not p.exists():
        return None
    try:
        return load_file(str(p))["sparsity"]
    except Exception as e:  # safetensors' own error types
        raise SAEFormatError(f"{p} is corrupted: {e}") from None
