"""Review of what `headscope rank` writes: every number a researcher reads must say what it is and
must not claim more than was found (unscored heads listed as top heads, NaN shown as a value)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from headscope.apps.rank_output import top_heads_text
from headscope.apps.report import render_report
from headscope.apps.thumbnails import record_thumbnails
from headscope.circuits.scores import DetectorResult, Validation, head_scores


def _unscored_retrieval(L=30, H=9) -> DetectorResult:
    """What detect_retrieval returns when the model retrieved no needle: every score NaN, no validation."""
    summary = {"n_trials": 6, "n_retrieved": 0,
               "note": "the model retrieved no needle (ROUGE-1 recall > 0.5) in 6 trials: no head can be scored."}
    return DetectorResult("retrieval", head_scores("retrieval", np.full((L, H), np.nan)), summary, None)


def test_unscored_heads_are_not_listed_as_top_heads(model):
    """A kind whose heads could not be scored (retrieval with no retrieved needle) must not list
    L0H0, L0H1, ... with score nan as its 'top heads', nor draw their patterns as 'the top heads'."""
    grid = np.arange(30 * 9, dtype=float).reshape(30, 9) / 270
    grid[29, 8] = np.nan  # one unscored head among scored ones ranks last and is never "top"
    sink = DetectorResult("sink", head_scores("sink", grid), {}, None)
    results = {"sink": sink, "retrieval": _unscored_retrieval()}

    text = top_heads_text(results, 5)
    line = next(l for l in text.splitlines() if l.strip().startswith("retrieval:"))
    assert "nan" not in line.lower() and "L0H0" not in line
    assert "no head" in line

    thumbs = record_thumbnails(model, results)
    assert not thumbs.get("retrieval")
    assert [(t.layer, t.head) for t in thumbs["sink"]] == [(29, 7), (29, 6), (29, 5), (29, 4)]

    html = render_report(model.meta, results, top_k=8, thumbs=thumbs)
    section = html[html.index("<section id='retrieval'>"):]
    section = section[:section.index("</section>")]
    assert ">nan<" not in section
    assert "Top 8 heads" not in section
    assert "no head could be scored" in section.lower()
    assert "retrieved no needle" in section  # the reason, next to the missing check


def test_library_warnings_are_printed_once(tmp_path):
    """The CLI's logging set-up must not print every huggingface_hub warning twice (it has its own
    stderr handler and propagates to the root logger: a hub id without network showed each
    'Retrying in 8s' line twice), while headscope's own warnings still appear, once."""
    import os
    import subprocess
    import sys

    code = ("from headscope.apps.cli import main\n"
            "main(['rank', '--detectors', 'nope', '--out', %r])\n"
            "import logging, huggingface_hub.utils.logging as hl\n"
            "hl.get_logger('huggingface_hub.utils._http').warning('HUB-RETRY-MSG')\n"
            "logging.getLogger('headscope').warning('HEADSCOPE-MSG')\n"
            "logging.getLogger('headscope').info('HEADSCOPE-INFO')\n") % str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ""}
    err = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=120).stderr
    assert "unknown detector 'nope'" in err
    assert err.count("HUB-RETRY-MSG") == 1, err
    assert err.count("HEADSCOPE-MSG") == 1, err
    assert "HEADSCOPE-INFO" not in err


