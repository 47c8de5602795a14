"""Head importance (gradient vs finite difference), iterative pruning, physical pruning (logits equal
the masked model's, saved checkpoint reloads with plain transformers)."""

import copy

import pytest
import torch

from headscope.circuits.ablation import ablate_heads
from headscope.circuits.importance import _token_losses, head_importance, iterative_pruning, pruning_figure
from headscope.circuits.pruning import PruningError, load_pruned, n_attention_params, prune, save_pruned
from headscope.probe import LayerEdit
from headscope.probe.errors import HeadIndexError

TEXT = ["The quick brown fox jumps over the lazy dog near the river bank."]
# layer 0 loses a whole kv group (heads 0-2) and one more head; layer 2 keeps one head per group (G 3 -> 1)
HEADS = [(0, 0), (0, 1), (0, 2), (0, 4), (2, 0), (2, 1), (2, 3), (2, 4), (2, 6), (2, 7), (7, 8)]


@pytest.fixture(scope="module")
def model64():
    """A float64 copy: pruned and masked models multiply matrices of different shapes, so in float32
    their logits differ by summation-order rounding (~1e-4 after 30 layers); in float64 exactness
    can be asserted at 1e-5 and any real discrepancy (a wrong column, a missing head) is orders larger."""
    from headscope.probe import load_model

    return load_model(dtype=torch.float64)


@pytest.fixture(scope="module")
def pruned(model64):
    return prune(model64, HEADS)


def _with_impl(hf, impl, batch):
    old = hf.config._attn_implementation
    hf.set_attn_implementation(impl)
    try:
        with torch.no_grad():
            return hf(**batch, use_cache=False).logits
    finally:
        hf.set_attn_implementation(old)


def test_pruned_logits_equal_masked(model64, pruned):
    model = model64
    batch = model.tokenize(TEXT, prepend_bos=True)
    with torch.no_grad():
        before = model.hf(**batch).logits
        with ablate_heads(model, HEADS):  # exact torch attention path, heads zeroed
            masked = model.hf(**batch).logits
    torch.testing.assert_close(_with_impl(pruned.hf, "headscope", batch), masked, atol=1e-5, rtol=0)
    # independent reference through SDPA: the original weights with the heads' o_proj columns zeroed
    ref = copy.deepcopy(model.hf)
    D = model.meta.head_dim
    with torch.no_grad():
        for l, h in HEADS:
            ref.model.layers[l].self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
        sdpa_ref = ref(**batch).logits
    torch.testing.assert_close(_with_impl(pruned.hf, "sdpa", batch), sdpa_ref, atol=1e-5, rtol=0)
    assert not torch.allclose(masked, before, atol=1e-3)  # the heads mattered
    with torch.no_grad():
        assert torch.equal(model.hf(**batch).logits, before)  # original untouched


def test_pruned_shapes(model, pruned):
    D = model.meta.head_dim
    a0, a2, a7, a5 = (pruned.hf.model.layers[i].self_attn for i in (0, 2, 7, 5))
    assert a0.k_proj.out_features == 2 * D and a0.q_proj.out_features == 2 * 3 * D  # groups {3,5} x G 3 (one pad)
    assert a2.q_proj.out_features == 3 * D and a2.k_proj.out_features == 3 * D and a2.num_key_value_groups == 1
    assert a7.q_proj.out_features == 9 * D  # group of 2 padded to 3: no gain, kept exact
    assert a5.q_proj.out_features == 9 * D
    assert n_attention_params(pruned) < n_attention_params(model)
    assert model.hf.model.layers[0].self_attn.q_proj.out_features == 9 * D


def test_save_reload_plain_transformers(model64, pruned, tmp_path):
    model = model64
    from transformers import AutoModelForCausalLM

    batch = model.tokenize(TEXT, prepend_bos=True)
    ref = _with_impl(pruned.hf, "sdpa", batch)
    save_pruned(pruned, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert type(plain).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ref, atol=1e-5, rtol=0)
    compact = load_pruned(tmp_path, dtype=torch.float64)
    assert n_attention_params(compact) == n_attention_params(pruned)
    torch.testing.assert_close(_with_impl(compact.hf, "sdpa", batch), ref, atol=1e-5, rtol=0)


def test_importance_is_the_gate_gradient(model):
    batch = model.tokenize(TEXT, prepend_bos=True)
    flags = [p.requires_grad for p in model.hf.parameters()]
    imp = head_importance(model, [batch], normalize=False)
    assert [p.requires_grad for p in model.hf.parameters()] == flags
    l, h, eps = 3, 2, 1e-2

    def loss(scale):
        def z_fn(z, layer):
            z = z.clone()
            z[:, h] *= scale
            return z
        with torch.no_grad(), model.edit_attention({l: LayerEdit(z_fn=z_fn)}):
            return float(_token_losses(model.hf(**batch).logits, batch["input_ids"], batch["attention_mask"])[0])

    fd = abs(loss(1 + eps) - loss(1 - eps)) / (2 * eps)
    assert imp[l, h] == pytest.approx(fd, rel=2e-2, abs=1e-4)
    normed = imp / imp.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head_importance(model, [batch]), normed, atol=1e-5, rtol=1e-4)


def test_iterative_pruning_curve(model):
    batch = model.tokenize(TEXT, prepend_bos=True)
    calls = []

    def metric(m, pruned):
        calls.append(list(pruned))
        return float(len(pruned))

    curve = iterative_pruning(model, [batch], step=0.02, max_fraction=0.04, metric=metric)
    assert list(curve.n_pruned) == [0, 5, 10]
    assert calls[-1] == curve.iloc[-1].heads and len(set(map(tuple, curve.iloc[-1].heads))) == 10
    assert pruning_figure(curve).data[0].y.tolist() == [0.0, 5.0, 10.0]


def test_never_prunes_a_whole_layer(model):
    H = model.meta.n_heads
    with pytest.raises(PruningError, match="every head of layers \\[4\\]"):
        prune(model, [(4, h) for h in range(H)])
    with pytest.raises(HeadIndexError):
        prune(model, [(0, H)])
    with pytest.raises(HeadIndexError):
        prune(model, [(model.meta.n_layers, 0)])


def test_prune_inside_an_injection_block_leaves_the_injection_behind(model):
    """prune() deep-copies the model: a copy made inside inject_memory used to keep the injection hook
    forever (in memory only: save_pruned dropped it). The copied hook is now a no-op."""
    from headscope.circuits.memory_injection import inject_memory
    ids = model.tokenize(["The capital of France is"], prepend_bos=True)["input_ids"]
    heads = [(3, 1), (7, 4)]
    outside = prune(model, heads)
    with inject_memory(model, " Germany", layer=5, tau=8):
        inside = prune(model, heads)
        with torch.no_grad():
            injected = model.hf(input_ids=ids).logits
    with torch.no_grad():
        a, b = outside.hf(input_ids=ids).logits, inside.hf(input_ids=ids).logits
        plain = model.hf(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-5
    assert (injected - plain).abs().max() > 1.0  # the injection did act on the original inside the block
