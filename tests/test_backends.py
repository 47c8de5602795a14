"""Native, TransformerLens and nnsight backends give the same Recording on the embedded model."""

import dataclasses

import pytest
import torch

from headscope.probe import InputError, StatsRequest, load_model
from headscope.probe.loading import embedded_cache_dir

# left padding: the second prompt's padded query rows and keys are part of the comparison
TEXT = ["The cat sat on the mat. The cat sat on the mat and looked at the dog", "Hello there, dog"]
REQUEST = StatsRequest.all(topk=2, sink_k=2, offsets=(1, 3))


@pytest.fixture(scope="module")
def native(model):
    batch = model.tokenize(TEXT, prepend_bos=True, padding_side="left")
    assert not batch["attention_mask"].all()
    _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], REQUEST, patterns=True, head_out=[0, 7])
    return batch, rec


@pytest.fixture(scope="module")
def bridge():
    from transformer_lens.model_bridge import TransformerBridge

    # boot_transformers(hf_model=...) swaps the model's submodules for bridge components in place,
    # so the bridge gets its own copy rather than the session model.
    own = load_model()
    return TransformerBridge.boot_transformers(str(embedded_cache_dir()), hf_model=own.hf, tokenizer=own.tokenizer)


def _assert_same(rec, ref, skip=()):
    assert rec.patterns.shape == ref.patterns.shape
    assert (rec.patterns - ref.patterns).abs().max() < 1e-4
    assert torch.equal(rec.tokens, ref.tokens) and torch.equal(rec.attention_mask, ref.attention_mask)
    names = [n for n in ref.stats if n not in skip]
    assert sorted(rec.stats) == sorted(names)
    for name in names:
        a, b = rec.stats[name], ref.stats[name]
        assert a.shape == b.shape, name
        if name in ("argmax", "match_count", "next_match_count"):
            # argmax may only differ where the top probabilities tie within float error
            if name == "argmax":
                differ = a != b
                gap = (ref.stats["max_prob"][..., 0] - ref.stats["max_prob"][..., 1]).abs()
                assert (gap[differ.any(-1)] < 1e-4).all(), name
            else:
                assert torch.equal(a, b), name
        else:
            assert torch.equal(a.isinf(), b.isinf()), name  # lse of padded rows is -inf on every backend
            diff = (a - b).masked_fill(a.isinf(), 0.0)
            assert diff.abs().max() < 1e-4, (name, diff.abs().max())


def test_transformer_lens_matches_native(native, bridge):
    from headscope.probe.backend_tl import record_transformer_lens

    batch, ref = native
    rec = record_transformer_lens(bridge, batch["input_ids"], REQUEST, attention_mask=batch["attention_mask"],
                                  patterns=True, head_out=[0, 7])
    assert rec.backend == "transformer_lens"
    _assert_same(rec, ref)
    real = batch["attention_mask"].bool()
    assert (rec.z(7) - ref.z(7))[real].abs().max() < 1e-4
    # text input goes through the same tokenisation as HeadscopeModel.tokenize
    rec_text = record_transformer_lens(bridge, TEXT, StatsRequest(entropy=True), prepend_bos=True, padding_side="left")
    assert (rec_text.stats["entropy"] - ref.stats["entropy"]).abs().max() < 1e-4


def _nnsight_model(model):
    """nnsight >= 0.8 wraps a model as TransformersModel (LanguageModel is deprecated there)."""
    import nnsight

    if hasattr(nnsight, "TransformersModel"):
        return nnsight.TransformersModel(model.hf, tokenizer=model.tokenizer, task="text-generation")
    return nnsight.LanguageModel(model.hf, tokenizer=model.tokenizer)


def test_nnsight_matches_native(model, native):
    from headscope.probe.backend_nnsight import record_nnsight

    batch, ref = native
    lm = _nnsight_model(model)
    rec = record_nnsight(lm, batch, dataclasses.replace(REQUEST, lse=False), patterns=True)
    assert rec.backend == "nnsight"
    _assert_same(rec, ref, skip=("lse",))
    assert model.hf.config._attn_implementation == "sdpa"  # eager only during the trace
    with pytest.raises(InputError, match="lse"):
        record_nnsight(lm, batch["input_ids"], REQUEST)
