"""Sparse autoencoder architectures (SAELens parameter names and shapes).

Parameters: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]; JumpReLU also
log_threshold [d_sae]; BatchTopK keeps a running inference threshold [] (buffer).
Every architecture computes pre = (x - b_dec) @ W_enc + b_enc and x_hat = f @ W_dec + b_dec; they
differ in f = act(pre) and the sparsity loss:
- relu (Bricken et al. 2023 / SAELens "standard"): f = relu(pre); loss = mse + l1 * sum_i f_i
  (decoder rows held at unit norm, so the L1 cannot be gamed by shrinking f and growing W_dec).
- topk (Gao et al. 2024): f = relu(pre) kept at the k largest entries per token; AuxK revives dead
  latents: the top k_aux pre-activations among dead latents reconstruct the residual e = x - x_hat
  (dead = no activation for dead_tokens). Gao's loss is mse / Var(x) + aux_coeff * ||e - e_hat||^2 /
  ||e - mean(e)||^2 (both terms normalised, openai/sparse_autoencoder train.py); ours keeps the plain
  mse, so the AuxK term is multiplied by the batch's total variance Var(x) = mean ||x - mean(x)||^2:
  loss = Var(x) * Gao's loss, the same gradients up to that scale (without it the AuxK weight
  relative to the reconstruction would depend on the activations' scale: ~1/10 of Gao's on the
  embedded model's z, ~1/12000 on its residual stream).
- batchtopk (Bussmann et al. 2024): the k * B largest relu(pre) over the whole batch; at inference
  a fixed threshold (running mean of the smallest kept activation) replaces the batch top-k.
- jumprelu (Rajamanoharan et al. 2024): f = pre * H(pre - theta), theta = exp(log_threshold);
  loss = mse + l0_coeff * sum_i H(pre_i - theta_i), both through straight-through estimators with
  a rectangle kernel of width `bandwidth`.
mse is the squared error summed over d_in, averaged over tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from headscope.kernels.errors import HeadscopeError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


class SAEConfigError(HeadscopeError, ValueError):
    """An SAE configuration that cannot work (unknown architecture, k > d_sae, ...)."""


@dataclass
class SAEConfig:
    """Shape and architecture of an SAE (module docstring for the architectures).

    d_in: activation size (site z: n_heads * head_dim); d_sae: number of latents; arch: relu, topk,
    batchtopk or jumprelu; k: active latents per token (topk) or per token on average (batchtopk);
    k_aux, aux_coeff, dead_tokens: AuxK (topk, batchtopk; Gao et al.'s 256, 1/32, 10M tokens);
    jumprelu_init_threshold / jumprelu_bandwidth: theta at init and the straight-through kernel
    width. model, layer, site, n_heads, head_dim: where the activations come from (n_heads and
    head_dim are what `head_attribution` splits the decoder by).
    """

    d_in: int
    d_sae: int
    arch: str = "topk"
    k: int = 32
    k_aux: int = 256
    aux_coeff: float = 1 / 32
    dead_tokens: int = 10_000_000
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    # where the activations came from (checked on resume / eval)
    model: str = ""
    layer: int = -1
    site: str = "z"
    n_heads: int = 0
    head_dim: int = 0

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise SAEConfigError(f"unknown architecture {self.arch!r}; use one of {ARCHITECTURES}.")
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEConfigError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}.")
        if self.arch in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise SAEConfigError(f"k={self.k} must lie in 1..d_sae={self.d_sae}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


class _JumpStep(torch.autograd.Function):
    """H(pre - theta) with a pseudo-derivative for theta: -(1/eps) K((pre - theta)/eps), K rectangle."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        k = ((pre - theta).abs() < eps / 2).to(g.dtype) / eps
        return None, (-g * k).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta): gradient to pre where active, pseudo-derivative -(theta/eps) K to theta."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        k = ((pre - theta).abs() < eps / 2).to(g.dtype) / eps
        return g * (pre > theta).to(g.dtype), (-g * theta * k).sum(0), None


