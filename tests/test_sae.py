"""SAE training, architectures, resume, metrics and bad input (issue 6)."""

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from headscope.probe.edits import LayerEdit
from headscope.sae.activations import ActivationError, ActivationStore, collect, model_activations
from headscope.sae.architectures import SAE, SAEConfig, SAEConfigError
from headscope.sae.corpus import CorpusError, corpus_texts, default_corpus, load_texts, packed_batches
from headscope.sae.init import geometric_median
from headscope.sae.metrics import ce_loss_recovered, head_attribution, reconstruction_metrics, top_activating
from headscope.sae.saelens_format import load_sae, save_sae
from headscope.sae.train import CheckpointError, TrainConfig, new_sae, train

LAYER = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def z_store(model):
    rows = packed_batches(model.tokenizer, corpus_texts(None, seed=0), seq_len=64, batch_size=8, bos_id=1)
    st = ActivationStore(d_in=576, shard_tokens=1024)
    return collect(model, LAYER, "z", rows, 4096, store=st, progress=False)


def _synthetic_store(n=8192, d=32, n_feat=64, seed=0):
    """Activations that are sparse sums of a known dictionary (3 active features per row)."""
    g = torch.Generator().manual_seed(seed)
    D = F.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:3] for _ in range(n)])
    coef = torch.rand(n, 3, generator=g) * 2 + 0.5
    x = (coef[:, :, None] * D[idx]).sum(1) + 0.3
    st = ActivationStore(d_in=d, shard_tokens=2048)
    st.add(x)
    return st.finish()


# ---- activations -------------------------------------------------------------------------
def test_z_activations_match_recorder_layout(model, z_store):
    ids = model.tokenize(["The cat sat on the mat."], prepend_bos=True)["input_ids"]
    a = model_activations(model, LAYER, "z", ids)
    _, rec = model.run_recorded(ids, None, head_out=[LAYER])
    z = rec.z(LAYER)  # [B, S, H, D]
    assert a.shape == (1, ids.shape[1], 576)
    torch.testing.assert_close(a[0, :, 64:128], z[0, :, 1, :].float())
    assert z_store.n_tokens == 4096 and z_store.shard(0).shape == (1024, 576)


def test_store_batches_deterministic_resumable_and_complete(tmp_path):
    st = ActivationStore(d_in=3, shard_tokens=10, max_memory_tokens=20, spill_dir=tmp_path / "acts")
    st.add((torch.arange(40, dtype=torch.float32) * 3)[:, None] + torch.arange(3.0))
    st.finish()
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "acts").iterdir())  # spilled
    re = ActivationStore.open(tmp_path / "acts")
    it = re.batches(5, seed=3, mix_shards=2)
    first = [next(it) for _ in range(16)]  # two epochs of 8 batches
    epoch = torch.cat(first[:8])[:, 0].sort().values
    assert torch.equal(epoch, torch.arange(40, dtype=torch.float32) * 3)  # every row exactly once
    assert not torch.equal(torch.cat(first[:8]), torch.cat(first[8:]))      # reshuffled per epoch
    resumed = list(zip(range(6), re.batches(5, seed=3, mix_shards=2, start=10)))
    for (_, b), a in zip(resumed, first[10:]):
        assert torch.equal(a, b)


# ---- architectures -----------------------------------------------------------------------
def _rand_sae(arch, d_in=12, d_sae=40, k=5, seed=0):
    torch.manual_seed(seed)
    s = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=k))
    with torch.no_grad():
        for p in s.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return s


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_forward_matches_definition(arch):
    s = _rand_sae(arch)
    x = torch.randn(16, 12)
    pre = (x - s.b_dec) @ s.W_enc + s.b_enc
    if arch == "relu":
        f = pre.clamp_min(0)
    elif arch == "topk":
        f = torch.zeros_like(pre)
        for t in range(16):
            order = pre[t].argsort(descending=True)[:5]
            f[t, order] = pre[t, order].clamp_min(0)
    elif arch == "batchtopk":
        r = pre.clamp_min(0)
        cut = r.flatten().sort(descending=True).values[5 * 16 - 1]
        f = torch.where(r >= cut, r, torch.zeros_like(r))
    else:
        theta = s.log_threshold.exp()
        f = torch.where(pre > theta, pre, torch.zeros_like(pre))
    s.train()
    out = s(x)
    torch.testing.assert_close(out["f"], f)
    torch.testing.assert_close(out["x_hat"], f @ s.W_dec + s.b_dec)
    if arch in ("topk", "batchtopk"):
        assert (out["f"] > 0).sum() <= 5 * 16


