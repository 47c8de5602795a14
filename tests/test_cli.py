"""`headscope rank` end to end: outputs and their schema, determinism, bad input, atomic reports,
and multi-process runs (torchrun, gloo) that match one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headscope.apps import rank as rank_mod
from headscope.apps.cli import main
from headscope.circuits import detectors
from headscope.circuits.detectors import DetectorConfig

import cli_fake_detectors as fakes

HERE = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent
SMALL = ["--seq-len", "16", "--n-prompts", "3", "--batch-size", "2", "--top-k", "4", "--n-random", "2", "--quiet"]


@pytest.fixture
def fake_registry(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))
    for kind, target in fakes.FAKES.items():
        monkeypatch.setitem(detectors._DETECTORS, kind, target)


@pytest.fixture
def shared_model(model, monkeypatch):
    """Reuse the session's model instead of loading it again in every CLI call."""
    monkeypatch.setattr(rank_mod, "load_model", lambda *a, **k: model)
    return model


def run_cli(*args) -> int:
    return main(["rank", *args])


def test_rank_writes_report_with_schema(tmp_path, fake_registry, shared_model, capsys):
    out = tmp_path / "report"
    assert run_cli("--detectors", "sink,previous_token", "--out", str(out), *SMALL) == 0
    assert sorted(p.name for p in out.iterdir()) == ["heads.csv", "heads.json", "report.html", "run.json"]
    doc = json.loads((out / "heads.json").read_text())
    assert {"model", "n_layers", "n_heads", "scores", "validation"} <= set(doc)
    assert (doc["n_layers"], doc["n_heads"]) == (30, 9)
    assert len(doc["scores"]) == 2 * 30 * 9
    for row in doc["scores"]:
        assert {"kind", "layer", "head", "score", "rank"} <= set(row)
    for kind in ("sink", "previous_token"):
        v = doc["validation"][kind]
        assert {"k", "top_k_damage", "random_k_damage", "metric"} <= set(v) and v["k"] == 4
        assert v["random_k_damage"] == pytest.approx(np.median(v["random_k_damage_all"]))
    # The JSON scores are the detector's own numbers, ranked: compare with a direct call.
    direct = fakes.fake_previous_token(shared_model, DetectorConfig(seq_len=16, n_prompts=3, batch_size=2, top_k=4,
                                                                    validate=False))
    got = pd.DataFrame([r for r in doc["scores"] if r["kind"] == "previous_token"])
    merged = got.merge(direct.scores, on=["layer", "head"], suffixes=("", "_direct"))
    np.testing.assert_allclose(merged["score"], merged["score_direct"], rtol=0, atol=1e-12)
    assert (merged["rank"] == merged["rank_direct"]).all()
    # The CSV holds the same rows.
    csv = pd.read_csv(out / "heads.csv")
    assert len(csv) == len(doc["scores"]) and set(csv["kind"]) == {"sink", "previous_token"}
    # One self-contained HTML: plotly.js inlined exactly once, one heatmap per kind, thumbnails, verdicts.
    html = (out / "report.html").read_text()
    assert html.count("plotly.js v") == 1 or html.count("* plotly.js") == 1
    assert "<script src=" not in html
    assert html.count("score of every head") == 2
    assert "attention of the top heads" in html and "Causal check" in html
    assert "sink_1_eps" in html
    printed = capsys.readouterr().out
    assert "previous_token:" in printed and "report:" in printed
    run = json.loads((out / "run.json").read_text())
    assert run["timing"]["total_s"] > 0


def test_same_seed_same_json_bytes(tmp_path, fake_registry, shared_model):
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, ("3", "3", "4")):
        assert run_cli("--detectors", "previous_token", "--no-validate", "--seed", seed, "--out", str(out), *SMALL) == 0
    a, b, c = ((o / "heads.json").read_bytes() for o in outs)
    assert a == b
    assert a != c  # the seed reaches the prompts


