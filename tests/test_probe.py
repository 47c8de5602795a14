"""Recorder hygiene (logits, hooks, attention implementation), persistence, bad input, cached decoding."""

import pytest
import torch

from headscope.kernels.errors import HeadscopeError
from headscope.probe import (DeviceError, HeadIndexError, InputError, PatternMemoryError, Recording, RecordingError,
                             StatsRequest, load_model)

TEXT = "Alice gave Bob a book because Bob likes to read books."


def _hook_counts(hf):
    return {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in hf.named_modules()}


def test_logits_unchanged_and_no_hook_left(model):
    batch = model.tokenize([TEXT, "Short one."], prepend_bos=True)
    hooks_before = _hook_counts(model.hf)
    impl_before = model.hf.config._attn_implementation
    with torch.no_grad():
        before = model(**batch).logits
        with model.record(StatsRequest.all(), patterns=[3], head_out=[1], qkv=[2]) as rec:
            during = model(**batch).logits
        after = model(**batch).logits
        with pytest.raises(RuntimeError, match="boom"):  # an exception inside the block cleans up too
            with model.record(StatsRequest(entropy=True)):
                raise RuntimeError("boom")
        after_error = model(**batch).logits
    assert torch.equal(before, after) and torch.equal(before, after_error)
    # recording computes the same attention exactly in float32, in another order than SDPA
    real = batch["attention_mask"].bool()
    assert (during - before)[real].abs().max() < 1e-4
    assert _hook_counts(model.hf) == hooks_before
    assert model.hf.config._attn_implementation == impl_before
    assert rec.stats["entropy"].shape == (2, model.meta.n_layers, model.meta.n_heads, batch["input_ids"].shape[1])


def test_save_load_round_trip(model, tmp_path):
    batch = model.tokenize([TEXT, "A second, shorter text."], prepend_bos=True, padding_side="left")
    keyset = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    keyset[:, -3:] = True
    req = StatsRequest.all(topk=3, sink_k=2, offsets=(1, 2, 5), keyset=True)
    _, rec = model.run_recorded(batch["input_ids"], batch["attention_mask"], req,
                                patterns={"layers": [0, 4], "heads": [1, 8]}, head_out=[2], qkv=[5], keyset=keyset)
    rec.info["note"] = "round trip"
    back = Recording.load(rec.save(tmp_path / "rec"))
    assert back.meta == rec.meta and back.request == rec.request
    for f in ("pattern_layers", "pattern_heads", "head_out_layers", "qkv_layers", "backend", "info"):
        assert getattr(back, f) == getattr(rec, f), f
    for f in ("tokens", "attention_mask", "patterns", "head_out", "q", "k", "v"):
        a, b = getattr(rec, f), getattr(back, f)
        assert a is not None and a.dtype == b.dtype and torch.equal(a, b), f
    assert sorted(back.stats) == sorted(rec.stats)
    for k, v in rec.stats.items():
        assert v.dtype == back.stats[k].dtype and torch.equal(v.nan_to_num(), back.stats[k].nan_to_num()), k
    assert torch.equal(back.pattern(4, 8), rec.pattern(4, 8))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(HeadscopeError, match="cannot read recording"):
        Recording.load(tmp_path / "junk.safetensors")


def test_empty_prompt(model):
    for bad in ("", "   ", []):
        with pytest.raises(InputError, match="empty prompt"):
            model.tokenize(bad)
    with pytest.raises(InputError, match="empty prompt"):
        with model.record(StatsRequest(entropy=True)):
            model(input_ids=torch.zeros(1, 0, dtype=torch.long))


def test_prompt_longer_than_context(model):
    n = model.meta.max_positions + 1
    with pytest.raises(InputError, match=f"input of \\d+ tokens is longer than .*context \\({model.meta.max_positions}\\)"):
        model.tokenize("hello " * n)
    # the recorder refuses before the forward starts
    with pytest.raises(InputError, match="longer than"):
        with model.record(StatsRequest(entropy=True)):
            model(input_ids=torch.ones(1, n, dtype=torch.long))


