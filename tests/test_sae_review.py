"""SAE review: losses, decoder constraints, activation sites and SAELens semantics checked against
independent references (the papers' reference code re-stated here in plain torch)."""

import pytest
import torch
import torch.nn.functional as F

from headscope.sae.architectures import SAE, SAEConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gao_loss(sae, x, dead):
    """openai/sparse_autoencoder train.py: mse_scale * mse(recons, x) + auxk_coef * normalized_mse(
    decode_sparse(auxk), x - recons.detach() + pre_bias), mse = elementwise mean, mse_scale =
    1 / elementwise variance of the activations, normalized_mse = mse / mse(target mean, target)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(sae.cfg.k, dim=-1)
    recons = torch.zeros_like(pre).scatter(-1, i, v.relu()) @ sae.W_dec + sae.b_dec
    mse_scale = 1 / (x.mean(0) - x).pow(2).mean()
    masked = pre * dead  # auxk_mask_fn: x.data *= dead_mask
    av, ai = masked.topk(sae.cfg.k_aux, dim=-1)
    aux_recons = torch.zeros_like(pre).scatter(-1, ai, av.relu()) @ sae.W_dec + sae.b_dec
    target = x - recons.detach() + sae.b_dec.detach()
    nmse = F.mse_loss(aux_recons, target) / F.mse_loss(target.mean(0).expand_as(target), target)
    return mse_scale * F.mse_loss(recons, x) + sae.cfg.aux_coeff * nmse


def test_topk_auxk_weight_relative_to_reconstruction_is_gaos():
    """Gao et al. weigh the AuxK term 1/32 against the *normalised* reconstruction loss; our loss
    keeps the unnormalised mse, so it must equal Gao's loss times the batch's total variance (same
    gradients up to that scale), whatever the activations' scale."""
    torch.manual_seed(0)
    d_in, d_sae = 12, 48
    s = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, arch="topk", k=4, k_aux=6, dead_tokens=1))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::2] = True
    s.tokens_since_fired.copy_(dead.long() * 10)
    x = 5.0 * torch.randn(256, d_in) + 1.0  # total variance per token ~ 300, far from 1
    s.train()
    out = s.loss(x)
    var_total = (x - x.mean(0)).pow(2).sum(-1).mean()
    ref = _gao_loss(s, x, dead)
    torch.testing.assert_close(out["loss"], var_total * ref, rtol=1e-4, atol=1e-5)
    # gradients: ours = var_total * Gao's
    ours = torch.autograd.grad(out["loss"], [s.W_enc, s.W_dec, s.b_enc])
    theirs = torch.autograd.grad(var_total * _gao_loss(s, x, dead), [s.W_enc, s.W_dec, s.b_enc])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
