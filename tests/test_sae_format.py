"""SAELens on-disk format against files written by sae-lens 6.54.12 itself
(tests/data/saelens/, produced by benchmarks/saelens_interop.py --write-test-data)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from headscope.sae.architectures import SAE, SAEConfig
from headscope.sae.saelens_format import SAEFormatError, load_sae, load_sparsity, save_sae

DATA = Path(__file__).parent / "data" / "saelens"
X = load_file(str(DATA / "inputs.safetensors"))["x"]


@pytest.mark.parametrize("name,arch", [("saelens_topk", "topk"), ("saelens_standard", "relu"),
                                       ("saelens_jumprelu", "jumprelu")])
def test_reads_what_saelens_saved(name, arch):
    sae = load_sae(DATA / name)
    assert sae.cfg.arch == arch and (sae.cfg.d_in, sae.cfg.d_sae) == (16, 32)
    exp = load_file(str(DATA / name / "expected.safetensors"))
    with torch.no_grad():
        out = sae(X)
    torch.testing.assert_close(out["f"], exp["f"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_hat"], exp["x_hat"], atol=1e-5, rtol=1e-5)
    if arch == "topk":
        assert sae.cfg.k == 4


@pytest.mark.parametrize("name", ["ours_topk", "ours_relu"])
def test_what_we_save_is_what_saelens_read(name, tmp_path):
    """Re-saving the stored SAE with today's code gives the files SAELens loaded, and SAELens'
    outputs on them equal ours."""
    sae = load_sae(DATA / name)
    save_sae(sae, tmp_path / name, log_sparsity=load_sparsity(DATA / name))
    for f in ("sae_weights.safetensors", "sparsity.safetensors"):
        a, b = load_file(str(DATA / name / f)), load_file(str(tmp_path / name / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    old, new = json.loads((DATA / name / "cfg.json").read_text()), json.loads((tmp_path / name / "cfg.json").read_text())
    for key in ("architecture", "d_in", "d_sae", "apply_b_dec_to_input", "normalize_activations", "k"):
        assert old.get(key) == new.get(key), key
    theirs = load_file(str(DATA / f"{name}_saelens_out.safetensors"))
    with torch.no_grad():
        out = sae(X)
    torch.testing.assert_close(out["x_hat"], theirs["x_hat"], atol=1e-5, rtol=1e-5)


def test_cfg_keys_saelens_requires():
    cfg = json.loads((DATA / "ours_topk" / "cfg.json").read_text())
    ref = json.loads((DATA / "saelens_topk" / "cfg.json").read_text())
    assert set(ref) - set(cfg) <= set(), set(ref) - set(cfg)  # every key SAELens writes, we write
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"


def test_pre_6_config_and_bad_files(tmp_path):
    s = SAE(SAEConfig(d_in=16, d_sae=32, arch="topk", k=3)).eval()
    save_sae(s, tmp_path / "old")
    cfg = json.loads((tmp_path / "old" / "cfg.json").read_text())
    old = {"d_in": 16, "d_sae": 32, "hook_point": "blocks.4.attn.hook_z", "model_name": "gpt2",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "architecture": "standard"}
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(old))
    back = load_sae(tmp_path / "old")
    assert (back.cfg.arch, back.cfg.k, back.cfg.layer, back.cfg.site, back.cfg.model) == ("topk", 3, 4, "z", "gpt2")
    torch.testing.assert_close(back(X)["x_hat"], s(X)["x_hat"])
    (tmp_path / "old" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="no cfg.json"):
        load_sae(tmp_path / "missing")
    (tmp_path / "old" / "sae_weights.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SAEFormatError, match="corrupted"):
        load_sae(tmp_path / "old")
    save_sae(SAE(SAEConfig(d_in=8, d_sae=32, arch="topk", k=3)), tmp_path / "shape")
    c = json.loads((tmp_path / "shape" / "cfg.json").read_text())
    c["headscope"]["d_in"] = c["d_in"] = 16
    (tmp_path / "shape" / "cfg.json").write_text(json.dumps(c))
    with pytest.raises(SAEFormatError, match="W_enc"):
        load_sae(tmp_path / "shape")
    with pytest.raises(SAEFormatError, match="refusing to overwrite"):
        save_sae(s, tmp_path / "shape", overwrite=False)
    # a hook we would read at another place (our "resid" site is resid_post)
    pre = dict(old, hook_point="blocks.4.hook_resid_pre")
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "cfg.json").write_text(json.dumps(pre))
    with pytest.raises(SAEFormatError, match="hook_resid_pre"):
        load_sae(tmp_path / "pre")
    # one head's SAE (SAELens hook_head_index): headscope SAEs read every head of a layer
    old["hook_head_index"] = 2
    (tmp_path / "head").mkdir()
    (tmp_path / "head" / "cfg.json").write_text(json.dumps(old))
    with pytest.raises(SAEFormatError, match="hook_head_index=2"):
        load_sae(tmp_path / "head")
    # a BatchTopK SAE before training has no threshold; saving it would reload as a plain ReLU SAE
    with pytest.raises(SAEFormatError, match="threshold"):
        save_sae(SAE(SAEConfig(d_in=16, d_sae=32, arch="batchtopk", k=3)), tmp_path / "btk")


def test_overwrite_leaves_no_stale_sparsity(tmp_path):
    """Saving another SAE over a directory without log_sparsity must not leave the old SAE's
    sparsity.safetensors behind: load_sparsity would describe the wrong SAE (or the wrong d_sae)."""
    a = SAE(SAEConfig(d_in=16, d_sae=32, arch="topk", k=3))
    save_sae(a, tmp_path / "d", log_sparsity=torch.full((32,), -2.0))
    assert load_sparsity(tmp_path / "d").shape == (32,)
    save_sae(SAE(SAEConfig(d_in=16, d_sae=64, arch="topk", k=3)), tmp_path / "d")
    assert load_sparsity(tmp_path / "d") is None
    assert load_sae(tmp_path / "d").cfg.d_sae == 64