def test_batchtopk_threshold_is_a_mean_of_the_first_batches_then_a_moving_average():
    """The inference threshold: the first batch's smallest kept activation, then the plain mean of the
    batches' minima up to 100 updates, then a 0.99 moving average; a loaded SAE (no count) goes
    straight to the moving average. Started from the first batch with 0.99, a 60-step SAE kept ~55% of
    that batch's value (inference L0 2.2 for k = 8)."""
    s = _rand_sae("batchtopk")
    s.train()
    mins = []
    for i in range(103):
        x = torch.randn(64, 12) * (1 + i / 50)
        f = s(x)["f"]
        mins.append(float(f[f > 0].min().detach()))
        s.loss(x)
    mean100 = sum(mins[:100]) / 100
    expect = mean100
    for m in mins[100:]:
        expect = 0.99 * expect + 0.01 * m
    assert abs(float(s.threshold) - expect) < 1e-4 * expect
    t = _rand_sae("batchtopk")
    t.load_state_dict(s.state_dict())
    t.train()
    x = torch.randn(64, 12)
    f = t(x)["f"]
    m = float(f[f > 0].min().detach())
    before = float(t.threshold)
    t.loss(x)
    assert abs(float(t.threshold) - (0.99 * before + 0.01 * m)) < 1e-5


def test_batchtopk_inference_threshold_and_topk_aux_loss():
    s = _rand_sae("batchtopk")
    x = torch.randn(64, 12)
    s.train()
    s.loss(x)
    assert s.threshold > 0
    s.eval()
    pre = s.pre_acts(x).clamp_min(0)
    torch.testing.assert_close(s.encode(x), pre * (pre > s.threshold))
    # AuxK: with every latent dead, the aux loss is the normalised error of the k_aux dead latents
    t = SAE(SAEConfig(d_in=12, d_sae=40, arch="topk", k=5, k_aux=7, dead_tokens=1))
    t.tokens_since_fired.fill_(10)
    out = t.loss(x)
    e = x - out["x_hat"]
    pre = t.pre_acts(x).clamp_min(0)
    v, i = pre.topk(7, dim=-1)
    e_hat = (torch.zeros_like(pre).scatter(-1, i, v)) @ t.W_dec
    ref = (e_hat - e).pow(2).sum(-1).mean() / (e - e.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out["aux"], ref)
    # weighed against the plain mse as Gao weighs it against mse / Var(x) (test_sae_review)
    var_x = (x - x.mean(0)).pow(2).sum(-1).mean()
    torch.testing.assert_close(out["loss"], out["mse"] + var_x * ref / 32)


def test_geometric_median_beats_mean_under_outliers():
    x = torch.randn(200, 4) * 0.1
    x[:10] += 100.0
    m = geometric_median(x)
    assert m.norm() < 1.0 < x.mean(0).norm()
    obj = lambda c: (x - c).norm(dim=1).sum()  # noqa: E731
    assert obj(m) <= obj(x.mean(0)) and obj(m) <= obj(m + 0.01 * torch.randn(4)) + 1e-4


# ---- training ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,coeff", [("topk", 0.0), ("relu", 0.3), ("jumprelu", 0.1), ("batchtopk", 0.0)])
def test_training_recovers_sparse_dictionary(arch, coeff):
    st = _synthetic_store()
    cfg = SAEConfig(d_in=32, d_sae=128, arch=arch, k=4, dead_tokens=4096, jumprelu_init_threshold=0.3,
                    jumprelu_bandwidth=0.1)
    tc = TrainConfig(total_tokens=8192 * 6, batch_size=256, lr=3e-3, sparsity_coeff=coeff, b_dec_init="mean")
    sae = new_sae(cfg, st, tc)
    res = train(sae, st, tc, progress=False)
    m = reconstruction_metrics(sae, [st.shard(i) for i in range(st.n_shards)])
    assert m["fvu"] < 0.15, m
    assert m["l0"] < 16, m
    assert res.history[-1]["loss"] < res.history[0]["loss"] / 3


