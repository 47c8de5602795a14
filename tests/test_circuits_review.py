"""Review regressions for circuits: pruning of attention layouts beyond plain Llama (per-head sinks,
q/k norms over several heads), re-pruning, ACT choice read-outs, token_loss targets.

References are independent of headscope: a deep copy of the model with the pruned heads' o_proj
columns zeroed by hand, run by transformers."""

import copy

import pytest
import torch
import transformers as T

from headscope.circuits.pruning import PruningError, load_pruned, prune, save_pruned
from headscope.circuits import ablate_heads
from headscope.probe import HeadscopeModel
from headscope.probe.errors import InputError

D = 8


def _tiny(name, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    cfg = getattr(T, name + "Config")(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=D,
                                      hidden_size=64, intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    hf = getattr(T, name + "ForCausalLM")(cfg).to(dtype).eval()
    with torch.no_grad():  # give the norms and sinks per-head structure that matters
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1, 0.5)
            if n.endswith("sinks"):
                p.normal_(0, 2)
    return HeadscopeModel(hf)


def _zeroed_reference(hf, heads):
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for l, h in heads:
            ref.model.layers[l].self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
    return ref


IDS = torch.tensor([[1, 17, 42, 5, 63, 8, 99, 23, 41, 7, 3, 55]])


def test_prune_gpt_oss_sinks_follow_their_heads(tmp_path):
    # gpt-oss gives every query head a learned sink logit (self_attn.sinks [H]); pruning one head of a
    # group keeps 8 slots per layer, so the sinks must move with the heads they belong to.
    model = _tiny("GptOss", num_local_experts=2, num_experts_per_tok=1)
    heads = [(0, 1), (1, 5), (1, 0), (1, 1), (1, 2), (1, 3)]  # layer 1 also loses a whole kv group
    ref = _zeroed_reference(model.hf, heads)
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        assert (model.hf(input_ids=IDS).logits - want).abs().max() > 1e-3  # the heads matter
        pruned = prune(model, heads)
        torch.testing.assert_close(pruned.hf(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
    save_pruned(pruned, tmp_path)
    plain = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    compact = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(compact.hf(input_ids=IDS).logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,extra,param", [("Olmo2", {}, "q_norm"), ("Cohere", {"use_qk_norm": True}, "q_norm"),
                                              ("StableLm", {"qk_layernorm": True}, "q_layernorm")])
def test_prune_refuses_norms_over_heads(name, extra, param):
    # These q/k norms mix heads (one RMSNorm over all heads' q) or hold one weight per head: slicing
    # q rows alone gave silently different logits (or a shape error at the first forward).
    model = _tiny(name, **extra)
    with pytest.raises(PruningError, match=param):
        prune(model, [(0, 1), (1, 5)])


def test_prune_refuses_attention_with_fixed_head_counts():
    # StableLM's attention reshapes with self.num_heads: the pruned model crashed at its first forward
    with pytest.raises(PruningError, match="StableLmAttention"):
        prune(_tiny("StableLm"), [(0, 0), (0, 1), (0, 2), (0, 3)])


def test_prune_of_a_pruned_model_is_refused_clearly():
    model = _tiny("Llama")
    once = prune(model, [(0, 1)])
    with pytest.raises(PruningError, match="already pruned"):
        prune(once, [(0, 2)])
    # recording and edits were AttributeErrors on the pruned model
    with pytest.raises(InputError, match="pruned"):
        with once.record():
            pass
    with pytest.raises(InputError, match="pruned"):
        with ablate_heads(once, [(1, 0)]):
            pass


def test_act_choices_must_differ_in_their_first_token(model):
    # ACT scores a choice by its first token: " New York" and " New Delhi" both start with " New", so
    # their log-probabilities tie and argmax silently picked choice 0 (accuracy 0.0 here, 1.0 with label 0).
    from headscope.circuits.calibration import CalibrationError, accuracy, choice_logprobs

    items = [{"prompt": "The capital of India is", "choices": [" New York", " New Delhi"], "label": 1}]
    lp = None
    with pytest.raises(CalibrationError, match="first token"):
        lp = choice_logprobs(model, items)
    assert lp is None
    with pytest.raises(CalibrationError, match="label"):
        accuracy(model, [{"prompt": "The opposite of hot is", "choices": [" cold", " warm"], "label": 2}])


def test_token_loss_targets_must_be_a_bool_mask(model):
    # an int 0/1 mask indexed the losses by position (entries 0 and 1), a silently wrong mean
    import torch.nn.functional as F

    from headscope.circuits.runs import token_loss
    from headscope.probe.errors import InputError

    tokens = model.tokenize(["The quick brown fox jumps over the lazy dog."], prepend_bos=True)["input_ids"]
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 5:] = True
    with torch.no_grad():
        logits = model.hf(input_ids=tokens).logits
    ce = F.cross_entropy(logits[0, :-1].float(), tokens[0, 1:], reduction="none")
    assert token_loss(model, tokens, mask, 4) == pytest.approx(float(ce[4:].mean()), rel=1e-5)
    with pytest.raises(InputError, match="bool"):
        token_loss(model, tokens, mask.long(), 4)


