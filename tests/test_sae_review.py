"""SAE review: losses, decoder constraints, activation sites and SAELens semantics checked against
independent references (the papers' reference code re-stated here in plain torch)."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from headscope.sae.activations import model_activations
from headscope.sae.architectures import SAE, SAEConfig
from headscope.sae.saelens_format import SAEFormatError, load_sae
from headscope.sae.train import TrainConfig, new_sae, train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_batchtopk_keeps_unit_norm_decoder():
    """Bussmann et al. (like Gao et al. for TopK) hold every decoder row at unit norm and project
    the gradient off the rows; one shared inference threshold is meaningless otherwise."""
    torch.manual_seed(0)
    s = SAE(SAEConfig(d_in=12, d_sae=40, arch="batchtopk", k=3))
    x = torch.randn(64, 12)
    s.train()
    s.loss(x)["loss"].backward()
    g = s.W_dec.grad.clone()
    w = s.W_dec.detach() / s.W_dec.detach().norm(dim=-1, keepdim=True)
    ref = g - (g * w).sum(-1, keepdim=True) * w  # make_decoder_weights_and_grad_unit_norm
    s.remove_parallel_grad()
    torch.testing.assert_close(s.W_dec.grad, ref)
    with torch.no_grad():
        s.W_dec.mul_(torch.rand(40, 1) + 0.5)
    s.normalize_decoder()
    torch.testing.assert_close(s.W_dec.norm(dim=-1), torch.ones(40))


def test_batchtopk_training_ends_with_unit_norm_decoder():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g) * (torch.rand(4096, 1, generator=g) < 0.3) + torch.randn(4096, 16, generator=g) * 0.1
    from headscope.sae.activations import ActivationStore

    st = ActivationStore(d_in=16, shard_tokens=1024)
    st.add(x)
    st.finish()
    cfg = SAEConfig(d_in=16, d_sae=64, arch="batchtopk", k=3, dead_tokens=2048)
    tc = TrainConfig(total_tokens=4096 * 3, batch_size=256, lr=3e-3, b_dec_init="mean")
    sae = train(new_sae(cfg, st, tc), st, tc, progress=False).sae
    torch.testing.assert_close(sae.W_dec.detach().norm(dim=-1), torch.ones(64), rtol=1e-5, atol=1e-5)


def test_resid_site_is_the_block_output_at_every_layer(model):
    """site "resid" is hook_resid_post: the decoder block's output, also at the last layer (where
    HF's last hidden state already has the final norm applied)."""
    ids = model.tokenize(["The cat sat on the mat and looked at the door."], prepend_bos=True)["input_ids"]
    blocks = model.hf.model.layers
    for layer in (3, model.meta.n_layers - 1):
        got = {}
        h = blocks[layer].register_forward_hook(
            lambda m, a, o: got.setdefault("x", (o[0] if isinstance(o, tuple) else o).detach().float()))
        try:
            with torch.no_grad():
                model.hf(input_ids=ids, use_cache=False)
        finally:
            h.remove()
        torch.testing.assert_close(model_activations(model, layer, "resid", ids), got["x"], rtol=1e-4, atol=1e-4)


def _saelens_topk_rescaled(W_enc, b_enc, W_dec, b_dec, k, x):
    """sae_lens TopKSAE with rescale_acts_by_decoder_norm=True: encode scales the pre-activations by
    ||W_dec_i||, TopK + ReLU, decode divides the activations by ||W_dec_i|| again."""
    n = W_dec.norm(dim=-1)
    pre = ((x - b_dec) @ W_enc + b_enc) * n
    v, i = pre.topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v.relu())
    return f, (f / n) @ W_dec + b_dec


def test_saelens_topk_with_decoder_norm_rescaling_means_the_same(tmp_path):
    torch.manual_seed(0)
    d_in, d_sae, k = 16, 32, 4
    w = {"W_enc": torch.randn(d_in, d_sae) * 0.3, "b_enc": torch.randn(d_sae) * 0.1,
         "W_dec": torch.randn(d_sae, d_in) * (torch.rand(d_sae, 1) * 3 + 0.1), "b_dec": torch.randn(d_in) * 0.1}
    d = tmp_path / "rescaled"
    d.mkdir()
    save_file(w, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12"}, "k": k, "rescale_acts_by_decoder_norm": True}))
    x = torch.randn(50, d_in)
    f_ref, x_hat_ref = _saelens_topk_rescaled(w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], k, x)
    sae = load_sae(d)
    with torch.no_grad():
        out = sae(x)
    torch.testing.assert_close(out["f"], f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x_hat"], x_hat_ref, rtol=1e-5, atol=1e-5)


def test_saelens_finetuning_scaling_factor_is_refused(tmp_path):
    """pre-6 SAELens files with finetuning_scaling_factor scale the activations by a stored factor;
    reading them without it would silently give other outputs."""
    d = tmp_path / "ft"
    d.mkdir()
    save_file({"W_enc": torch.randn(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.randn(8, 4), "b_dec": torch.zeros(4),
               "finetuning_scaling_factor": torch.full((8,), 2.0)}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "standard",
                                            "hook_point": "blocks.0.hook_resid_post",
                                            "finetuning_scaling_factor": True}))
    with pytest.raises(SAEFormatError, match="finetuning_scaling_factor"):
        load_sae(d)
