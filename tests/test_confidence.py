"""confidence.py: range, known values, stability, and agreement with the torch measures in gates.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dgate_export.confidence import CONFIDENCES, confidence
from dgate_export.errors import UserError


def test_known_values():
    uniform = np.zeros((1, 4), np.float32)
    for name in CONFIDENCES:
        expected = {"max-softmax": 0.25, "margin": 0.0, "entropy": 0.0}[name]
        assert confidence(name, uniform)[0] == pytest.approx(expected, abs=1e-6)
    two = np.array([[math.log(3.0), 0.0]], np.float32)  # probabilities 0.75, 0.25
    assert confidence("max-softmax", two)[0] == pytest.approx(0.75, abs=1e-6)
    assert confidence("margin", two)[0] == pytest.approx(0.5, abs=1e-6)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert confidence("entropy", two)[0] == pytest.approx(1 - h / math.log(2), abs=1e-6)


@pytest.mark.parametrize("name", CONFIDENCES)
def test_range_and_stability_on_extreme_logits(name):
    rng = np.random.default_rng(0)
    logits = np.concatenate([
        rng.normal(size=(100, 10)) * 50,                      # very confident
        np.full((1, 10), 1e4), np.array([[1e4] + [-1e4] * 9]),  # huge values: no overflow, no nan
        rng.normal(size=(50, 10)) * 1e-3,                       # nearly uniform
    ]).astype(np.float32)
    c = confidence(name, logits)
    assert c.shape == (logits.shape[0],) and c.dtype == np.float32
    assert np.all(np.isfinite(c)) and c.min() >= 0.0 and c.max() <= 1.0
    assert c[101] == pytest.approx(1.0, abs=1e-6)   # one class dominates completely
    assert c[100] == pytest.approx(0.1 if name == "max-softmax" else 0.0, abs=1e-6)  # a tie of ten


@pytest.mark.parametrize("name", CONFIDENCES)
def test_more_peaked_is_more_confident(name):
    base = np.array([[2.0, 1.0, 0.5, 0.0]], np.float32)
    values = [confidence(name, base * s)[0] for s in (0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] < values[-1]


def test_unknown_name_and_bad_shape():
    with pytest.raises(UserError, match="max-softmax"):
        confidence("variance", np.zeros((2, 3)))
    with pytest.raises(UserError, match="classes"):
        confidence("margin", np.zeros(5))


@pytest.mark.parametrize("name", CONFIDENCES)
def test_agrees_with_torch(name):
    torch = pytest.importorskip("torch")
    from dgate_export.compile.heads import confidence_torch

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(500, 10)) * rng.uniform(0.1, 20, size=(500, 1))).astype(np.float32)
    ours = confidence(name, logits)
    theirs = confidence_torch(name, torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-6)


@pytest.mark.parametrize("name", CONFIDENCES)
def test_numpy_measures_stay_in_0_1_on_uniform_and_saturated_rows(name):
    """Rounding takes entropy of a uniform row to -2.2e-16 and a saturated one past 1 without the clip;
    a threshold of 0 must let every row leave and 1 every sure row."""
    rows = np.concatenate([np.zeros((1, 5)), np.full((1, 5), 3.7), np.eye(5)[:1] * 1e4,
                           np.random.default_rng(0).standard_normal((64, 5)) * 30])
    for dtype in (np.float32, np.float64):
        c = confidence(name, rows.astype(dtype))
        assert c.dtype == np.float32
        assert (c >= 0).all() and (c <= 1).all(), c
    assert confidence(name, np.eye(5)[:1] * 1e4)[0] == 1.0
