"""Review findings on the TransformerLens / nnsight backends and model loading, each checked against
an independent reference (the native backend, a plain transformers forward, a manual ablation)."""

import pytest
import torch

from headscope.probe import InputError, LayerEdit, RecordingError, StatsRequest, load_model
from headscope.probe.loading import embedded_cache_dir

TEXT = "The cat sat on the mat. The cat sat on the mat and looked at the dog"


def _nnsight_model(model):
    import nnsight

    if hasattr(nnsight, "TransformersModel"):
        return nnsight.TransformersModel(model.hf, tokenizer=model.tokenizer, task="text-generation")
    return nnsight.LanguageModel(model.hf, tokenizer=model.tokenizer)


def test_nnsight_refuses_to_record_inside_an_edit_context(model):
    """nnsight traces under eager attention, which never reaches headscope's attention function: a
    recording taken inside `edit_attention` would show the unedited model. Here uniform ablation of
    every layer-0 head moves the later layers' entropy by > 0.1 natively; nnsight must refuse rather
    than silently return the unedited statistics."""
    from headscope.probe.backend_nnsight import record_nnsight

    batch = model.tokenize(TEXT)
    req = StatsRequest(entropy=True)
    lm = _nnsight_model(model)
    _, plain = model.run_recorded(batch["input_ids"], batch["attention_mask"], req)
    edit = LayerEdit(head_mask=torch.ones(model.meta.n_heads, dtype=torch.bool), head_mask_mode="uniform")
    with model.edit_attention({0: edit}):
        _, edited = model.run_recorded(batch["input_ids"], batch["attention_mask"], req)
        assert (edited.stats["entropy"][:, 1:] - plain.stats["entropy"][:, 1:]).abs().max() > 0.1
        with pytest.raises(InputError, match="edit"):
            record_nnsight(lm, batch, req)
    with model.record(req):
        with pytest.raises(InputError, match="recording"):
            record_nnsight(lm, batch, req)
        model(**batch)
    # outside those contexts it records as before, the same numbers as the native backend
    rec = record_nnsight(lm, batch, req)
    assert (rec.stats["entropy"] - plain.stats["entropy"]).abs().max() < 1e-4
    assert model.hf.config._attn_implementation == "sdpa"


def test_edits_on_a_model_whose_attention_a_bridge_replaced_are_refused():
    """Booting a TransformerBridge with hf_model=model.hf (as backend_tl's docstring showed) swaps the
    attention modules for bridge components that never call headscope's attention function; edits on
    that HeadscopeModel then did nothing (logits equal to the unedited ones, where zero-ablating layer
    0's heads moves them by ~35) and recordings came back all NaN. Both must raise instead."""
    from transformer_lens.model_bridge import TransformerBridge

    m = load_model()
    batch = m.tokenize(TEXT)
    edit = LayerEdit(head_mask=torch.ones(m.meta.n_heads, dtype=torch.bool))
    with torch.no_grad():
        plain = m(**batch).logits
        with m.edit_attention({0: edit}):
            ablated = m(**batch).logits
    assert (plain - ablated).abs().max() > 1.0  # the reference: the edit works before the boot

    TransformerBridge.boot_transformers(str(embedded_cache_dir()), hf_model=m.hf, tokenizer=m.tokenizer)
    with torch.no_grad():
        assert torch.allclose(m(**batch).logits, plain, atol=1e-4)  # plain forwards still work
        with m.edit_attention({0: edit}):
            with pytest.raises(RecordingError, match="boot_transformers"):
                m(**batch)
        with pytest.raises(RecordingError, match="boot_transformers"):
            m.run_recorded(batch["input_ids"], batch["attention_mask"], StatsRequest(entropy=True))
        assert m.state.recorder is None and m.state.seq_len is None  # nothing left behind
        assert torch.allclose(m(**batch).logits, plain, atol=1e-4)