def _batch_topk(r: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK's training rule: of r [n, d_sae] (>= 0) keep the k * n largest entries of the batch."""
    flat = r.flatten()
    v, i = flat.topk(min(k * r.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, i, v).view_as(r)


class SAE(nn.Module):
    """A sparse autoencoder; `forward(x [n, d_in])` -> dict(x_hat [n, d_in], f [n, d_sae], pre, ...)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if cfg.arch == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), float(torch.tensor(cfg.jumprelu_init_threshold).log())))
        if cfg.arch == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet
        # tokens since each latent last fired (AuxK's notion of dead)
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Gao et al.: decoder rows random unit vectors, encoder = decoder transposed."""
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ---- forward --------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """f [n, d_sae] from pre-activations, as the architecture defines it (inference rule)."""
        a = self.cfg.arch
        if a == "relu":
            return F.relu(pre)
        if a == "topk":
            r = F.relu(pre)
            v, i = r.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(r).scatter(-1, i, v)
        if a == "batchtopk":
            r = F.relu(pre)
            if self.training or self.threshold < 0:
                return _batch_topk(r, self.cfg.k)
            return r * (r > self.threshold)
        theta = self.log_threshold.exp()
        return _JumpReLU.apply(pre, theta, self.cfg.jumprelu_bandwidth)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations f [n, d_sae] of x [n, d_in] (`activate` of the pre-activations)."""
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat [n, d_in] = f @ W_dec + b_dec of latents f [n, d_sae]."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> dict:
        pre = self.pre_acts(x)
        if self.cfg.arch == "topk":
            # sparse decode: only the k chosen rows of W_dec are read (much cheaper than f @ W_dec)
            v, i = F.relu(pre).topk(self.cfg.k, dim=-1)
            x_hat = F.embedding_bag(i, self.W_dec, per_sample_weights=v, mode="sum") + self.b_dec
            f = torch.zeros_like(pre).scatter(-1, i, v)
        else:
            f = self.activate(pre)
            x_hat = self.decode(f)
        return {"x_hat": x_hat, "f": f, "pre": pre}

    # ---- training losses ------------------------------------------------------------------
    def loss(self, x: torch.Tensor, sparsity_coeff: float = 0.0) -> dict:
        """Total loss and its parts for a batch x [n, d_in]; sparsity_coeff is l1 (relu) or l0
        (jumprelu) after warm-up, unused by topk / batchtopk."""
        out = self(x)
        f, x_hat, pre = out["f"], out["x_hat"], out["pre"]
        mse = (x_hat - x).pow(2).sum(-1).mean()
        parts = {"mse": mse}
        total = mse
        if self.cfg.arch == "relu":
            l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
            parts["sparsity"] = l1
            total = total + sparsity_coeff * l1
        elif self.cfg.arch == "jumprelu":
            l0 = _JumpStep.apply(pre, self.log_threshold.exp(), self.cfg.jumprelu_bandwidth).sum(-1).mean()
            parts["sparsity"] = l0
            total = total + sparsity_coeff * l0
        if self.cfg.arch in ("topk", "batchtopk") and self.training:
            aux = self._aux_loss(x, x_hat, pre)  # Gao's normalised AuxK error (dimensionless)
            parts["aux"] = aux
            var_x = (x - x.mean(0)).pow(2).sum(-1).mean().detach()
            total = total + self.cfg.aux_coeff * var_x * aux
        if self.cfg.arch == "batchtopk" and self.training:
            with torch.no_grad():
                kept = f[f > 0]
                if kept.numel():
                    # A plain mean over the first 100 updates, then the 0.99 moving average: started
                    # from the first batch's minimum, the average kept ~55% of that young SAE's value
                    # after 60 steps (inference L0 2.2 for k = 8). `_threshold_updates` is not saved:
                    # a loaded or resumed SAE (threshold >= 0, no count) goes straight to the average.
                    m = kept.min()
                    n = getattr(self, "_threshold_updates", None)
                    if self.threshold < 0:
                        self.threshold.copy_(m)
                        n = 1
                    else:
                        n = (100 if n is None else n) + 1  # None: loaded or resumed, already averaged
                        rate = max(0.01, 1.0 / n)
                        self.threshold.copy_((1 - rate) * self.threshold + rate * m)
                    self._threshold_updates = n
        with torch.no_grad():
            fired = (f > 0).any(0)
            self.tokens_since_fired.add_(x.shape[0]).masked_fill_(fired, 0)
        parts["l0"] = (f > 0).float().sum(-1).mean().detach()
        parts["loss"] = total
        return {**out, **parts}

    @torch.no_grad()
    def calibrate_threshold(self, batches) -> float:
        """BatchTopK: set the inference threshold from the current weights, as the mean over `batches`
        (each [n, d_in]) of the smallest activation the batch top-k rule keeps; returns it. The running
        estimate kept during training mixes minima of weights that kept changing: on a synthetic
        dictionary (k = 8, held-out rows) it gave inference L0 3.8 after 60 steps and 6.5 after 300;
        calibrated at the end of `train`, 8.0 and 8.1."""
        if self.cfg.arch != "batchtopk":
            raise SAEConfigError(f"calibrate_threshold is for batchtopk SAEs, not {self.cfg.arch!r}.")
        mins = []
        dev = self.W_enc.device
        for x in batches:
            f = _batch_topk(F.relu(self.pre_acts(x.to(dev, self.W_enc.dtype))), self.cfg.k)
            kept = f[f > 0]
            if kept.numel():
                mins.append(kept.min())
        if not mins:
            raise SAEConfigError("calibrate_threshold: no batch had a positive activation to keep.")
        self.threshold.copy_(torch.stack(mins).mean())
        return float(self.threshold)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def _aux_loss(self, x, x_hat, pre) -> torch.Tensor:
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        e = (x - x_hat).detach()
        k_aux = min(self.cfg.k_aux, n_dead)
        masked = torch.where(dead, F.relu(pre), torch.zeros_like(pre))
        v, i = masked.topk(k_aux, dim=-1)
        e_hat = F.embedding_bag(i, self.W_dec, per_sample_weights=v, mode="sum")
        return (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)

    # ---- decoder norm constraint -----------------------------------------------------------
    # unit-norm decoder rows: Anthropic / SAELens standard (relu), Gao et al. (topk), Bussmann et al.
    # (batchtopk: one threshold shared by every latent only means something when f_i is measured in
    # the same units, ||W_dec_i|| = 1). JumpReLU's L0 penalty is scale-free: left unconstrained.
    _UNIT_NORM_DECODER = ("relu", "topk", "batchtopk")

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each decoder row (keeps ||W_dec_i|| = 1 to first order)."""
        if self.cfg.arch in self._UNIT_NORM_DECODER and self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.cfg.arch in self._UNIT_NORM_DECODER:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