def test_topk_on_model_z_beats_mean_baseline(z_store):
    cfg = SAEConfig(d_in=576, d_sae=1152, arch="topk", k=16, dead_tokens=2048, layer=LAYER, site="z",
                    n_heads=9, head_dim=64)
    tc = TrainConfig(total_tokens=4096 * 8, batch_size=256, lr=2e-3)
    sae = new_sae(cfg, z_store, tc)
    m0 = reconstruction_metrics(sae, [z_store.shard(0)])
    train(sae, z_store, tc, progress=False)
    m = reconstruction_metrics(sae, [z_store.shard(i) for i in range(z_store.n_shards)])
    # mean-only reconstruction has FVU 1; a broken trainer stays near its untrained value
    assert m["fvu"] < 0.5 and m["fvu"] < 0.5 * m0["fvu"], (m0["fvu"], m["fvu"])
    assert abs(m["l0"] - 16) < 0.5 and m["dead_frac"] < 0.5


def test_resume_after_kill_gives_identical_weights(tmp_path):
    st = _synthetic_store(n=4096)
    cfg = SAEConfig(d_in=32, d_sae=96, arch="topk", k=4, dead_tokens=512)
    tc = TrainConfig(total_tokens=4096 * 3, batch_size=128, lr=3e-3, checkpoint_every=20, seed=7)
    ref = train(new_sae(cfg, st, tc), st, tc, progress=False).sae

    class Killed(Exception):
        pass

    def kill(step, sae, parts):
        if step == 53:
            raise Killed

    with pytest.raises(Killed):
        train(new_sae(cfg, st, tc), st, tc, out_dir=tmp_path, callback=kill, progress=False)
    assert (tmp_path / "checkpoints" / "LATEST").read_text() == "step_00000040"
    resumed = train(new_sae(cfg, st, tc), st, tc, out_dir=tmp_path, resume=True, progress=False).sae
    for name, p in ref.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name


# ---- metrics -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_z_sae(z_store):
    cfg = SAEConfig(d_in=576, d_sae=1152, arch="topk", k=16, dead_tokens=2048, layer=LAYER, site="z",
                    n_heads=9, head_dim=64, model="smollm2-135m-instruct")
    tc = TrainConfig(total_tokens=4096 * 4, batch_size=256, lr=2e-3)
    sae = new_sae(cfg, z_store, tc)
    return train(sae, z_store, tc, progress=False).sae


def _next_token_ce(model, ids, register=None) -> float:
    """Mean next-token cross-entropy of ids, with the hook that register() installs (and returns the
    handle of) in place during the forward: the reference for CE loss recovered."""
    h = register() if register else None
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids, use_cache=False).logits
    finally:
        if h:
            h.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def test_ce_loss_recovered_against_manual_splice(model, trained_z_sae):
    sae = trained_z_sae
    ids = next(packed_batches(model.tokenizer, default_corpus(seed=99), seq_len=48, batch_size=2, bos_id=1))
    got = ce_loss_recovered(model, sae, LAYER, [ids])

    # independent path: a forward hook on the layer's o_proj input replaces the concatenated z
    o_proj = model.attention_modules[LAYER].o_proj

    def run(replace):
        return _next_token_ce(model, ids, replace and (
            lambda: o_proj.register_forward_pre_hook(lambda m, a: (replace(a[0]),))))

    def splice(z):
        out = sae(z.reshape(-1, 576))["x_hat"].reshape(z.shape)
        return torch.cat([z[:, :1], out[:, 1:]], 1)

    clean, spliced = run(None), run(splice)
    zero = run(lambda z: torch.cat([z[:, :1], torch.zeros_like(z[:, 1:])], 1))
    assert got["ce_clean"] == pytest.approx(clean, abs=1e-4)
    assert got["ce_sae"] == pytest.approx(spliced, abs=1e-4)
    assert got["ce_zero"] == pytest.approx(zero, abs=1e-4)
    assert got["ce_recovered"] == pytest.approx((zero - spliced) / (zero - clean), abs=1e-3)
    assert zero > clean