def test_load_model_expands_the_home_directory(model, tmp_path, monkeypatch):
    """'~/models/x' is a local directory, not a missing path (it was refused as 'does not exist')."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=32, intermediate_size=64, vocab_size=49152,
                                      max_position_embeddings=128)).eval()
    hf.save_pretrained(tmp_path / "tiny")
    model.tokenizer.save_pretrained(tmp_path / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    loaded = load_model("~/tiny")
    ids = torch.tensor([[1, 504, 2296, 253, 1345]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, hf(input_ids=ids).logits)


def test_external_backends_take_a_mask_shaped_like_the_ids(model):
    """Token ids [S] with a mask [S] is the natural single-prompt call: it gave an IndexError. A mask
    of another shape than the ids must be refused with the shapes in the message."""
    from headscope.probe.backend_nnsight import record_nnsight

    batch = model.tokenize(TEXT)
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    req = StatsRequest(entropy=True)
    _, ref = model.run_recorded(batch["input_ids"], batch["attention_mask"], req)
    lm = _nnsight_model(model)
    rec = record_nnsight(lm, ids, req, attention_mask=mask)
    assert rec.attention_mask.shape == (1, ids.shape[0])
    assert (rec.stats["entropy"] - ref.stats["entropy"]).abs().max() < 1e-4
    for bad in (mask[:-2], torch.ones(2, ids.shape[0], dtype=torch.long)):
        with pytest.raises(InputError, match="attention_mask"):
            record_nnsight(lm, ids, req, attention_mask=bad)


def _tiny_llama_dir(model, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=32, intermediate_size=64, vocab_size=49152,
                                      max_position_embeddings=128)).eval()
    hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


def test_nnsight_model_loaded_lazily_from_a_directory(model, tmp_path):
    """nnsight's usual construction, TransformersModel(path), keeps the weights on the meta device until
    the first trace; the backend read the device from them and sent the ids to 'meta' ("Tensor.item()
    cannot be called on meta tensors"). It must record, with the native backend's numbers."""
    import nnsight

    path = _tiny_llama_dir(model, tmp_path / "tiny")
    native = load_model(str(path))
    batch = native.tokenize(["The cat sat on the mat and looked at the dog", "Hello there"], padding_side="left")
    req = StatsRequest(entropy=True, offsets=(1,), sink_k=1)
    _, ref = native.run_recorded(batch["input_ids"], batch["attention_mask"], req)
    cls = getattr(nnsight, "TransformersModel", None) or nnsight.LanguageModel
    lm = cls(str(path), tokenizer=model.tokenizer, task="text-generation")
    from headscope.probe.backend_nnsight import record_nnsight

    rec = record_nnsight(lm, batch, req)
    for name in ref.stats:
        assert (rec.stats[name] - ref.stats[name]).abs().max() < 1e-5, name


def test_nnsight_takes_a_tokenizer_batch_with_sentence_pairs():
    """A tokenizer's output for a sentence pair carries token_type_ids, which change a BERT encoder's
    attention. A BatchEncoding was refused ("got BatchEncoding") and the same batch as a plain dict
    silently lost token_type_ids (entropy off by 0.83 from the native recording of model(**batch))."""
    import nnsight

    from headscope.probe.backend_nnsight import record_nnsight
    from headscope.probe.backend_tl import record_transformer_lens

    m = load_model("all-minilm-l6-v2")
    batch = m.tokenizer(["A man is playing a guitar.", "Dogs bark."], ["Someone plays music on stage.", "Yes."],
                        return_tensors="pt", padding=True)
    assert batch["token_type_ids"].any()
    req = StatsRequest(entropy=True, offsets=(1,))
    with m.record(req) as ref:
        m(**batch)
    lm = nnsight.TransformersModel(m.hf, tokenizer=m.tokenizer, task="feature-extraction")
    for given in (batch, dict(batch)):
        rec = record_nnsight(lm, given, req)
        for name in ref.stats:
            assert (rec.stats[name] - ref.stats[name]).abs().max() < 1e-4, name
    with pytest.raises(InputError, match="position_ids"):
        record_nnsight(lm, {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}, req)
    with pytest.raises(InputError, match="token_type_ids"):  # the bridge is not given them: refused, not dropped
        record_transformer_lens(object(), batch, req)


def test_a_copy_made_inside_an_edit_context_still_runs(model):
    """The check that refuses forwards bypassing headscope's attention must not fire on a deep copy made
    inside a context (prune() does this): the copy carries a copy of the state but no bound module."""
    import copy

    batch = model.tokenize(TEXT)
    with torch.no_grad():
        plain = model.hf(**batch).logits
        with model.edit_attention({0: LayerEdit(head_mask=torch.ones(model.meta.n_heads, dtype=torch.bool))}):
            twin = copy.deepcopy(model.hf)
        assert twin.config._attn_implementation == "headscope"
        assert torch.allclose(twin(**batch).logits, plain, atol=1e-4)


def test_load_model_dtype_by_name_and_device_map_on_an_object():
    """A model object took dtype only as a torch.dtype (TypeError for "bfloat16") and dropped
    device_map silently."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headscope.probe.errors import ModelLoadError

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      hidden_size=16, intermediate_size=32, vocab_size=40,
                                      max_position_embeddings=32)).eval()
    ref = hf.model.embed_tokens.weight.to(torch.bfloat16)
    m = load_model(hf, dtype="bfloat16")
    assert m.hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(m.hf.model.embed_tokens.weight, ref)
    with pytest.raises(ModelLoadError, match="floating dtype"):
        load_model(hf, dtype="int8")
    with pytest.raises(ModelLoadError, match="device_map"):
        load_model(hf, device_map="auto")