def test_explorer_top_heads_from_a_report_skip_unscored_heads(tmp_path, model):
    """The explorer's 'Top heads' list read from a report lists scored heads in rank order, never
    unscored (NaN) ones as the best heads of a kind; the page says when no head was scored."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from headscope.apps.rank_output import write_heads

    grid = np.arange(30 * 9, dtype=float).reshape(30, 9) / 270
    results = {"retrieval": _unscored_retrieval(), "sink": DetectorResult("sink", head_scores("sink", grid), {}, None)}
    write_heads(tmp_path, model.meta, results)
    app = str(Path(__file__).resolve().parents[1] / "apps" / "explorer_app.py")
    for source in (tmp_path, tmp_path / "heads.csv"):
        at = AppTest.from_file(app, default_timeout=180)
        at.session_state["page"], at.session_state["report_dir"] = "Head map", str(source)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert at.radio(key="kind").value == "retrieval"
        top = at.dataframe[0].value
        assert len(top) == 0 or not pd.isna(top["score"]).any(), top
        assert any("no head" in c.value.lower() for c in at.info), [c.value for c in at.info]
        at.radio(key="kind").set_value("sink").run()
        top = at.dataframe[0].value
        assert [(int(l), int(h)) for l, h in zip(top["layer"][:3], top["head"][:3])] == [(29, 8), (29, 7), (29, 6)]


def _temporal_not_specific() -> Validation:
    """Like the embedded model's temporal check: the top heads beat random sets on temporal facts but
    damage the invariant control facts more (so not validated)."""
    return Validation("temporal", 8, "drop of mean true-answer candidate probability, temporal facts", 0.1374,
                      [0.01, 0.02, 0.015], 0.60, "",
                      {"metric": "drop of mean true-answer candidate probability, invariant facts", "baseline": 0.70,
                       "top_k_damage": 0.1462, "random_k_damage": [0.005, 0.01, 0.02]})


def test_validation_figure_shows_the_control_beside_the_behaviour():
    """The temporal bars showed only the temporal-fact damage (top-8 far above random: looks validated)
    while the verdict says 'not validated' because of the control; the control's bars must be drawn
    too, with the same head sets."""
    from headscope.apps.report import validation_bars

    v = _temporal_not_specific()
    assert not v.passed
    fig = validation_bars(DetectorResult("temporal", head_scores("temporal", np.zeros((30, 9))), {}, v))
    ys = [list(np.asarray(t.y, float)) for t in fig.data]
    assert [0.1374, 0.01, 0.02, 0.015] in [[round(y, 6) for y in t] for t in ys]
    assert [0.1462, 0.005, 0.01, 0.02] in [[round(y, 6) for y in t] for t in ys]
    names = " ".join(str(t.name) for t in fig.data)
    assert "invariant facts" in names and "temporal facts" in names
    # the dashed line is the bar the top set must clear: the largest random set, not the median
    line = [sh for sh in fig.layout.shapes if sh.type == "line"]
    assert len(line) == 1 and line[0].y0 == 0.02


@pytest.mark.parametrize("kind, words", [("sink", "key 0"), ("retrieval", "answer span"),
                                         ("temporal", "logit difference"),
                                         ("induction", "mean offset_mass[49] over the second copy")])
def test_every_kind_says_what_its_score_is(model, kind, words):
    """Every section says what 'score' (heatmap colour, table column) measures for that kind: only the
    positional detectors' summaries carried a definition, in the findings list at the bottom."""
    summary = {"definition": "mean offset_mass[49] over the second copy of [BOS] r r"} if kind == "induction" else {}
    r = DetectorResult(kind, head_scores(kind, np.random.default_rng(0).random((30, 9))), summary, None)
    html = render_report(model.meta, {kind: r}, top_k=8)
    section = html[html.index(f"<section id='{kind}'>"):]
    head = section[:section.index("score of every head")]  # stated before the heatmap
    m = re.search(r"score = ([^<]*)", head)
    assert m and words in m.group(1), head[-600:]


def test_findings_summarise_large_nested_values(model):
    """The retrieval findings printed its per_trial dict raw (270 'layer-head' keys, ~18k characters of
    unrounded floats) and nested floats unrounded; large values are summarised and point to heads.json."""
    per_trial = {f"{l}-{h}": [0.0833333358168602, 0.0] for l in range(30) for h in range(9)}
    summary = {"n_retrieved": 6, "per_trial": per_trial,
               "top_heads": [{"layer": 17, "head": 3, "score": 0.6642512182394663}]}
    r = DetectorResult("retrieval", head_scores("retrieval", np.random.default_rng(0).random((30, 9))), summary, None)
    html = render_report(model.meta, {"retrieval": r}, top_k=8)
    findings = html[html.index("Model-level findings"):]
    findings = findings[:findings.index("</ul>")]
    assert len(findings) < 1500, len(findings)
    assert "270 entries" in findings and "heads.json" in findings
    assert "0.6643" in findings and "0.6642512182394663" not in findings


def test_signed_scores_get_a_diverging_scale_centred_on_zero(model):
    """Temporal's patching effects are signed: on Viridis a head working against the behaviour
    looked merely 'low'. Non-negative scores keep the sequential scale."""
    from headscope.apps.report import heatmap

    grid = np.linspace(-0.1, 0.3, 30 * 9).reshape(30, 9)
    grid[0, 0] = np.nan
    t = heatmap(DetectorResult("temporal", head_scores("temporal", grid), {}, None), model.meta).data[0]
    assert t.zmid == 0.0 and t.colorscale[0][1] != t.colorscale[-1][1] and t.reversescale
    s = heatmap(DetectorResult("sink", head_scores("sink", np.abs(grid)), {}, None), model.meta).data[0]
    assert s.zmid is None and s.colorscale[0][1] == "#440154"  # Viridis
    # the explorer's clickable map uses the same scale
    from headscope.apps.explorer_figures import head_map

    m = head_map(grid, "temporal").data[0].marker
    assert m.cmid == 0.0 and m.reversescale