def test_config_file_and_flags(tmp_path, fake_registry, shared_model):
    cfg = tmp_path / "rank.toml"
    cfg.write_text('kinds = ["previous_token"]\nseq_len = 12\nn_prompts = 5\nseed = 5\ntop_k = 3\nvalidate = false\n'
                   f'out = "{tmp_path / "from_file"}"\n[detectors.previous_token]\nn_prompts = 2\n')
    flags = ["--config", str(cfg), "--quiet"]
    assert run_cli(*flags) == 0
    doc = json.loads((tmp_path / "from_file" / "heads.json").read_text())
    assert {r["kind"] for r in doc["scores"]} == {"previous_token"} and doc["validation"] == {}
    run = json.loads((tmp_path / "from_file" / "run.json").read_text())
    cfg_used = run["detector_configs"]["previous_token"]
    assert (cfg_used["seq_len"], cfg_used["n_prompts"], cfg_used["seed"], cfg_used["top_k"]) == (12, 2, 5, 3)
    # A flag overrides the file, its top level and its [detectors.<kind>] table alike.
    assert run_cli(*flags, "--seq-len", "10", "--n-prompts", "1", "--out", str(tmp_path / "flag")) == 0
    run = json.loads((tmp_path / "flag" / "run.json").read_text())
    assert (run["detector_configs"]["previous_token"]["seq_len"], run["detector_configs"]["previous_token"]["n_prompts"]) == (10, 1)


@pytest.mark.parametrize("case", ["unknown_detector", "seq_len_too_short", "seq_len_too_short_at_run",
                                  "unwritable_out", "missing_prompts", "binary_prompts", "bad_config",
                                  "model_cannot_load"])
def test_bad_input_message_and_exit_code(case, tmp_path, fake_registry, request, capsys):
    if case != "model_cannot_load":
        request.getfixturevalue("shared_model")
    out = tmp_path / "out"
    args = {
        "unknown_detector": ["--detectors", "sink,inductoin"],
        "seq_len_too_short": ["--detectors", "sink", "--seq-len", "4"],
        "seq_len_too_short_at_run": ["--detectors", "previous_token", "--seq-len", "2"],
        "unwritable_out": ["--detectors", "sink", "--out", str(tmp_path / "file.txt" / "report")],
        "missing_prompts": ["--detectors", "sink", "--prompts", str(tmp_path / "nope.txt")],
        "binary_prompts": ["--detectors", "sink", "--prompts", str(tmp_path / "bin.txt")],
        "bad_config": ["--config", str(tmp_path / "bad.toml")],
        "model_cannot_load": ["--detectors", "sink", "--model", str(tmp_path / "no_such_model")],
    }[case]
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (tmp_path / "bad.toml").write_text("seq_len = 8\ncolour = 'red'\n")
    expected = {"unknown_detector": "unknown detector 'inductoin'", "seq_len_too_short": "too short for the sink",
                "seq_len_too_short_at_run": "too short for previous_token", "unwritable_out": "cannot write the report",
                "missing_prompts": "does not exist", "binary_prompts": "not UTF-8", "bad_config": "unknown key(s) colour",
                "model_cannot_load": "does not exist"}[case]
    if "--out" not in args:
        args = args + ["--out", str(out)]
    capsys.readouterr()  # drop what loading the shared model printed (when this test runs first)
    code = run_cli(*SMALL, *args)
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.startswith("headscope rank: error:") and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_failure_midway_leaves_no_half_written_report(tmp_path, fake_registry, shared_model, monkeypatch):
    out = tmp_path / "report"
    assert run_cli("--detectors", "previous_token", "--no-validate", "--out", str(out), *SMALL) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(model, config):
        raise RuntimeError("detector crashed halfway")

    fakes.broken = broken
    monkeypatch.setitem(detectors._DETECTORS, "induction", "cli_fake_detectors:broken")
    with pytest.raises(RuntimeError, match="halfway"):
        run_cli("--detectors", "previous_token,induction", "--seed", "9", "--out", str(out), *SMALL)
    # The earlier report is untouched and no temporary directory is left beside it.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    # A fresh --out that fails is not created at all.
    with pytest.raises(RuntimeError):
        run_cli("--detectors", "induction", "--out", str(tmp_path / "fresh"), *SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_refuses_to_replace_a_directory_that_is_not_a_report(tmp_path, fake_registry, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert run_cli("--detectors", "sink", "--out", str(tmp_path / "mine"), *SMALL) == 2
    assert "does not hold a headscope report" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_refuses_to_replace_a_report_that_holds_other_files(tmp_path, fake_registry, capsys):
    """Replacing a report replaces its directory: files the user added there went with it, silently.
    Refused now; a plain report is replaced, and the command says so."""
    out = tmp_path / "report"
    assert run_cli("--detectors", "sink", "--out", str(out), *SMALL) == 0
    assert "replaced the earlier report" not in capsys.readouterr().out
    assert run_cli("--detectors", "sink", "--out", str(out), *SMALL) == 0
    assert "replaced the earlier report" in capsys.readouterr().out
    (out / "notes.txt").write_text("mine")
    assert run_cli("--detectors", "sink", "--out", str(out), *SMALL) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "heads.json").exists()


def test_inputs_a_late_detector_cannot_use_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """With the shipped detectors: a --seq-len too short for induction, or a plain-text prompt file
    for temporal (which reads jsonl facts), stopped the run only when that detector started, after
    the earlier ones' minutes of work, and wrote nothing. Both are refused before the model loads;
    detectors that do not read the prompt file say so."""
    from headscope.probe import loading
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run_cli("--detectors", "previous_token,induction", "--seq-len", "8", "--out", str(tmp_path / "a")) == 2
    assert "--seq-len 8 is too short for the induction detector: it needs at least 9" in capsys.readouterr().err
    txt = tmp_path / "my prompts.txt"
    txt.write_text("The cat sat on the mat.\nParis is in France.\n")
    assert run_cli("--detectors", "previous_token,temporal", "--prompts", str(txt), "--out", str(tmp_path / "b")) == 2
    assert "not a temporal fact" in capsys.readouterr().err
    assert run_cli("--detectors", "induction", "--prompts", str(txt), "--seq-len", "8",
                   "--out", str(tmp_path / "c")) == 2
    err = capsys.readouterr().err
    assert "induction does not read the prompt file" in err and "too short" in err
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_an_interrupted_command_says_what_it_left(tmp_path, capsys, monkeypatch):
    """sae train writes checkpoints as it goes: on Ctrl-C / SIGTERM it said "nothing was written", and
    the same command then refused the non-empty --out. rank stages its report, so nothing changed."""
    from headscope.apps import sae_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sae_cli, "cmd_train", interrupted)
    monkeypatch.setattr(sae_cli, "cmd_eval", interrupted)
    assert main(["sae", "train", "--layer", "3", "--out", str(tmp_path / "sae")]) == 130
    err = capsys.readouterr().err
    assert "checkpoints written so far stay in" in err and "--resume" in err and "nothing was written" not in err


