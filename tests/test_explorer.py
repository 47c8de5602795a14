"""The Streamlit head explorer, driven in-process with streamlit.testing.v1.AppTest.

Every number the pages show is checked against an independent plain-torch computation: attention
probabilities from the recorded post-RoPE q and k (softmax(q k^T / sqrt(d)) with a causal mask),
and head ablation through a hook on the output projection's input, not headscope's edit path.
"""

from __future__ import annotations

import base64
import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from headscope.apps import explorer_state as S
from headscope.apps.explore import ExploreError, add_explore_parser, run_explore, streamlit_command
from headscope.apps.explorer_figures import head_map
from headscope.circuits.scores import head_scores

APP = str(Path(__file__).resolve().parents[1] / "apps" / "explorer_app.py")
PROMPT = "The cat sat on the mat. The cat sat on the"


@pytest.fixture()
def app():
    from streamlit.testing.v1 import AppTest

    def make(page="Head map", prompt=PROMPT, layer=0, head=0, report=""):
        at = AppTest.from_file(APP, default_timeout=180)
        at.session_state["page"] = page
        at.session_state["prompt"] = prompt
        at.session_state["sel_layer"] = layer
        at.session_state["sel_head"] = head
        at.session_state["report_dir"] = report
        return at.run()
    return make


def errors(at) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]  # never a stack trace
    return [e.value for e in at.error]


def figure_data(at, index=0) -> list[dict]:
    """The traces of the index-th plotly chart on the page, typed arrays decoded."""
    spec = json.loads(at.get("plotly_chart")[index].proto.spec)

    def decode(v):
        if isinstance(v, dict) and "bdata" in v:
            arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
            shape = [int(n) for n in str(v.get("shape", len(arr))).split(",")]
            return arr.reshape(shape)
        if isinstance(v, dict):
            return {k: decode(x) for k, x in v.items()}
        try:
            return np.array(v, dtype=float) if isinstance(v, list) else v
        except (TypeError, ValueError):
            return v
    return [{k: decode(v) for k, v in trace.items()} for trace in spec["data"]]


# ---- independent references -----------------------------------------------------------------
def ids_of(model, prompt=PROMPT):
    return model.tokenize(prompt, prepend_bos=True)["input_ids"]