def test_layer_and_head_out_of_range(model):
    from headscope.circuits.ablation import ablate_heads

    L, H = model.meta.n_layers, model.meta.n_heads
    batch = model.tokenize(TEXT)
    _, rec = model.run_recorded(batch["input_ids"], None, StatsRequest(entropy=True), patterns=[0], head_out=[0])
    cases = [
        lambda: rec.stat("entropy", layer=L),
        lambda: rec.stat("entropy", layer=0, head=H),
        lambda: rec.pattern(0, H),
        lambda: rec.pattern(-1, 0),
        lambda: rec.z(L),
        lambda: model.record(patterns=[L]).__enter__(),
        lambda: model.record(head_out=[-1]).__enter__(),
        lambda: model.record(patterns={"layers": [0], "heads": [H]}).__enter__(),
        lambda: model.record(stop_after_layer=L + 5).__enter__(),
        lambda: ablate_heads(model, [(L, 0)]).__enter__(),
        lambda: ablate_heads(model, [(0, H)]).__enter__(),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(HeadIndexError, match="out of range"):
            case()
    with pytest.raises(HeadIndexError, match="needs the layer too"):
        rec.stat("entropy", head=0)  # a head without its layer (returned every layer's heads before)
    assert model.state.recorder is None and not model.state.edits
    with pytest.raises(HeadIndexError, match="not recorded"):
        rec.pattern(1, 0)


def test_cuda_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match="no CUDA GPU.*device='cpu'"):
        load_model(device="cuda")


def test_patterns_that_do_not_fit_are_refused_before_allocating(model):
    with pytest.raises(PatternMemoryError, match=r"need .* GiB \(\d+ bytes\)"):
        with model.record(StatsRequest(entropy=True), patterns=True, max_pattern_bytes=10_000):
            model(**model.tokenize(TEXT))
    # default budget = share of available memory: a huge batch is refused at the pre-hook, before
    # any attention runs (the forward would otherwise need petabytes)
    ids = torch.ones(4096, 1024, dtype=torch.long)
    need = 4096 * model.meta.n_layers * model.meta.n_heads * 1024 * 1024 * 4
    with pytest.raises(PatternMemoryError, match=f"\\({need} bytes\\)"):
        with model.record(StatsRequest(entropy=True), patterns=True):
            model(input_ids=ids)
    assert model.state.recorder is None


def test_cached_generate_equals_one_forward(model):
    batch = model.tokenize("The capital of France is", prepend_bos=True)
    req = StatsRequest.all(topk=2, offsets=(1, 2))
    with torch.no_grad(), model.record(req, patterns=[5]) as rec:
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    # the last generated token is never fed back, so the recording covers all but it
    seq = out[:, :-1]
    assert torch.equal(rec.tokens, seq)
    _, ref = model.run_recorded(seq, torch.ones_like(seq), req, patterns=[5])
    for name, t in ref.stats.items():
        if name == "argmax":
            assert (rec.stats[name] == t).float().mean() > 0.999
        else:
            assert (rec.stats[name] - t).abs().max() < 1e-4, name
    assert (rec.patterns - ref.patterns).abs().max() < 1e-4


def test_patterns_are_refused_at_their_assembly_peak(model):
    """The budget covers the assembly peak (2x the kept patterns: blocks and the assembled tensor),
    not the kept size alone (a third of the measured peak before)."""
    b = model.tokenize(TEXT)
    S = b["input_ids"].shape[1]
    need = model.meta.n_layers * model.meta.n_heads * S * S * 4
    with pytest.raises(PatternMemoryError, match=f"\\({need} bytes\\).*2x that while they are assembled"):
        with model.record(StatsRequest(entropy=True), patterns=True, max_pattern_bytes=int(need * 1.5)):
            model(**b)
    with torch.no_grad(), model.record(StatsRequest(entropy=True), patterns=[0], max_pattern_bytes=2 * need) as rec:
        model(**b)
    assert torch.allclose(rec.pattern(0, 0).sum(-1)[0], torch.ones(S), atol=1e-5)


