"""What the causal-check verdict says: a ratio only where it means something, the failure case in
plain words, and the control behaviour beside the main one."""

from __future__ import annotations

import json

from headscope.circuits.scores import Validation


def test_ratio_when_random_sets_do_damage():
    v = Validation("induction", 8, "loss increase", 2.0, [0.1, 0.2, 0.4], 3.0)
    assert "10.0x the damage" in v.verdict()
    assert v.passed


def test_no_ratio_when_random_median_is_not_positive():
    v = Validation("sink", 8, "loss increase", 0.5, [-0.1, 0.0, -0.2], 3.0)
    text = v.verdict()
    assert v.passed and "inf" not in text and "x the damage" not in text
    assert "0.5 damage while the median random 8-head set does -0.1" in text


def test_failure_is_said_plainly():
    v = Validation("retrieval", 8, "needle accuracy drop", 0.01, [0.05, 0.02, 0.03], 0.9)
    assert not v.passed
    assert "no more harmful than random heads" in v.verdict()


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
