"""What the causal-check verdict says: a ratio only where it means something, the failure case in
plain words, and the control behaviour beside the main one."""

from __future__ import annotations

import json

import pytest

from headscope.circuits.scores import Validation


def test_ratio_to_the_most_damaging_random_set():
    v = Validation("induction", 8, "loss increase", 2.0, [0.1, 0.2, 0.4], 3.0)
    text = v.verdict()
    assert "5.0x the damage of the most damaging random set" in text
    assert "3 random 8-head sets: 0.1 to 0.4, median 0.2; empirical p = 0.25" in text
    assert v.passed and v.p_value == 0.25


def test_no_ratio_when_no_random_set_did_damage():
    v = Validation("sink", 8, "loss increase", 0.5, [-0.1, 0.0, -0.2], 3.0)
    text = v.verdict()
    assert v.passed and "inf" not in text and "x the damage" not in text
    assert "does 0.5 damage (loss increase); more than each of the 3 random 8-head sets: -0.2 to 0, median -0.1" in text


def test_failure_is_said_plainly():
    v = Validation("retrieval", 8, "needle accuracy drop", 0.01, [0.05, 0.02, 0.03], 0.9)
    assert not v.passed
    assert "not more harmful than every random set" in v.verdict()


def test_no_damage_never_passes():
    """Beating the median random set is not enough when the top set does no damage: ablating the 'top
    retrieval heads' that raise recall (-0.05) or leave it as it was (0) passed before."""
    for top, rand in ((-0.05, [-0.2, -0.1, -0.15, 0.0, -0.3]), (0.0, [-0.05, 0.0, -0.02, -0.1, 0.0])):
        v = Validation("retrieval", 8, "recall lost", top, rand, 0.8)
        assert not v.beats_random and not v.passed
        assert "does no damage" in v.verdict()


def test_a_random_set_that_does_more_damage_fails_the_check():
    """Top 0.139 against random sets up to 0.106 passes; against one of 0.2 it does not (it passed
    before with '376x the median', the median being 0.0004)."""
    assert Validation("temporal", 8, "drop", 0.1392, [0.00037, 0.1064, -0.0052, 0.0212, -0.0444], 0.5).passed
    v = Validation("temporal", 8, "drop", 0.1392, [0.00037, 0.2, -0.0052, 0.0212, -0.0444], 0.5)
    assert not v.passed and v.p_value == 2 / 6


def test_tied_scores_do_not_fill_the_top_set():
    """Most retrieval scores are exactly 0: the top 8 of a grid with three positive heads are those
    three, not five layer-0 heads picked by index (ablating L0H0-4 alone lost 0.27 of the recall)."""
    import numpy as np

    from headscope.circuits.scores import head_scores, top_heads
    grid = np.zeros((4, 3))
    grid[2, 1], grid[3, 0], grid[1, 2] = 0.6, 0.4, 0.2
    assert top_heads(head_scores("retrieval", grid), 8) == [(2, 1), (3, 0), (1, 2)]
    assert top_heads(head_scores("retrieval", np.zeros((4, 3))), 8) == []
    grid[0, 0] = np.nan
    assert top_heads(head_scores("retrieval", grid), 2) == [(2, 1), (3, 0)]


def test_fewer_top_heads_are_validated_with_random_sets_of_their_size():
    from headscope.circuits.validation import validate_heads

    class Meta:
        n_layers, n_heads = 4, 3

    class M:
        meta = Meta()

    seen = []

    def ablate(model, heads):
        import contextlib
        seen.append(len(heads))
        return contextlib.nullcontext()

    v = validate_heads(M(), "retrieval", [(2, 1), (3, 0)], lambda m: 1.0, k=8, n_random=3, ablate=ablate)
    assert v.k == 2 and seen == [2, 2, 2, 2] and "Only 2 heads score above the rest" in v.notes
    none = validate_heads(M(), "retrieval", [], lambda m: 1.0, k=8, n_random=3, ablate=ablate)
    assert not none.passed and "nothing to validate" in none.verdict()


