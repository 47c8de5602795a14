"""`attention()`: one entry point, Triton on CUDA, the exact chunked torch path on CPU."""

from __future__ import annotations

from dataclasses import replace

import torch

from .edits import KeyBias, KeyScale, validate_edits
from .errors import BackwardNotSupportedError, KernelInputError
from .reference import attention_reference
from .stats import StatsRequest

BACKENDS = ("auto", "triton", "torch")


# int32 range minus the two lowest values, which the kernels use as "no token" markers
TOKEN_ID_MIN, TOKEN_ID_MAX = -(2**31) + 2, 2**31 - 1


def uses_triton(backend: str, q, k, v) -> bool:
    """The path `attention` takes: Triton for backend='triton', and for 'auto' on CUDA unless
    gradients are asked for (the kernel has no backward; the chunked torch path is differentiable
    and gives the same numbers). An explicit backend='triton' with gradients raises instead."""
    if backend == "triton":
        return True
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return backend == "auto" and q.is_cuda and not needs_grad


def _check_window(window) -> None:
    if window is not None and (isinstance(window, bool) or not hasattr(type(window), "__index__") or window < 1):
        # an integer: the two paths would read 2.5 as i - j < 2.5 (torch) and < 2 (Triton)
        raise KernelInputError(f"window must be an integer >= 1 or None, got {window!r}.")


def _validate_key_start(key_start, causal, window, Sq: int, Sk: int) -> int:
    """key_start as an int; refused unless every dropped key lies outside every query's window."""
    if isinstance(key_start, bool) or not hasattr(type(key_start), "__index__") or key_start < 0:
        raise KernelInputError(f"key_start must be an integer >= 0, got {key_start!r}.")
    key_start = int(key_start)
    if key_start == 0:
        return 0
    _check_window(window)  # before the arithmetic below
    if not causal or window is None:
        raise KernelInputError("key_start > 0 (keys dropped from the front, as a sliding-window cache does) "
                               "needs causal attention with a window: otherwise the queries still see the "
                               "dropped keys. Pass the whole sequence's keys instead.")
    if Sq <= Sk and Sk - Sq < window - 1:
        # the first query sits at key_start + Sk - Sq and sees window keys back to key_start + Sk - Sq - window + 1
        raise KernelInputError(f"{key_start} keys were dropped but the first query still sees {window - 1 - (Sk - Sq)} "
                               f"of them (window {window}, {Sk} keys kept for {Sq} queries); pass them too.")
    return key_start


def _validate(q, k, v, key_valid, token_ids, keyset, request, window, pattern_heads, softcap=None, key_start=0):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelInputError("q, k, v must be 4-D: q [B, H, Sq, D], k and v [B, Hkv, Sk, D].")
    B, H, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    S = key_start + Sk  # per-key inputs cover the whole sequence
    if Bk != B or v.shape[:3] != k.shape[:3] or Dk != D:
        raise KernelInputError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if B == 0:
        raise KernelInputError("empty batch: q has no sequences.")
    if Hkv == 0 or H % Hkv:
        raise KernelInputError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv}) for GQA.")
    if Sq > Sk:
        raise KernelInputError(f"more queries ({Sq}) than keys ({Sk}): queries are the last Sq key positions.")
    if Sq == 0:
        raise KernelInputError("empty input: the sequence has no tokens.")
    _check_window(window)
    if softcap is not None and not softcap > 0:
        raise KernelInputError(f"softcap must be > 0 or None, got {softcap!r}.")
    for name, t, dtype in (("key_valid", key_valid, torch.bool), ("keyset", keyset, torch.bool)):
        if t is not None and (t.shape != (B, S) or t.dtype != dtype):
            raise KernelInputError(f"{name} must be a {dtype} tensor of shape [B, Sk] = [{B}, {S}], "
                                   f"got {tuple(t.shape)} {t.dtype}.")
    if token_ids is not None:
        if token_ids.shape != (B, S):
            raise KernelInputError(f"token_ids must have shape [B, Sk] = [{B}, {S}], got {tuple(token_ids.shape)}.")
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise KernelInputError(f"token_ids must be an integer tensor, got {token_ids.dtype}.")
        # The Triton path compares int32 ids and keeps the two lowest values as "no token" markers.
        # Checked on the CPU only: on a GPU reading min / max back would stall every layer's call,
        # and vocabularies are far below 2**31.
        if (token_ids.numel() and not token_ids.is_cuda
                and (int(token_ids.min()) < TOKEN_ID_MIN or int(token_ids.max()) > TOKEN_ID_MAX)):
            raise KernelInputError(f"token ids must lie in [{TOKEN_ID_MIN}, {TOKEN_ID_MAX}], got "
                                   f"[{int(token_ids.min())}, {int(token_ids.max())}].")
    if request.needs_tokens and token_ids is None:
        raise KernelInputError("match/next_match statistics compare token ids: pass token_ids [B, Sk].")
    if request.keyset and keyset is None:
        raise KernelInputError("keyset_mass was requested: pass keyset, a bool key mask [B, Sk].")
    if pattern_heads is not None and any(h < 0 or h >= H for h in pattern_heads):
        raise KernelInputError(f"pattern_heads {list(pattern_heads)} out of range 0..{H - 1}.")