def reference_probs(model, ids, layer) -> torch.Tensor:
    """[H, S, S] softmax(q k^T / sqrt(d)) of one layer from its recorded q, k, causal mask."""
    _, rec = model.run_recorded(ids, None, None, qkv=[layer], stop_after_layer=layer)
    q, k = rec.q[0, 0].double(), rec.k[0, 0].double()  # [H, S, D], [Hkv, S, D]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    S_ = s.shape[-1]
    s = s.masked_fill(~torch.ones(S_, S_, dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, dim=-1)


def reference_next_probs(model, ids, heads=(), mode="zero") -> torch.Tensor:
    """Next-token probabilities with heads ablated by a hook on o_proj's input (z concatenated)."""
    D, H = model.meta.head_dim, model.meta.n_heads
    handles, captured = [], {}
    for layer in {l for l, _ in heads}:
        hs = [h for l, h in heads if l == layer]
        attn = model.attention_modules[layer]
        # v of this forward (earlier ablations change it), captured from v_proj's output.
        handles.append(attn.v_proj.register_forward_hook(
            lambda mod, args, out, layer=layer: captured.__setitem__(layer, out[0])))

        def pre(module, args, hs=hs, layer=layer):
            x = args[0].clone()
            for h in hs:
                if mode == "zero":
                    x[..., h * D:(h + 1) * D] = 0.0
                else:  # uniform attention over keys 0..i: running mean of the head's v
                    g = h // (H // model.meta.n_kv_heads)
                    v = captured[layer][:, g * D:(g + 1) * D]
                    x[0, :, h * D:(h + 1) * D] = v.cumsum(0) / torch.arange(1, v.shape[0] + 1)[:, None]
            return (x,)
        handles.append(attn.o_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids, use_cache=False).logits[0, -1].double()
    finally:
        for h in handles:
            h.remove()
    return torch.softmax(logits, -1)


@pytest.fixture()
def report_dir(tmp_path, model):
    """A report written by `headscope rank`'s own writer, so a format change there shows up here."""
    from headscope.apps.rank_output import write_heads
    from headscope.circuits.scores import DetectorResult, Validation

    rng = np.random.default_rng(0)
    grids = {"induction": rng.random((30, 9)), "sink": rng.random((30, 9))}
    results = {k: DetectorResult(k, head_scores(k, g)) for k, g in grids.items()}
    results["induction"].validation = Validation("induction", 8, "loss", 2.5, [0.1, 0.1], 3.0)
    write_heads(tmp_path, model.meta, results)
    return tmp_path, grids


# ---- head map -----------------------------------------------------------------------------------
def test_head_map_from_report_and_head_selection(app, report_dir):
    path, grids = report_dir
    at = app(report=str(path), layer=4, head=7)
    assert errors(at) == []
    assert at.radio(key="kind").options == ["induction", "sink"]
    assert not at.checkbox(key="prompt_maps").value  # a report alone does not load the model
    trace = figure_data(at)[0]
    np.testing.assert_allclose(trace["marker"]["color"], grids["induction"].ravel())
    assert at.metric[0].value == f"{grids['induction'][4, 7]:.4f}"
    top = at.dataframe[0].value
    best = np.unravel_index(np.argmax(grids["induction"]), (30, 9))
    assert (top["layer"][0], top["head"][0]) == best
    assert "25.0x the damage" in at.caption[-1].value

    (path / "heads.json").unlink()  # heads.csv alone is enough
    at = app(report=str(path), layer=4, head=7)
    assert errors(at) == [] and at.metric[0].value == f"{grids['induction'][4, 7]:.4f}"

    at.radio(key="kind").set_value("sink").run()
    assert at.metric[0].value == f"{grids['sink'][4, 7]:.4f}"
    # the report rewritten in place (a new `headscope rank --out` run): a fresh session shows it
    csv = path / "heads.csv"
    df = pd.read_csv(csv)
    df.loc[(df["kind"] == "sink") & (df["layer"] == 4) & (df["head"] == 7), "score"] = 0.123456
    df.to_csv(csv, index=False)
    at2 = app(report=str(path), layer=4, head=7)
    at2.radio(key="kind").set_value("sink").run()
    assert at2.metric[0].value == "0.1235"
    at.sidebar.number_input(key="sel_layer").set_value(30).run()
    assert any("invalid head selection" in e and "layer 30" in e for e in errors(at))


def test_bad_report_dir_is_an_in_page_error(app, tmp_path):
    at = app(report=str(tmp_path / "nowhere"))
    assert any("no rank report" in e for e in errors(at))
    (tmp_path / "heads.json").write_text("{not json")
    at = app(report=str(tmp_path))
    assert any("cannot read rank report" in e for e in errors(at))


def test_clicked_point_selects_that_head():
    grid = np.arange(30 * 9, dtype=float).reshape(30, 9)
    trace = head_map(grid, "t").data[0]
    i = 17 * 9 + 5  # plotly reports the clicked marker's x (layer) and y (head)
    assert S.point_to_head({"x": trace.x[i], "y": trace.y[i], "point_index": i}) == (17, 5)
    assert trace.marker.color[i] == grid[17, 5]
    assert S.point_to_head({"curveNumber": 0}) is None


def test_unscored_heads_are_drawn_apart_from_low_scores():
    """NaN heads were filled markers in the colour trace (drawn dark grey next to Viridis's dark low
    end); they are now a separate trace of open squares, and the colour trace holds scores only."""
    grid = np.arange(30 * 9, dtype=float).reshape(30, 9)
    grid[2] = np.nan
    fig = head_map(grid, "t")
    scored, unscored = fig.data
    assert np.isfinite(np.asarray(scored.marker.color, float)).all() and len(scored.x) == 29 * 9
    assert set(unscored.x) == {2} and len(unscored.y) == 9 and unscored.marker.symbol == "square-open"
    i = list(zip(scored.x, scored.y)).index((17, 5))
    assert scored.marker.color[i] == grid[17, 5]


def test_prompt_maps_match_materialised_attention(app, model):
    at = app()
    assert errors(at) == []
    assert at.radio(key="kind").options[:3] == ["prompt: sink mass", "prompt: previous-token mass", "prompt: entropy"]
    ids = ids_of(model)
    layer = 6
    p = reference_probs(model, ids, layer)  # [H, S, S]
    later = slice(1, None)
    ref = {"prompt: sink mass": p[:, later, 0].mean(-1),
           "prompt: previous-token mass": torch.diagonal(p, offset=-1, dim1=1, dim2=2).mean(-1),
           "prompt: entropy": -(p * p.clamp_min(1e-300).log()).sum(-1)[:, later].mean(-1)}
    for kind, expected in ref.items():
        at.radio(key="kind").set_value(kind).run()
        grid = figure_data(at)[0]["marker"]["color"].reshape(30, 9)
        np.testing.assert_allclose(grid[layer], expected.numpy(), atol=1e-4, err_msg=kind)


# ---- attention pattern --------------------------------------------------------------------------
def test_pattern_view_equals_softmax_of_q_k(app, model):
    at = app(page="Attention pattern", layer=3, head=5)
    assert errors(at) == []
    trace = figure_data(at)[0]
    ids = ids_of(model)
    expected = reference_probs(model, ids, 3)[5].numpy()
    got = np.nan_to_num(np.asarray(trace["z"], dtype=float), nan=0.0)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert trace["x"][0].startswith("0:") and len(trace["x"]) == ids.shape[1] == len(set(trace["x"]))

    at.toggle(key="force_stats").set_value(True).run()
    stats = at.dataframe[0].value
    assert errors(at) == [] and len(stats) == ids.shape[1]
    np.testing.assert_allclose(stats["sink_mass"], expected[:, 0], atol=1e-5)
    np.testing.assert_allclose(stats["prev_token_mass"][1:], np.diagonal(expected, -1), atol=1e-5)
    ent = -(expected * np.log(np.clip(expected, 1e-300, None))).sum(-1)
    np.testing.assert_allclose(stats["entropy"], ent, atol=1e-4)
    np.testing.assert_array_equal(stats["argmax"], expected.argmax(-1))


def test_pattern_page_means_equal_the_prompt_map(app, model):
    """Both views average over positions 1.. (position 0 attends only to itself)."""
    at = app(page="Attention pattern", layer=3, head=5)
    at.toggle(key="force_stats").set_value(True).run()
    assert errors(at) == []
    ids = ids_of(model)
    maps = S.prompt_head_means(model, ids)
    key = next(k for k in maps if "entropy" in k)
    assert at.metric[0].value == f"{maps[key][3, 5]:.3f}"


def test_long_prompt_gets_statistics_view(app, model):
    prompt = " ".join(f"word{i % 37}" for i in range(200))
    n = ids_of(model, prompt).shape[1]
    assert S.PATTERN_MAX_TOKENS < n <= S.DEFAULT_MAX_TOKENS
    at = app(page="Attention pattern", prompt=prompt, layer=1, head=2)
    assert errors(at) == []
    assert any("statistics" in i.value for i in at.info)
    assert len(at.dataframe[0].value) == n
    charts = at.get("plotly_chart")
    assert len(charts) == 1 and {t.get("type") for t in json.loads(charts[0].proto.spec)["data"]} == {"scatter"}


@pytest.mark.parametrize("prompt,message", [("   ", "prompt is empty"),
                                            ("token " * 2500, "the explorer runs at most 2048")])
def test_bad_prompts_are_in_page_errors(app, prompt, message):
    for page in ("Attention pattern", "Head map"):
        at = app(page=page, prompt=prompt)
        assert any(message in e for e in errors(at)), (page, errors(at))


def test_invalid_head_selection_on_pattern_page(app):
    at = app(page="Attention pattern", layer=30, head=0)
    assert any("layer 30 is out of range" in e for e in errors(at))
    at = app(page="Attention pattern", layer=2, head=-1)
    assert any("head -1 is out of range" in e for e in errors(at))


# ---- interventions ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zero ablation", "uniform ablation"])
def test_ablation_next_token_table_matches_hooked_reference(app, model, mode):
    at = app(page="Intervene", layer=3, head=2)
    assert at.text_input(key="iv_heads").value == "3.2"
    at.text_input(key="iv_heads").set_value("3.2, L10H4").run()
    at.radio(key="iv_mode").set_value(mode).run()
    at.button(key="iv_run").click().run()
    assert errors(at) == []
    table = at.dataframe[0].value
    ids = ids_of(model)
    before = reference_next_probs(model, ids)
    after = reference_next_probs(model, ids, [(3, 2), (10, 4)], mode=mode.split()[0])
    tok = torch.as_tensor(table["token_id"].to_numpy().copy())
    np.testing.assert_allclose(table["p_before"], before[tok].numpy(), atol=1e-5)
    np.testing.assert_allclose(table["p_after"], after[tok].numpy(), atol=1e-5)
    assert set(before.topk(10).indices.tolist()) | set(after.topk(10).indices.tolist()) == set(tok.tolist())
    assert float(at.metric[0].value) == pytest.approx(S.kl_divergence(before, after), rel=1e-2)
    assert float(np.abs(table["change"]).max()) > 1e-4  # the intervention did something


@pytest.mark.parametrize("text,message", [("99.1", "layer 99 is out of range"), ("3.9", "head 9 is out of range"),
                                          ("three", "cannot read head"), (" ", "no heads selected")])
def test_bad_head_lists_are_in_page_errors(app, text, message):
    at = app(page="Intervene")
    at.text_input(key="iv_heads").set_value(text).run()
    at.button(key="iv_run").click().run()
    assert any(message in e for e in errors(at)), errors(at)


def next_probs_with_head_input(model, ids, layer, head, fn) -> torch.Tensor:
    """Next-token probabilities [V] with one head's D columns of o_proj's input (its z, [S, D])
    replaced by fn(z), through a plain pre-hook: the reference for the Intervene page's edits."""
    D = model.meta.head_dim

    def pre(mod, args):
        x = args[0].clone()
        x[0, :, head * D:(head + 1) * D] = fn(x[0, :, head * D:(head + 1) * D])
        return (x,)

    hook = model.attention_modules[layer].o_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return torch.softmax(model.hf(input_ids=ids, use_cache=False).logits[0, -1].double(), -1)
    finally:
        hook.remove()


def act_sinks(p: torch.Tensor) -> torch.Tensor:
    """[H, S] bool ACT sinks of one layer's probabilities [H, S, S]: colsum_j / (S - j) > 0.1, first skipped."""
    S_ = p.shape[-1]
    sinks = p.sum(1) / torch.arange(S_, 0, -1) > 0.1
    for h in range(p.shape[0]):
        first = sinks[h].nonzero()
        if len(first):
            sinks[h, first[0, 0]] = False
    return sinks


def test_act_calibration_matches_formula_on_materialised_attention(app, model):
    ids = ids_of(model)
    # A head with a sink beyond the first on this prompt, so calibration changes something.
    layer, head = next((l, h) for l in range(1, 12) for h in range(9) if act_sinks(reference_probs(model, ids, l))[h].any())
    p = reference_probs(model, ids, layer)[head]
    sinks = act_sinks(reference_probs(model, ids, layer))[head]
    beta, mass = 0.4, p[:, sinks].sum(-1, keepdim=True)
    p_cal = torch.where(sinks[None, :], beta * p, p * (1 - beta * mass) / (1 - mass))
    _, rec = model.run_recorded(ids, None, None, qkv=[layer], stop_after_layer=layer)
    v = rec.v[0, 0, head // (9 // 3)].double()
    z = (p_cal @ v).float()
    expected = next_probs_with_head_input(model, ids, layer, head, lambda cols: z)

    at = app(page="Intervene", layer=layer, head=head)
    at.radio(key="iv_mode").set_value("ACT calibration").run()
    assert at.slider(key="iv_beta").value == 0.4
    at.button(key="iv_run").click().run()
    assert errors(at) == []
    scaled = at.dataframe[0].value["sink tokens scaled"][0]
    assert [int(t.split(":")[0]) for t in scaled.split(", ")] == sinks.nonzero()[:, 0].tolist()
    table = at.dataframe[1].value
    tok = torch.as_tensor(table["token_id"].to_numpy().copy())
    np.testing.assert_allclose(table["p_after"], expected[tok].numpy(), atol=1e-5)
    assert float(np.abs(table["change"]).max()) > 1e-5

    at.slider(key="iv_beta").set_value(1.0).run()  # beta = 1 changes nothing
    at.button(key="iv_run").click().run()
    np.testing.assert_allclose(at.dataframe[1].value["change"], 0.0, atol=1e-6)


def test_value_edit_matches_attention_column_times_source_mean(app, model):
    """z_h += coeff * p[:, pos] * mean(source values), written into o_proj's input by a plain hook."""
    layer, head, pos, coeff = 6, 4, 3, 4.0
    source = "In 2009, the president of South Korea was"
    ids = ids_of(model)
    p = reference_probs(model, ids, layer)[head]  # [S, S]
    src = model.tokenize(source, prepend_bos=True)["input_ids"]
    _, rec = model.run_recorded(src, None, None, qkv=[layer], stop_after_layer=layer)
    delta = coeff * rec.v[0, 0, head // 3, 1:].double().mean(0)
    add = (p[:, pos, None] * delta).float()
    expected = next_probs_with_head_input(model, ids, layer, head, lambda cols: cols + add)

    at = app(page="Intervene", layer=layer, head=head)
    at.radio(key="iv_mode").set_value("value edit").run()
    at.text_input(key="iv_source").set_value(source).run()
    labels = at.selectbox(key="iv_pos").options
    assert at.selectbox(key="iv_pos").value == labels[-1]
    at.selectbox(key="iv_pos").set_value(labels[pos]).run()
    at.slider(key="iv_coeff").set_value(coeff).run()
    at.button(key="iv_run").click().run()
    assert errors(at) == []
    table = at.dataframe[0].value
    tok = torch.as_tensor(table["token_id"].to_numpy().copy())
    np.testing.assert_allclose(table["p_after"], expected[tok].numpy(), atol=1e-5)
    assert float(np.abs(table["change"]).max()) > 1e-4
    at.text_input(key="iv_source").set_value("").run()
    at.button(key="iv_run").click().run()
    assert any("has no tokens" in e for e in errors(at)), errors(at)


# ---- SAE latents ---------------------------------------------------------------------------------
@pytest.fixture()
def saved_sae(tmp_path):
    from headscope.sae.architectures import SAE, SAEConfig
    from headscope.sae.saelens_format import save_sae

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=9 * 64, d_sae=64, arch="topk", k=8, model="smollm2-135m-instruct", layer=2, site="z",
                        n_heads=9, head_dim=64))
    with torch.no_grad():
        sae.b_enc.add_(0.05)  # some latents fire on every token
    return save_sae(sae, tmp_path / "sae"), sae


def test_sae_page_latents_attribution_and_contexts(app, model, saved_sae):
    path, sae = saved_sae
    at = app(page="SAE latents")
    assert errors(at) == [] and any("Enter the directory" in i.value for i in at.info)
    at.text_input(key="sae_dir").set_value(str(path)).run()
    assert errors(at) == []
    assert "topk SAE" in at.caption[0].value and "64 latents" in at.caption[0].value
    # Independent encode: z of layer 2 from the recorder, (z - b_dec) W_enc + b_enc, relu, top-8.
    ids = ids_of(model)
    _, rec = model.run_recorded(ids, None, None, head_out=[2], stop_after_layer=2)
    x = rec.z(2)[0, 1:].reshape(ids.shape[1] - 1, -1).double()
    W_enc, b_enc, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = torch.relu((x - b_dec) @ W_enc + b_enc)
    v, i = pre.topk(8, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, i, v)
    latents = at.dataframe[0].value
    ref_best = f.max(0).values
    np.testing.assert_allclose(latents["max_activation"], ref_best.topk(10).values.numpy(), rtol=1e-4)

    top = int(latents["latent"][0])
    at.number_input(key="sae_latent").set_value(top).run()
    shares = figure_data(at)[0]["y"]
    norms = sae.W_dec.detach().reshape(64, 9, 64).norm(dim=-1)[top]
    np.testing.assert_allclose(shares, (norms / norms.sum()).numpy(), rtol=1e-5)
    at.number_input(key="sae_docs").set_value(0).run()
    at.button(key="sae_top").click().run()
    contexts = at.dataframe[1].value
    assert errors(at) == [] and contexts["activation"][0] == pytest.approx(float(ref_best[top]), rel=1e-4)
    assert "[[" in contexts["context"][0]
    # with corpus documents too (128-token windows beside the shorter prompt): no length clash
    at.number_input(key="sae_docs").set_value(2).run()
    at.button(key="sae_top").click().run()
    assert errors(at) == [] and at.dataframe[1].value["activation"][0] >= contexts["activation"][0] - 1e-6

    at.number_input(key="sae_latent").set_value(64).run()
    assert any("latent 64 is out of range" in e for e in errors(at))
    # the folder rewritten on disk (a new training run into it): the page reads it again
    import shutil

    from headscope.sae.architectures import SAE, SAEConfig
    from headscope.sae.saelens_format import save_sae
    shutil.rmtree(path)
    save_sae(SAE(SAEConfig(d_in=9 * 64, d_sae=32, arch="topk", k=8, model="smollm2-135m-instruct", layer=2,
                           site="z", n_heads=9, head_dim=64)), path)
    at.number_input(key="sae_latent").set_value(0).run()
    assert errors(at) == [] and "32 latents" in at.caption[0].value
    at.text_input(key="sae_dir").set_value(str(path.parent / "nothing")).run()
    assert errors(at)  # a missing SAE directory is an in-page error


# ---- the launcher --------------------------------------------------------------------------------
def test_explore_parser_and_launcher_errors(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    add_explore_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explore", "--report", str(tmp_path / "missing"), "--port", "8123"])
    assert args.func is run_explore and args.port == 8123
    with pytest.raises(ExploreError, match="no such directory"):
        run_explore(args)
    args = parser.parse_args(["explore", "--port", "70000"])
    with pytest.raises(ExploreError, match="not a TCP port"):
        run_explore(args)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:  # a port someone else listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = parser.parse_args(["explore", "--port", str(busy.getsockname()[1])])
        with pytest.raises(ExploreError, match="in use"):
            run_explore(args)
    cmd = streamlit_command(8123)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1" and cmd[cmd.index("--server.port") + 1] == "8123"