def _torchrun(nproc: int, out: Path, extra: list[str], **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE), **env_extra}
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(HERE / "cli_fake_detectors.py"),
           "rank", "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_two_processes_match_one(tmp_path, shared_model, monkeypatch):
    """torchrun with 2 CPU processes (gloo) shards the prompts and merges sums: same scores, same
    validation, as a single process (run in this process). Stand-in sink (sums, gathered lists,
    sharded validation) and the shipped previous_token and induction detectors."""
    pytest.importorskip("headscope.circuits.detect_positional")
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setitem(detectors._DETECTORS, "sink", fakes.FAKES["sink"])
    settings = ["--detectors", "sink,previous_token,induction", "--seq-len", "12", "--n-prompts", "3", "--batch-size", "1",
                "--top-k", "3", "--n-random", "1", "--quiet", "--config", str(tmp_path / "small.toml")]
    (tmp_path / "small.toml").write_text("[detectors.previous_token]\nvalidation_prompts = 2\n"
                                         "[detectors.induction]\nvalidation_prompts = 2\nprefix_period = 4\n"
                                         "prefix_repeats = 2\n")
    assert run_cli("--out", str(tmp_path / "one"), *settings) == 0
    two = _torchrun(2, tmp_path / "two", settings)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "heads.json").read_text())
    b = json.loads((tmp_path / "two" / "heads.json").read_text())
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2
    sa = pd.DataFrame(a["scores"]).set_index(["kind", "layer", "head"]).sort_index()
    sb = pd.DataFrame(b["scores"]).set_index(["kind", "layer", "head"]).sort_index()
    np.testing.assert_allclose(sa["score"], sb["score"], rtol=0, atol=1e-6)
    assert sa["score"].std() > 0.01  # real, varied scores, not a constant both runs share
    # Per-prompt values gathered from both processes come back in prompt order.
    assert len(b["summary"]["sink"]["per_prompt"]) == 3
    np.testing.assert_allclose(a["summary"]["sink"]["per_prompt"], b["summary"]["sink"]["per_prompt"], atol=1e-6)
    for col in ("tl_mul", "tl_abs", "prefix_matching", "copying"):  # induction's sharded extra columns
        ia, ib = sa.loc["induction", col], sb.loc["induction", col]
        np.testing.assert_allclose(ia, ib, rtol=0, atol=1e-5)
        assert ia.std() > 1e-3, col
    for kind in ("sink", "previous_token", "induction"):
        # float32 losses: the processes run with 1 thread, this one with 2 (another reduction order).
        np.testing.assert_allclose(a["validation"][kind]["top_k_damage"], b["validation"][kind]["top_k_damage"],
                                   rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_shipped_sink(tmp_path, shared_model):
    """The shipped sink detector under torchrun: alpha and extra-sink sums merged, sink-token counts
    gathered in prompt order; same as one process."""
    pytest.importorskip("headscope.circuits.detect_sink")
    settings = ["--detectors", "sink", "--seq-len", "16", "--n-prompts", "3", "--batch-size", "1", "--top-k", "2",
                "--n-random", "1", "--quiet", "--config", str(tmp_path / "s.toml")]
    (tmp_path / "s.toml").write_text("[detectors.sink]\nvalidation_prompts = 1\ncompare_no_bos = false\n"
                                     "sink_threshold = 0.05\nmin_queries = 2\n")
    assert run_cli("--out", str(tmp_path / "one"), *settings) == 0
    two = _torchrun(2, tmp_path / "two", settings, HEADSCOPE_TEST_REAL_SINK="1")
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "heads.json").read_text())
    b = json.loads((tmp_path / "two" / "heads.json").read_text())
    sa, sb = (pd.DataFrame(d["scores"]).set_index(["layer", "head"]).sort_index() for d in (a, b))
    np.testing.assert_allclose(sa["score"], sb["score"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sa["extra_sinks"], sb["extra_sinks"], rtol=0, atol=1e-9)
    assert sa["score"].std() > 0.01 and sa["extra_sinks"].sum() > 0
    ea, eb = a["summary"]["sink"]["extra_sinks"], b["summary"]["sink"]["extra_sinks"]
    assert ea["top_tokens"] == eb["top_tokens"] and len(ea["top_tokens"]) > 0


def test_rank_with_the_real_sink_and_previous_token_detectors(tmp_path, shared_model, capsys):
    """The shipped detectors through the CLI, at tiny sizes: schema, Gu et al.'s Sink_1^eps in the
    summary, a real detector's minimum seq_len reported as bad input."""
    pytest.importorskip("headscope.circuits.detect_sink")
    pytest.importorskip("headscope.circuits.detect_positional")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("seq_len = 12\nn_prompts = 2\nbatch_size = 2\ntop_k = 2\nn_random = 1\n"
                   "[detectors.sink]\nvalidation_prompts = 2\ncompare_no_bos = false\n"
                   "[detectors.previous_token]\nvalidation_prompts = 2\n")
    out = tmp_path / "real"
    assert run_cli("--config", str(cfg), "--detectors", "sink,previous_token", "--out", str(out), "--quiet") == 0
    doc = json.loads((out / "heads.json").read_text())
    assert {r["kind"] for r in doc["scores"]} == {"sink", "previous_token"}
    assert set(doc["validation"]) == {"sink", "previous_token"}
    sink = pd.DataFrame([r for r in doc["scores"] if r["kind"] == "sink"])
    eps = doc["summary"]["sink"]["eps"]
    assert doc["summary"]["sink"]["sink_ratio"] == pytest.approx(float((sink["score"] > eps).mean()))
    assert sink["score"].between(0, 1).all() and sorted(sink["rank"]) == list(range(1, 271))
    assert "sink_ratio" in (out / "report.html").read_text()
    # A real detector's minimum seq_len (induction needs a period of at least 4 tokens), checked by the
    # CLI from the detector's min_seq_len before the model loads.
    assert run_cli("--detectors", "induction", "--seq-len", "6", "--out", str(tmp_path / "short"), "--quiet") == 2
    err = capsys.readouterr().err
    assert "--seq-len 6 is too short for the induction detector" in err and not (tmp_path / "short").exists()


def test_kind_tables_typos_and_prompt_files(tmp_path, capsys):
    """A misspelt kind parameter is refused before the model loads (it used to be ignored, leaving the
    default in place); a prompts_file in a kind's table reaches that detector unless a flag overrides."""
    from headscope.apps.rank_options import RankOptions

    pytest.importorskip("headscope.circuits.detect_sink")
    typo = tmp_path / "typo.toml"
    typo.write_text("[detectors.sink]\nepsilon = 0.95\n")
    assert run_cli("--config", str(typo), "--detectors", "sink", "--out", str(tmp_path / "t"), "--quiet") == 2
    assert "unknown sink parameters ['epsilon']" in capsys.readouterr().err
    from headscope.circuits.detectors import DetectorConfig, check_params

    check_params("sink", DetectorConfig(params={"bos": False, "eps": 0.5}))  # documented parameters pass
    with pytest.raises(Exception, match="seq_len"):  # a config field given as a parameter would be ignored
        check_params("sink", DetectorConfig(params={"seq_len": 128}))
    # every kind checks before any model work (retrieval and temporal only did inside the detector)
    check_params("retrieval", DetectorConfig(params={"haystack": "Grass is green.", "depths": [0.5]}))
    for kind in ("retrieval", "temporal"):
        with pytest.raises(Exception, match=rf"unknown {kind} parameters \['threshhold'\]"):
            check_params(kind, DetectorConfig(params={"threshhold": 0.2}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("one prompt\n")
    opts = RankOptions(per_kind={"sink": {"prompts_file": str(prompts), "batch_size": 3}})
    assert opts.detector_config("sink").prompts_file == str(prompts)
    assert opts.detector_config("sink").batch_size == 3
    assert RankOptions(prompts="flag.txt", per_kind={"sink": {"prompts_file": str(prompts)}}).detector_config(
        "sink").prompts_file == "flag.txt"


def test_long_prompts_scale_the_default_prompt_counts():
    """--seq-len 8192 keeps a CPU-sized job (fewer prompts), but explicit values still win."""
    from headscope.apps.rank_options import LONG_TOKEN_BUDGET, RankOptions

    long = RankOptions(seq_len=8192, from_flags={"seq_len"})
    assert long.detector_config("sink").n_prompts == LONG_TOKEN_BUDGET // 8192
    assert long.detector_config("sink").params["validation_prompts"] == 1
    assert RankOptions(seq_len=8192, n_prompts=5, from_flags={"seq_len", "n_prompts"}).detector_config("sink").n_prompts == 5
    assert RankOptions().detector_config("sink").n_prompts == 16 and RankOptions().detector_config("sink").seq_len is None


def test_report_top_table_follows_each_kinds_validated_k(shared_model):
    """A kind validated with its own top_k (a [detectors.<kind>] table) lists that many heads, the ones
    its verdict speaks of, not the global --top-k."""
    from headscope.apps.report import render_report
    from headscope.circuits.scores import DetectorResult, Validation, head_scores

    grid = np.arange(30 * 9, dtype=float).reshape(30, 9) / 270
    r = DetectorResult("sink", head_scores("sink", grid), {}, Validation("sink", 3, "loss increase", 2.0, [0.1, 0.2], 3.0))
    html = render_report(shared_model.meta, {"sink": r}, top_k=8)
    assert "Top 3 heads" in html and "Top 8 heads" not in html


def test_too_large_top_k_is_refused_before_the_detectors(tmp_path, fake_registry, shared_model, capsys, monkeypatch):
    import headscope.circuits.detectors as registry

    ran = []
    real = registry.get_detector
    monkeypatch.setattr(rank_mod, "get_detector", lambda kind: ran.append(kind) or real(kind))
    code = run_cli("--detectors", "sink", "--top-k", "136", "--out", str(tmp_path / "big"), "--quiet")
    assert code == 2 and "too large" in capsys.readouterr().err and ran == []


def test_seq_len_beyond_the_models_context_is_refused_before_the_detectors(tmp_path, fake_registry, shared_model,
                                                                            capsys, monkeypatch):
    """--seq-len longer than the model's context: one message naming the flag and the limit, before any
    detector runs (it failed inside the first detector that reached a forward, after the kinds before
    it had run, with 'truncate it' advice that a CLI user cannot follow)."""
    import headscope.circuits.detectors as registry

    ran = []
    real = registry.get_detector
    monkeypatch.setattr(rank_mod, "get_detector", lambda kind: ran.append(kind) or real(kind))
    limit = shared_model.meta.max_positions
    code = run_cli("--detectors", "previous_token,sink", "--seq-len", str(limit + 1), "--n-prompts", "1",
                   "--no-validate", "--out", str(tmp_path / "long"), "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and ran == [], err
    assert f"--seq-len {limit + 1}" in err and str(limit) in err and "context" in err
    assert not (tmp_path / "long").exists()