def _at_sequence_positions(k: torch.Tensor, v: torch.Tensor, key_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v with key_start zero keys in front (an O(S) copy, made only for the torch computations).
    The dropped keys are outside every query's window, so zeros in their place change nothing."""
    if not key_start:
        return k, v
    return tuple(torch.cat([t.new_zeros(*t.shape[:2], key_start, t.shape[3]), t], 2) for t in (k, v))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    attention_mask: torch.Tensor | None = None,
    token_ids: torch.Tensor | None = None,
    keyset: torch.Tensor | None = None,
    stats: StatsRequest | None = None,
    head_mask: torch.Tensor | None = None,
    head_mask_mode: str = "zero",
    key_scale: KeyScale | None = None,
    key_bias: KeyBias | None = None,
    pattern_heads: list[int] | None = None,
    backend: str = "auto",
    key_start: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Attention output plus per-head statistics, never materialising the full [Sq, Sk] matrix.

    Args:
        q: [B, H, Sq, D] queries; the Sq queries are the last Sq of the Sk key positions.
        k, v: [B, Hkv, Sk, D] keys/values; H must be a multiple of Hkv (GQA, no copy). v may have
            its own head_dim Dv (MLA models) on the torch path; out is then [B, H, Sq, Dv].
        causal: mask keys after the query; False for encoders.
        sm_scale: score scale, default 1/sqrt(D).
        window: sliding window W: query i sees keys j with i - j < W (|i - j| < W if not causal).
        softcap: Gemma-2 style logit soft-capping, s -> softcap * tanh(s / softcap).
        attention_mask: [B, Sk] bool, True for real tokens (left or right padding).
        token_ids: [B, Sk] token ids, needed for match / next_match statistics.
        keyset: [B, Sk] bool key set for keyset_mass.
        stats: which statistics to compute (`StatsRequest`); None computes none.
        head_mask: [H] bool heads to ablate; head_mask_mode "zero" or "uniform".
        key_scale: ACT calibration (`KeyScale`); key_bias: logit bias (`KeyBias`).
        pattern_heads: heads whose full probability rows to return as stats["pattern"]
            [B, n, Sq, Sk] (O(S^2): only for short inputs; the caller checks memory).
        backend: "auto" (Triton on CUDA, torch on CPU and wherever gradients are needed), "triton" or "torch".
        key_start: sequence position of k[:, :, 0], for a sliding-window cache that dropped the
            first key_start keys (causal with a window only; refused unless every dropped key lies
            outside every query's window). Per-key inputs (attention_mask, token_ids, keyset,
            key_scale.keys, key_bias.keys) and per-key outputs (argmax, colsum, pattern) then span
            the whole sequence, key_start + Sk positions. The Triton path reads only the Sk keys
            given; the torch path places them after key_start zero keys.

    Returns:
        out [B, H, Sq, D] in q's dtype; dict of float32 statistics (see `headscope.kernels.stats`).
    """
    request = stats or StatsRequest()
    if q.dim() == 4 and k.dim() == 4:
        key_start = _validate_key_start(key_start, causal, window, q.shape[2], k.shape[2])
    _validate(q, k, v, attention_mask, token_ids, keyset, request, window, pattern_heads, softcap, key_start)
    validate_edits(q.shape[1], q.shape[0], key_start + k.shape[2], head_mask, head_mask_mode, key_scale, key_bias)
    if backend not in BACKENDS:
        raise KernelInputError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if not uses_triton(backend, q, k, v):
        k, v = _at_sequence_positions(k, v, key_start)
        return attention_reference(
            q, k, v, causal=causal, sm_scale=sm_scale, window=window, softcap=softcap,
            key_valid=attention_mask, token_ids=token_ids, keyset=keyset, request=request,
            head_mask=head_mask, head_mask_mode=head_mask_mode, key_scale=key_scale,
            key_bias=key_bias, pattern_heads=pattern_heads)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise BackwardNotSupportedError(
            "the fused Triton attention kernel has no backward pass. For gradients (head importance, "
            "attribution patching) run the model with attn_implementation='sdpa' or 'eager', or call "
            "headscope.kernels.attention(..., backend='torch'), whose chunked path is differentiable.")
    if v.shape[-1] != q.shape[-1]:
        raise KernelInputError(f"the Triton kernel needs v's head_dim equal to q's ({q.shape[-1]}), got "
                               f"{v.shape[-1]} (e.g. MLA models): call with backend='torch'.")
    if not triton_available():
        raise KernelInputError("backend 'triton' needs the triton package (pip install triton).")
    from .triton_attention import attention_triton

    out, result = attention_triton(
        q, k, v, causal=causal, sm_scale=sm_scale, window=window, softcap=softcap,
        key_valid=attention_mask, token_ids=token_ids, keyset=keyset, request=replace(request, content=False),
        head_mask=head_mask, head_mask_mode=head_mask_mode, key_scale=key_scale, key_bias=key_bias,
        key_start=key_start)
    if request.content or pattern_heads:
        k, v = _at_sequence_positions(k, v, key_start)  # the torch computations below read every position
    if request.content:
        # Not in the fused kernel yet: the exact torch path computes it (same numbers, a second
        # attention pass in O(S x chunk) memory), as for patterns below.
        _, extra = attention_reference(
            q, k, v, causal=causal, sm_scale=sm_scale, window=window, softcap=softcap, key_valid=attention_mask,
            request=StatsRequest(sink_k=request.sink_k, content=True), head_mask=head_mask,
            head_mask_mode=head_mask_mode, key_scale=key_scale, key_bias=key_bias)
        result["content_mass"] = extra["content_mass"]
        result = {name: result[name] for name in request.names()}
    if pattern_heads:
        # Patterns are O(S^2) by nature: computed by the exact torch path for the asked heads only.
        kv_of = [h // (q.shape[1] // k.shape[1]) for h in pattern_heads]
        _, pat = attention_reference(
            q[:, pattern_heads], k[:, kv_of], v[:, kv_of],
            causal=causal, sm_scale=sm_scale, window=window, softcap=softcap, key_valid=attention_mask,
            head_mask=head_mask[pattern_heads] if head_mask is not None else None,
            head_mask_mode=head_mask_mode,
            key_scale=KeyScale(key_scale.beta[pattern_heads],
                               key_scale.keys[:, pattern_heads] if key_scale.keys.dim() == 3 else key_scale.keys)
            if key_scale is not None else None,
            key_bias=KeyBias(key_bias.bias[pattern_heads], key_bias.keys) if key_bias is not None else None,
            pattern_heads=list(range(len(pattern_heads))))
        result["pattern"] = pat["pattern"]
    return out, result