def test_ce_loss_recovered_on_the_residual_stream_against_manual_splice(model):
    """site resid: the SAE's reconstruction replaces the decoder block's output (a hook on
    model.hf.model.layers[L] itself here), position 0 left alone; zero ablation zeroes it."""
    torch.manual_seed(1)
    d = model.meta.d_model
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, arch="topk", k=32, layer=LAYER, site="resid"))
    ids = next(packed_batches(model.tokenizer, default_corpus(seed=98), seq_len=40, batch_size=2, bos_id=1))
    with torch.no_grad():  # a decoder bias at the stream's mean, so the splice is not absurd
        sae.b_dec.copy_(model_activations(model, LAYER, "resid", ids)[:, 1:].reshape(-1, d).mean(0))
    got = ce_loss_recovered(model, sae, LAYER, [ids])
    block = model.hf.model.layers[LAYER]

    def run(replace):
        def hook(m, a, out):
            x = out[0] if isinstance(out, tuple) else out
            y = torch.cat([x[:, :1], replace(x)[:, 1:]], 1)
            return (y, *out[1:]) if isinstance(out, tuple) else y

        return _next_token_ce(model, ids, replace and (lambda: block.register_forward_hook(hook)))

    clean = run(None)
    spliced = run(lambda x: sae(x.reshape(-1, d))["x_hat"].reshape(x.shape))
    zero = run(torch.zeros_like)
    assert got["ce_clean"] == pytest.approx(clean, abs=1e-4)
    assert got["ce_sae"] == pytest.approx(spliced, abs=1e-4)
    assert got["ce_zero"] == pytest.approx(zero, abs=1e-4)
    assert got["ce_recovered"] == pytest.approx((zero - spliced) / (zero - clean), abs=1e-3)
    assert zero > clean and spliced != pytest.approx(clean, abs=1e-3)


def test_head_attribution_and_top_contexts(model, trained_z_sae):
    sae = trained_z_sae
    a = head_attribution(sae)
    # an SAE whose config lacks the head shape (a SAELens file from elsewhere) takes the model's
    bare = SAE(SAEConfig(**{**sae.cfg.to_dict(), "n_heads": 0, "head_dim": 0}))
    bare.load_state_dict(sae.state_dict())
    with pytest.raises(ActivationError, match="n_heads"):
        head_attribution(bare)
    torch.testing.assert_close(head_attribution(bare, 9, 64), a)
    assert a.shape == (1152, 9)
    torch.testing.assert_close(a.sum(-1), torch.ones(1152))
    i = 5
    ref = sae.W_dec[i].view(9, 64).norm(dim=-1)
    torch.testing.assert_close(a[i], ref / ref.sum())
    ids = next(packed_batches(model.tokenizer, default_corpus(seed=5), seq_len=32, batch_size=2, bos_id=1))
    with torch.no_grad():
        f = sae.encode(model_activations(model, LAYER, "z", ids)[:, 1:].reshape(-1, 576))
    lat = int((f > 0).sum(0).argmax())
    rows = top_activating(model, sae, LAYER, [ids], [lat], n=3)
    assert len(rows) == 3 and rows[0]["activation"] == pytest.approx(float(f[:, lat].max()), rel=1e-5)
    assert "[[" in rows[0]["context"]
    # batches of different lengths (a prompt beside corpus windows) are searched together
    short = ids[:1, :9]
    both = top_activating(model, sae, LAYER, [short, ids], [lat], n=3)
    assert both[0]["activation"] >= rows[0]["activation"] - 1e-6 and all("[[" in r["context"] for r in both)


