"""Memory injection: equals an o_proj bias of tau * m, raises the answer's probability, positions,
hooks removed, bad input."""

import copy

import pytest
import torch

from headscope.circuits.memory_injection import answer_probs, inject_memory, injection_sweep, memory_vector, sweep_heatmap
from headscope.kernels.stats import StatsRequest
from headscope.probe.errors import HeadIndexError, InputError

PROMPT = "My favourite city to visit in Europe is"


def test_memory_vector_is_summed_embeddings(model):
    ids = model.tokenizer(" Eiffel Tower", add_special_tokens=False)["input_ids"]
    E = model.hf.get_input_embeddings().weight
    torch.testing.assert_close(memory_vector(model, " Eiffel Tower"), E[ids].sum(0))


def test_memory_vector_includes_the_embedding_scale():
    """Gemma scales its input embeddings by sqrt(d_model) in the embedding's forward: m is the sum of
    what the first layer sees (tiny random Gemma2, d_model 64: scale 8), not of the weight rows."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from headscope.probe import load_model
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32)).eval()

    class Tok:  # the three token ids the memory is made of
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [5, 17, 42]}

    m = load_model(hf, tokenizer=Tok())
    rows = hf.get_input_embeddings().weight[[5, 17, 42]].sum(0)
    torch.testing.assert_close(memory_vector(m, "any words"), rows * 64 ** 0.5, rtol=1e-2, atol=1e-4)


def test_injection_equals_o_proj_bias(model):
    layer, tau = 5, 3.0
    batch = model.tokenize([PROMPT], prepend_bos=True)
    ref = copy.deepcopy(model.hf)
    o = ref.model.layers[layer].self_attn.o_proj
    o.bias = torch.nn.Parameter(tau * memory_vector(model, " Paris"))
    with torch.no_grad():
        want = ref(**batch).logits
        before = model.hf(**batch).logits
        # transformers may own hooks of its own here (output capturing): compare, do not demand none
        hooks_before = dict(model.attention_modules[layer]._forward_hooks)
        with inject_memory(model, " Paris", layer, tau):
            got = model.hf(**batch).logits
        after = model.hf(**batch).logits
    # bias inside the matmul vs added after it: float32 rounding, amplified over 25 layers (seen 3e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - before).abs().max() > 1e-2
    assert torch.equal(before, after)
    assert dict(model.attention_modules[layer]._forward_hooks) == hooks_before


def test_injecting_the_answer_raises_its_probability(model):
    base = answer_probs(model, [PROMPT], [" Paris"])
    with inject_memory(model, " Paris", 6, 4.0):
        up = answer_probs(model, [PROMPT], [" Paris"])
    assert up > 1.15 * base  # measured: 0.111 -> 0.140


def test_positions_mask_and_recording(model):
    batch = model.tokenize([PROMPT], prepend_bos=True)
    S = batch["input_ids"].shape[1]
    last = torch.zeros(S, dtype=torch.bool)
    last[-1] = True
    with torch.no_grad():
        base = model.hf(**batch).logits
        with inject_memory(model, " Paris", 4, 5.0, positions=last):
            _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], StatsRequest(entropy=True))
            out = model.hf(**batch).logits
    torch.testing.assert_close(out[0, :-1], base[0, :-1], atol=1e-6, rtol=0)  # causal: earlier positions untouched
    assert (out[0, -1] - base[0, -1]).abs().max() > 1e-2
    assert rec.stats["entropy"].shape[:2] == (1, model.meta.n_layers)


def test_sweep_table_and_heatmap(model):
    items = [{"question": PROMPT, "memory": " Paris", "answer": " Paris"},
             {"question": "The largest planet in our solar system is", "memory": " Jupiter", "answer": " Jupiter"}]
    df = injection_sweep(model, items, layers=[6], taus=[4])
    base = answer_probs(model, [it["question"] for it in items], [it["answer"] for it in items])
    with inject_memory(model, [it["memory"] for it in items], 6, 4):
        after = answer_probs(model, [it["question"] for it in items], [it["answer"] for it in items])
    rel = sorted(((after - base) / base).tolist())
    assert df.median_rel_change[0] == pytest.approx((rel[0] + rel[1]) / 2, rel=1e-4)  # two items: their mean
    assert sweep_heatmap(df).data[0].z.shape == (1, 1)


def test_bad_input(model):
    with pytest.raises(InputError, match="empty memory"):
        with inject_memory(model, "", 3, 1.0):
            pass
    with pytest.raises(InputError, match="empty memory"):
        with inject_memory(model, "   ", 3, 1.0):
            pass
    with pytest.raises(InputError, match="finite"):
        with inject_memory(model, "Paris", 3, float("nan")):
            pass
    with pytest.raises(HeadIndexError):
        with inject_memory(model, "Paris", model.meta.n_layers, 1.0):
            pass
    with pytest.raises(InputError, match="d_model"):
        with model.add_to_attention_output(0, torch.zeros(7)):
            pass
    with pytest.raises(InputError, match="NaN"):
        with model.add_to_attention_output(0, torch.full((model.meta.d_model,), float("nan"))):
            pass
    with pytest.raises(InputError, match="at least two items"):  # a control with one item is the treatment
        injection_sweep(model, [{"question": PROMPT, "memory": " Paris", "answer": " Paris"}], layers=[6], taus=[4],
                        control=True)


def test_injection_on_an_encoder_lands_after_its_output_projection():
    """BERT keeps the attention output projection beside its self-attention module (attention.output
    .dense): the vector is added after that projection, as on decoders, not before it (it was: the
    model then saw W_O v)."""
    import transformers

    from headscope.probe import load_model
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, intermediate_size=128)).eval()
    m = load_model(hf)
    ids = torch.randint(1, 60, (1, 8))
    v = torch.randn(64)
    dense = hf.encoder.layer[0].attention.output.dense
    with torch.no_grad():
        with m.add_to_attention_output(0, v):
            injected = hf(input_ids=ids).last_hidden_state
        h = dense.register_forward_hook(lambda mod, a, out: out + v)
        expected = hf(input_ids=ids).last_hidden_state
        h.remove()
        plain = hf(input_ids=ids).last_hidden_state
    torch.testing.assert_close(injected, expected)
    assert (injected - plain).abs().max() > 0.1
