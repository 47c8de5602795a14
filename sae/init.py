"""Initialisation of the decoder bias b_dec (Gao et al.'s b_pre): geometric median or mean."""

from __future__ import annotations

import torch


def geometric_median(x: torch.Tensor, *, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """argmin_m sum_i ||x_i - m|| of x [n, d] by Weiszfeld's iteration (float64 inside) -> [d]."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() <= tol * new.norm().clamp_min(1e-12)
        m = new
        if done:
            break
    return m.float()


@torch.no_grad()
def init_b_dec(sae, sample: torch.Tensor, method: str = "geometric_median") -> None:
    """Set sae.b_dec from a sample of activations [n, d_in]; method "geometric_median", "mean" or "zeros"."""
    if method == "geometric_median":
        sae.b_dec.copy_(geometric_median(sample))
    elif method == "mean":
        sae.b_dec.copy_(sample.float().mean(0))
    elif method == "zeros":
        sae.b_dec.zero_()
    else:
        from .architectures import SAEConfigError

        raise SAEConfigError(f"unknown b_dec init {method!r}; use geometric_median, mean or zeros.")