def test_control_in_verdict_and_json():
    v = Validation("temporal", 8, "drop, temporal facts", 0.2, [0.01, 0.02], 0.6,
                   control={"metric": "drop, invariant facts", "baseline": 0.7, "top_k_damage": 0.03,
                            "random_k_damage": [0.01, 0.05, 0.02]})
    assert "Control (drop, invariant facts): the same top heads do 0.03 vs median 0.02" in v.verdict()
    d = json.loads(json.dumps(v.to_dict()))
    assert d["control"]["random_k_damage"] == 0.02 and d["control"]["random_k_damage_all"] == [0.01, 0.05, 0.02]


def test_control_damaged_as_much_fails_the_check():
    """DESIGN: temporal heads must hurt temporal facts more than time-invariant control facts."""
    v = Validation("temporal", 8, "drop, temporal facts", 0.05, [0.01, 0.02], 0.6,
                   control={"metric": "drop, invariant facts", "baseline": 0.9, "top_k_damage": 0.09,
                            "random_k_damage": [0.01, 0.01]})
    assert v.beats_random and not v.specific and not v.passed
    assert "not specific to temporal, so not validated" in v.verdict()
    assert v.to_dict()["passed"] is False


def test_no_random_sets_is_refused():
    """With zero random sets there is nothing to compare with: a verdict would read 'median nan'."""
    import pytest

    from headscope.circuits.validation import validate_heads
    from headscope.probe.errors import InputError

    with pytest.raises(InputError, match="n_random must be >= 1"):
        validate_heads(None, "sink", [(0, 0)], lambda m: 0.0, k=1, n_random=0)


def test_each_top_head_ablated_alone_gives_the_ablation_delta_column():
    """each=True: one more damage run per top head, with that head alone ablated; the result's scores
    get `ablation_delta` (NaN for the other heads), heads.json gets it through to_dict."""
    import contextlib

    import numpy as np

    from headscope.circuits.scores import DetectorResult, head_scores, top_heads
    from headscope.circuits.validation import validate_heads

    class Meta:
        n_layers, n_heads = 4, 3

    class M:
        meta = Meta()

    weight = {(l, h): 0.1 * (3 * l + h) for l in range(4) for h in range(3)}  # damage of each head
    ablated: list = []

    @contextlib.contextmanager
    def ablate(model, heads):
        ablated.append(list(heads))
        yield
        ablated.pop()

    def damage(model):  # metric: 1 + the summed weight of the heads ablated right now
        return 1.0 + sum(weight[h] for hs in ablated for h in hs)

    grid = np.arange(12, dtype=float).reshape(4, 3)
    df = head_scores("induction", grid)
    top = top_heads(df, 2)
    v = validate_heads(M(), "induction", top, damage, k=2, n_random=2, ablate=ablate, each=True)
    assert v.each_damage == [(l, h, pytest.approx(weight[(l, h)])) for l, h in top]
    assert v.top_k_damage == pytest.approx(sum(weight[h] for h in top))
    res = DetectorResult("induction", df, validation=v)
    cols = res.scores.set_index(["layer", "head"])["ablation_delta"]
    for l, h in top:
        assert cols[(l, h)] == pytest.approx(weight[(l, h)])
    assert cols.isna().sum() == 12 - 2
    assert json.loads(json.dumps(v.to_dict()))["each_damage"][0] == {"layer": top[0][0], "head": top[0][1],
                                                                   "damage": pytest.approx(weight[top[0]])}
    plain = validate_heads(M(), "induction", top, damage, k=2, n_random=2, ablate=ablate)
    assert plain.each_damage is None and "ablation_delta" not in DetectorResult("induction", df, validation=plain).scores


def test_ablate_each_reaches_the_detectors_from_the_cli():
    from headscope.apps.cli import build_parser
    from headscope.apps.rank_options import resolve

    opts = resolve(build_parser().parse_args(["rank", "--ablate-each", "--detectors", "induction"]))
    assert opts.detector_config("induction").ablate_each
    assert not resolve(build_parser().parse_args(["rank"])).detector_config("sink").ablate_each