# ---- bad input ---------------------------------------------------------------------------
def test_bad_inputs(model, tmp_path, z_store):
    with pytest.raises(Exception, match="layer"):
        model_activations(model, 30, "z", torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(SAEConfigError, match="k=2000"):
        SAEConfig(d_in=576, d_sae=1152, arch="topk", k=2000)
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(CorpusError, match="empty"):
        load_texts(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(CorpusError, match="not text"):
        load_texts(tmp_path / "bin.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 1}\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        load_texts(tmp_path / "bad.jsonl")
    (tmp_path / "ok.jsonl").write_text('{"text": "hello there"}\n\n{"text": "general"}\n')
    assert load_texts(tmp_path / "ok.jsonl") == ["hello there", "general"]


def test_saved_dataset_dict_reads_its_train_split(tmp_path):
    """A saved DatasetDict: its 'train' split (not the first name in order, 'test'), its only split, or
    a clear refusal when there are several and none is 'train'."""
    datasets = pytest.importorskip("datasets")
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [f"train doc {i}" for i in range(5)]}),
                              "test": datasets.Dataset.from_dict({"text": ["test doc 0", "test doc 1"]})})
    d.save_to_disk(str(tmp_path / "both"))
    assert load_texts(tmp_path / "both") == [f"train doc {i}" for i in range(5)]
    datasets.DatasetDict({"validation": d["test"]}).save_to_disk(str(tmp_path / "one"))
    assert load_texts(tmp_path / "one") == ["test doc 0", "test doc 1"]
    datasets.DatasetDict({"a": d["train"], "b": d["test"]}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(CorpusError, match="none is named 'train'"):
        load_texts(tmp_path / "two")


def test_user_corpus_held_out_split(tmp_path):
    """sae train reads the train side of a user corpus and sae eval the held-out side: disjoint,
    independent of file order, duplicates on one side, every document on one side."""
    from headscope.sae.corpus import split_documents

    docs = [f"document number {i} about topic {i % 7}." for i in range(200)] + ["a repeated document."] * 3
    train, held = split_documents(docs)
    assert held and set(train).isdisjoint(held) and sorted(train + held) == sorted(docs)
    assert 0.02 < len(held) / len(docs) < 0.10  # about 1 in 20
    assert split_documents(docs[::-1]) == (train[::-1], held[::-1])  # order does not pick the side
    assert docs.count("a repeated document.") in (train.count("a repeated document."),
                                                  held.count("a repeated document."))
    assert split_documents(["x", "y"])[1] in (["x"], ["y"])  # small corpora still hold one out
    assert split_documents(["same", "same"]) == (["same", "same"], [])
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    seen_train = set(itertools.islice(corpus_texts(tmp_path / "c.txt", split="train"), 400))
    seen_held = set(itertools.islice(corpus_texts(tmp_path / "c.txt", split="held_out"), 50))
    assert seen_train == set(train) and seen_held == set(held)
    with pytest.raises(CorpusError, match="held-out"):
        next(corpus_texts(None, split="held_out"))
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(CorpusError, match="single distinct"):
        next(corpus_texts(tmp_path / "one.txt", split="held_out"))


def test_cli_eval_reads_the_held_out_documents(tmp_path, capsys, monkeypatch):
    from headscope.apps import sae_cli
    from headscope.sae import corpus

    docs = [f"Paragraph {i}: the {['red', 'blue', 'green'][i % 3]} boat left port {i} at dawn." for i in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    read = {}
    real = corpus.corpus_texts

    def spy(path, *, seed=0, text_field="text", split="all"):
        it = real(path, seed=seed, text_field=text_field, split=split)
        for d in it:
            read.setdefault(split, set()).add(d)
            yield d

    monkeypatch.setattr(corpus, "corpus_texts", spy)
    common = ["--layer", "3", "--k", "8", "--expansion", "1", "--batch-size", "128", "--model-batch", "4",
              "--seq-len", "32", "--quiet", "--corpus", str(tmp_path / "c.txt")]
    assert sae_cli.main(["sae", "train", *common, "--tokens", "512", "--out", str(tmp_path / "s")]) == 0
    eval_args = ["--corpus", str(tmp_path / "c.txt"), "--batches", "1", "--model-batch", "2", "--seq-len", "32",
                 "--top-latents", "1", "--quiet"]
    assert sae_cli.main(["sae", "eval", str(tmp_path / "s"), *eval_args]) == 0
    assert read["train"] and read["held_out"] and read["train"].isdisjoint(read["held_out"])
    assert json.loads((tmp_path / "s" / "eval.json").read_text())["split"] == "held_out"
    (tmp_path / "one.txt").write_text("only one document")
    capsys.readouterr()
    assert sae_cli.main(["sae", "eval", str(tmp_path / "s"), "--corpus", str(tmp_path / "one.txt")]) == 2
    assert "--split all" in capsys.readouterr().err


def test_cli_bad_inputs_leave_files_alone(tmp_path, capsys):
    from headscope.apps.sae_cli import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["sae", "train", "--layer", "3", "--out", str(out), "--tokens", "2048"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    # an --out that is a file: a clean refusal (a NotADirectoryError traceback before)
    assert main(["sae", "train", "--layer", "3", "--out", str(out / "keep.txt"), "--tokens", "2048"]) == 2
    assert "not a directory" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["sae", "train", "--layer", "30", "--out", str(tmp_path / "a"), "--tokens", "2048"]) == 2
    assert "layer" in capsys.readouterr().err
    assert main(["sae", "train", "--layer", "3", "--k", "100000", "--expansion", "1", "--out", str(tmp_path / "b"),
                 "--tokens", "2048"]) == 2
    assert "k=100000" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert main(["sae", "train", "--layer", "3", "--corpus", str(tmp_path / "empty.txt"), "--out",
                 str(tmp_path / "c"), "--tokens", "2048"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["sae", "eval", str(tmp_path / "nothing")]) == 2
    assert "cfg.json" in capsys.readouterr().err
    # options that would train something else than asked: refused before any work
    assert main(["sae", "train", "--layer", "3", "--arch", "relu", "--out", str(tmp_path / "d")]) == 2
    assert "--sparsity-coeff" in capsys.readouterr().err
    assert main(["sae", "train", "--layer", "3", "--arch", "topk", "--sparsity-coeff", "0.1",
                 "--out", str(tmp_path / "d")]) == 2
    assert "does not apply" in capsys.readouterr().err
    assert main(["sae", "train", "--layer", "3", "--tokens", "1000", "--out", str(tmp_path / "d")]) == 2
    assert "fewer than one batch" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_refuses_an_activation_cache_collected_otherwise(tmp_path, capsys):
    """--acts-dir is reused only for the same model, layer, site, corpus, seq_len, tokens and seed."""
    from headscope.apps.sae_cli import main

    common = ["sae", "train", "--layer", "3", "--k", "8", "--expansion", "1", "--batch-size", "128",
              "--model-batch", "4", "--tokens", "512", "--acts-dir", str(tmp_path / "acts"), "--quiet"]
    assert main([*common, "--seq-len", "32", "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--seq-len", "32", "--out", str(tmp_path / "b")]) == 0  # same settings: reused
    capsys.readouterr()
    assert main([*common, "--seq-len", "64", "--out", str(tmp_path / "c")]) == 2
    assert "'seq_len': (32, 64)" in capsys.readouterr().err


def test_store_saved_elsewhere_after_spilling_holds_every_shard(tmp_path):
    """save(other folder) after the store spilled to its spill_dir copies the spilled shards (it wrote
    only a manifest, and open() then refused the folder)."""
    x = torch.randn(450, 4)
    st = ActivationStore(d_in=4, shard_tokens=100, max_memory_tokens=150, spill_dir=tmp_path / "spill")
    st.add(x)
    st.finish()
    back = ActivationStore.open(st.save(tmp_path / "saved"))
    assert back.n_shards == 4
    torch.testing.assert_close(torch.cat([back.shard(i) for i in range(4)]), x[:400])


def test_store_refuses_a_batch_larger_than_its_shard_groups():
    st = ActivationStore(d_in=4, shard_tokens=100)
    st.add(torch.randn(100, 4))
    st = st.finish()
    with pytest.raises(ActivationError, match="smaller batch size"):
        next(st.batches(128))
    assert next(st.batches(64)).shape == (64, 4)




def test_checkpoint_from_other_run_or_corrupted_is_refused(tmp_path):
    st = _synthetic_store(n=2048)
    cfg = SAEConfig(d_in=32, d_sae=64, arch="topk", k=4, model="model-a")
    tc = TrainConfig(total_tokens=2048, batch_size=128, checkpoint_every=4)
    train(new_sae(cfg, st, tc), st, tc, out_dir=tmp_path, progress=False)
    ck = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "LATEST").read_text()
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    other = SAEConfig(d_in=32, d_sae=64, arch="topk", k=4, model="model-b")
    with pytest.raises(CheckpointError, match="model"):
        train(new_sae(other, st, tc), st, tc, out_dir=tmp_path, resume=True, progress=False)
    assert before == {p.name: p.read_bytes() for p in ck.iterdir()}  # nothing overwritten
    # any training setting that changes the trajectory is another run too (not just seed / lr / size)
    import dataclasses
    for change in (dict(sparsity_coeff=0.1), dict(mix_shards=2), dict(warmup_frac=0.1)):
        with pytest.raises(CheckpointError, match=next(iter(change))):
            tc2 = dataclasses.replace(tc, **change)
            train(new_sae(cfg, st, tc2), st, tc2, out_dir=tmp_path, resume=True, progress=False)
    tc3 = dataclasses.replace(tc, checkpoint_every=8)  # bookkeeping only: resumes
    train(new_sae(cfg, st, tc3), st, tc3, out_dir=tmp_path, resume=True, progress=False)
    (ck / "sae.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        train(new_sae(cfg, st, tc), st, tc, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(new_sae(cfg, st, tc), st, tc, out_dir=tmp_path / "none", resume=True, progress=False)


def test_save_load_roundtrip_all_architectures(tmp_path):
    x = torch.randn(8, 12)
    for arch in ("relu", "topk", "batchtopk", "jumprelu"):
        s = _rand_sae(arch).eval()
        if arch == "batchtopk":
            s.threshold.fill_(0.05)
        save_sae(s, tmp_path / arch, log_sparsity=torch.zeros(40))
        back = load_sae(tmp_path / arch)
        torch.testing.assert_close(back(x)["x_hat"], s(x)["x_hat"])
        assert json.loads((tmp_path / arch / "cfg.json").read_text())["d_sae"] == 40


def test_packed_rows_have_bos_only_at_their_start():
    class BosAddingTokenizer:  # as Llama's: BOS first unless add_special_tokens=False
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 50 for c in text]}

    batches = list(packed_batches(BosAddingTokenizer(), ["hello world"] * 30, seq_len=16, batch_size=4, bos_id=1))
    rows = torch.cat(batches)
    assert rows.shape[1] == 16 and len(rows) >= 16
    assert (rows[:, 0] == 1).all() and (rows[:, 1:] != 1).all()
    assert (rows == 2).sum() >= 20  # documents stay separated by EOS


def test_batchtopk_threshold_is_calibrated_on_the_final_weights():
    """After training, the inference threshold is the mean of the batches' smallest kept activation
    under the final weights, so held-out inference keeps ~k latents per token (the running estimate
    of training alone gave L0 3.8 for k = 8 after these 60 steps)."""
    g = torch.Generator().manual_seed(0)
    D = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    idx = torch.stack([torch.randperm(64, generator=g)[:3] for _ in range(12288)])
    x = ((torch.rand(12288, 3, generator=g) * 2 + 0.5)[:, :, None] * D[idx]).sum(1) + 0.3
    st = ActivationStore(d_in=32, shard_tokens=2048)
    st.add(x[:8192])
    st.finish()
    cfg = SAEConfig(d_in=32, d_sae=128, arch="batchtopk", k=8, dead_tokens=4096)
    tc = TrainConfig(total_tokens=256 * 60, batch_size=256, lr=3e-3, b_dec_init="mean")
    sae = train(new_sae(cfg, st, tc), st, tc, progress=False).sae
    with torch.no_grad():
        l0 = float((sae.encode(x[8192:]) > 0).float().sum(-1).mean())
    assert 7.0 < l0 < 9.0, l0
    calib = st.batches(256, seed=tc.seed + 1, mix_shards=tc.mix_shards)
    mins = []
    with torch.no_grad():
        for _ in range(32):
            r = sae.pre_acts(next(calib)).clamp_min(0).flatten()
            mins.append(r.sort(descending=True).values[8 * 256 - 1])
    assert float(sae.threshold) == pytest.approx(float(torch.stack(mins).mean()), rel=1e-5)
    with pytest.raises(SAEConfigError, match="batchtopk"):
        _rand_sae("topk").calibrate_threshold([x[:10]])