def test_patterns_of_layers_that_did_not_run_are_nan(model):
    b = model.tokenize(TEXT)
    with torch.no_grad(), model.record(StatsRequest(entropy=True), patterns=[1, 5], stop_after_layer=2) as rec:
        model(**b)
    assert torch.isnan(rec.pattern(5, 0)).all() and torch.isnan(rec.stats["entropy"][0, 5]).all()
    assert torch.allclose(rec.pattern(1, 0).sum(-1)[0], torch.ones(b["input_ids"].shape[1]), atol=1e-5)


def test_a_submodule_call_inside_record_is_refused(model):
    """Calling model.hf.model (no pre-hook of the whole model) would append its rows to the previous
    call's segment: twice the tokens, colsum summed twice. It raises instead, and the model records
    normally afterwards."""
    b = model.tokenize(TEXT)
    with pytest.raises(RecordingError, match="submodule"):
        with torch.no_grad(), model.record(StatsRequest(entropy=True, colsum=True)):
            model(**b)
            model.hf.model(**b)
    with torch.no_grad(), model.record(StatsRequest(entropy=True)) as rec:
        model(**b)
    assert rec.stats["entropy"].shape[-1] == b["input_ids"].shape[1]


def test_a_deep_copy_made_inside_an_edit_is_a_plain_model(model):
    """copy.deepcopy inside a context used to carry the edit (and the context's user count) into the
    copy forever; the copy now runs as the unedited model and records on its own."""
    import copy

    from headscope.probe import HeadscopeModel, LayerEdit
    b = model.tokenize(TEXT)
    H = model.meta.n_heads
    with torch.no_grad():
        plain = model(**b).logits
        with model.edit_attention({0: LayerEdit(head_mask=torch.ones(H, dtype=torch.bool))}):
            twin = copy.deepcopy(model.hf)
        copy_model = HeadscopeModel(twin, model.tokenizer)
        assert (copy_model(**b).logits - plain).abs().max() < 1e-4
        with copy_model.record(StatsRequest(entropy=True)) as rec:
            copy_model(**b)
    assert torch.isfinite(rec.stats["entropy"][0, 0]).all()


def test_prefill_from_embeddings_then_decoding_keeps_tokens_aligned(model):
    """generate(inputs_embeds=...): the prefill's ids are unknown, so the recording's tokens are 0 over
    the whole sequence (before: the generated ids alone, shorter than the statistics)."""
    ids = model.tokenize(TEXT)["input_ids"]
    emb = model.hf.get_input_embeddings()(ids)
    with torch.no_grad(), model.record(StatsRequest(entropy=True)) as rec:
        model.hf.generate(inputs_embeds=emb, max_new_tokens=3, do_sample=False)
    S = rec.stats["entropy"].shape[-1]
    assert S == ids.shape[1] + 2 and rec.tokens.shape == (1, S) and (rec.tokens == 0).all()


def test_packed_sequences_are_refused(model):
    """Two documents in one row with restarting position_ids and no cache: transformers keeps them apart
    with a block mask that headscope's attention cannot apply, so a no-op edit or a recording would let
    them see each other (the second document's logits moved by 20). Refused; a cached call, where
    transformers does not pack either, runs."""
    from headscope.probe import LayerEdit
    a = model.tokenizer("The cat sat on the mat.")["input_ids"]
    c = model.tokenizer("Paris is the capital of France")["input_ids"]
    ids = torch.tensor([a + c])
    pos = torch.tensor([list(range(len(a))) + list(range(len(c)))])
    noop = {0: LayerEdit(head_mask=torch.zeros(model.meta.n_heads, dtype=torch.bool))}
    with torch.no_grad():
        with pytest.raises(InputError, match="packed sequences"), model.edit_attention(noop):
            model.hf(input_ids=ids, position_ids=pos, use_cache=False)
        with pytest.raises(InputError, match="packed sequences"), model.record(StatsRequest(sink_k=1)):
            model.hf(input_ids=ids, position_ids=pos, use_cache=False)
        plain = model.hf(input_ids=ids, position_ids=pos, use_cache=True).logits
        with model.edit_attention(noop):
            edited = model.hf(input_ids=ids, position_ids=pos, use_cache=True).logits
    assert (edited - plain).abs().max() < 1e-3
