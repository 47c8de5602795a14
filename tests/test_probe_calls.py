"""How the recorder follows the ways transformers gets called: positional arguments, caches that
hand over fewer or more keys than the sequence has, generation modes that reorder the cache,
early stops, a model wrapped twice. References: one plain forward over the same tokens."""

import numpy as np
import pytest
import torch

from headscope.kernels import KernelInputError
from headscope.probe import HeadscopeModel, LayerEdit, RecordingError, StatsRequest, load_model
from headscope.probe.recording import Recording

from decode_reference import check_decode_matches_forward, tiny_mistral

ALL = StatsRequest.all(topk=2, sink_k=2, offsets=(1, 2), colsum=True)


def test_sliding_window_cache_decode_matches_one_forward():
    """A sliding-window cache passes decode steps only the last `window` keys; every statistic
    indexed by key position (argmax, colsum, patterns, sink, next_match's previous token) must
    still come out at sequence positions."""
    check_decode_matches_forward(tiny_mistral(window=5), ALL)


def test_static_cache_is_refused(model):
    batch = model.tokenize(["The capital of France is"])
    with pytest.raises(KernelInputError, match="static cache"):
        with torch.no_grad(), model.record(StatsRequest(entropy=True)):
            model.generate(**batch, max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_beam_search_is_refused_and_the_cache_released(model):
    batch = model.tokenize(["The capital of France is"])
    with pytest.raises(RecordingError, match="reorder"):
        with torch.no_grad(), model.record(StatsRequest(entropy=True)):
            model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
    # outside a recording beam search runs as usual
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_positional_attention_mask_is_recorded(model):
    batch = model.tokenize(["One two three four five six", "Hi"])
    req = StatsRequest(entropy=True)
    with torch.no_grad(), model.record(req) as by_name:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad(), model.record(req) as by_position:
        model(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(by_position.attention_mask, batch["attention_mask"].bool())
    assert torch.equal(by_position.stats["entropy"], by_name.stats["entropy"])


def test_stop_after_layer(model):
    batch = model.tokenize(["The cat sat on the mat"])
    req = StatsRequest(entropy=True)
    with torch.no_grad(), model.record(req, stop_after_layer=3) as rec:
        assert model(**batch) is None
    assert rec.info["layers_run"] == [0, 1, 2, 3]
    assert torch.isfinite(rec.stats["entropy"][:, :4]).all()
    with torch.no_grad(), model.record(req, stop_after_layer=3) as rec2:
        model.hf(**batch)  # the direct call ends the block, the recording is still complete
        raise AssertionError("not reached")
    assert torch.equal(rec2.stats["entropy"][:, :4], rec.stats["entropy"][:, :4])


def test_wrapping_a_model_twice_shares_its_state(model):
    batch = model.tokenize(["The cat sat on the mat"])
    again = HeadscopeModel(model.hf, model.tokenizer)
    assert again.state is model.state
    with torch.no_grad(), model.record(StatsRequest(entropy=True)) as rec:
        model(**batch)
    assert torch.isfinite(rec.stats["entropy"]).all()
    with torch.no_grad():
        plain = model(**batch).logits
        with model.edit_attention({0: LayerEdit(head_mask=torch.ones(model.meta.n_heads, dtype=torch.bool))}):
            ablated = model(**batch).logits
    assert (plain - ablated).abs().max() > 1e-2


def test_edit_key_set_shorter_than_the_generated_sequence(model):
    """LayerEdit keys cover the prompt; generated positions count as outside the set."""
    batch = model.tokenize(["The capital of France is"])
    S = batch["input_ids"].shape[1]
    keys = torch.zeros(1, S, dtype=torch.bool)
    keys[0, 0] = True
    beta = torch.full((model.meta.n_heads,), 0.2)
    edit = {l: LayerEdit(key_scale_beta=beta, keys=keys) for l in range(model.meta.n_layers)}
    with torch.no_grad(), model.edit_attention(edit):
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        # the last step's logits equal one forward with the key set padded by False
        full = out[:, :-1]
        step = model(full, torch.ones_like(full)).logits[:, -1]
    longer = {l: LayerEdit(key_scale_beta=beta, keys=torch.cat([keys, torch.zeros(1, 2, dtype=torch.bool)], 1))
              for l in range(model.meta.n_layers)}
    with torch.no_grad(), model.edit_attention(longer):
        ref = model(full, torch.ones_like(full)).logits[:, -1]
    assert (step - ref).abs().max() < 1e-4
    assert out[0, -1] == ref.argmax()


def test_save_keeps_dotted_names(model, tmp_path):
    batch = model.tokenize(["The cat sat"])
    with torch.no_grad(), model.record(StatsRequest(entropy=True)) as rec:
        model(**batch)
    a = rec.save(tmp_path / "tau_0.5")
    b = rec.save(tmp_path / "tau_0.25")
    assert a != b and a.name == "tau_0.5.safetensors" and b.exists()
    assert torch.equal(Recording.load(tmp_path / "tau_0.5").stats["entropy"], rec.stats["entropy"])


def test_info_saved_unchanged_or_refused(model, tmp_path):
    batch = model.tokenize(["The cat sat"])
    with torch.no_grad(), model.record(StatsRequest(entropy=True)) as rec:
        model(**batch)
    rec.info.update(tau={"0.5": [1, 2.5, None, True]}, note="run 3")
    assert Recording.load(rec.save(tmp_path / "ok")).info == rec.info
    for bad, where in (({3: "x"}, "key 3"), ({"a": (1, 2)}, r"info\['a'\] is a tuple"),
                       ({"a": [torch.ones(1)]}, r"info\['a'\]\[0\] is a Tensor")):
        rec.info = bad
        with pytest.raises(RecordingError, match=where):
            rec.save(tmp_path / "bad")
    assert not (tmp_path / "bad.safetensors").exists()


def test_numpy_and_tensor_indices(model):
    layer, head = np.unravel_index(np.int64(5 * model.meta.n_heads + 2), (model.meta.n_layers, model.meta.n_heads))
    assert model.meta.check_head(layer, head) == (5, 2)
    assert model.meta.check_layer(torch.tensor(3)) == 3
    with pytest.raises(Exception, match="integer index"):
        model.meta.check_layer(2.0)


def test_cache_guard_ends_with_the_recording_and_skips_copies(model):
    import copy

    batch = model.tokenize(["The capital of France is"])
    with torch.no_grad(), model.record(StatsRequest(entropy=True)):
        out = model.hf(**batch, use_cache=True)
        cache = out.past_key_values
        model.hf(input_ids=batch["input_ids"][:, -1:], past_key_values=cache, use_cache=True)  # now followed
        twin = copy.deepcopy(cache)
        n = cache.get_seq_length()
        with pytest.raises(RecordingError, match="crop"):
            cache.crop(-1)
        twin.crop(-2)  # a copy is not the cache the recording follows
    cache.crop(-1)  # after the recording, plain transformers behaviour
    assert cache.get_seq_length() == n - 1 and twin.get_seq_length() == n - 2


def test_length_tracking_survives_a_stopped_forward(model):
    """stop_after_layer raises inside the forward: the tracked length must not outlive that call."""
    batch = model.tokenize(["The cat sat on the mat and looked at the dog"])
    short = model.tokenize(["The cat"])
    edit = {0: LayerEdit(head_mask=torch.zeros(model.meta.n_heads, dtype=torch.bool), head_mask_mode="uniform")}
    with torch.no_grad(), model.edit_attention(edit):
        with model.record(StatsRequest(entropy=True), stop_after_layer=1):
            model(**short)
        assert model.state.seq_len is None
        base = model.hf.model(**batch).last_hidden_state  # a submodule call: no length tracked, no refusal
    assert torch.isfinite(base).all()


def test_left_padding_on_absolute_positions_matches_the_prompt_alone():
    """run_recorded counts positions from each row's first real token, as generate() does: a
    left-padded prompt on GPT-2 is recorded as the prompt alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt = load_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50, n_positions=64)).eval())
    ids = torch.randint(0, 50, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    req = StatsRequest(entropy=True, lse=True, topk=1)
    _, alone = gpt.run_recorded(ids, torch.ones_like(ids), req)
    _, left = gpt.run_recorded(padded, mask, req)
    for name in ("entropy", "lse"):
        assert (left.stats[name][..., 3:] - alone.stats[name]).abs().max() < 1e-5, name
    assert (left.stats["max_prob"][..., 3:, :] - alone.stats["max_prob"]).abs().max() < 1e-5
    assert torch.equal(left.stats["argmax"][..., 3:, :] - 3, alone.stats["argmax"])


def test_load_model_object_with_dtype_and_the_two_mask_refusal():
    from transformers import MistralConfig, MistralForCausalLM

    from headscope.probe.external import batch_inputs

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2))
    m = load_model(hf, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(Exception, match="two attention masks"):
        batch_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, m.meta, "cpu",
                     attention_mask=torch.ones_like(ids))
