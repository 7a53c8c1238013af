"""calibrate.py: the grid is exact, targets are met, infeasible targets say what is achievable."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dgate_export import calibrate as cal
from dgate_export.calibrate import DISABLED, Target, calibrate, evaluate, exit_costs, save_curve
from dgate_export.errors import UserError
from dgate_export.render import calibration_plot

COSTS = [10.0, 25.0, 40.0, 70.0]   # cumulative FLOPs of leaving at exits 0..3
BASELINE = 65.0                    # the un-gated backbone (no heads)


def synthetic(n=2000, classes=10, gates=3, seed=0):
    """Exit logits whose accuracy and confidence grow with depth, like a real gated network's."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    difficulty = rng.random(n)
    logits = []
    for k in range(gates + 1):
        lg = rng.normal(size=(n, classes))
        good = difficulty < 0.5 + 0.15 * k
        lg[np.arange(n), y] += np.where(good, 2.5 + k, 0.0)
        logits.append(lg.astype(np.float32))
    return logits, y


def brute_force(logits, y, thresholds, *, agree=False):
    """Direct simulation of the early-exit rule, sample by sample (with agree: also the count of samples
    whose gated correctness equals the un-gated model's)."""
    conf = [cal.confidence("max-softmax", lg) for lg in logits[:-1]]
    right, same, cost = 0, 0, 0.0
    for i in range(len(y)):
        k = next((g for g in range(len(conf)) if conf[g][i] >= thresholds[g]), len(conf))
        ok = np.argmax(logits[k][i]) == y[i]
        right += int(ok)
        same += int(ok == (np.argmax(logits[-1][i]) == y[i]))
        cost += COSTS[k]
    if agree:
        return right / len(y), cost / len(y), same
    return right / len(y), cost / len(y)


def drop_bound(logits, y, thresholds, level):
    """The paired one-sided upper bound on the drop, computed directly from the per-sample differences."""
    from statistics import NormalDist

    conf = [cal.confidence("max-softmax", lg) for lg in logits[:-1]]
    d = []
    for i in range(len(y)):
        k = next((g for g in range(len(conf)) if conf[g][i] >= thresholds[g]), len(conf))
        d.append(int(np.argmax(logits[-1][i]) == y[i]) - int(np.argmax(logits[k][i]) == y[i]))
    d = np.array(d, dtype=np.float64)
    return d.mean() + NormalDist().inv_cdf(level) * d.std() / np.sqrt(len(d))


def test_grid_matches_brute_force(monkeypatch):
    logits, y = synthetic(n=300)
    monkeypatch.setattr(cal, "_GRID_CELLS", 300)  # 6 candidates per gate: every combination checked
    conf, correct, costs = cal._prepare(logits, y, "max-softmax", COSTS)
    cands, right, cost, same = cal._grid(conf, correct, costs)
    assert all(c[-1] == np.float32(DISABLED) for c in cands)
    for combo in itertools.product(*(range(len(c)) for c in cands)):
        t = [float(cands[k][combo[k]]) for k in range(3)]
        acc, flops, agree = brute_force(logits, y, t, agree=True)
        assert right[combo] == round(acc * len(y))
        assert same[combo] == agree
        assert cost[combo] / len(y) == pytest.approx(flops)


@pytest.mark.parametrize("level", [0.8, 0.95])
def test_upper_bound_holds_the_drop_bound_and_costs_more(level):
    logits, y = synthetic(n=3000, seed=4)
    plain = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                      target=Target(max_drop=0.02, guarantee="none"))
    bound = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                      target=Target(max_drop=0.02, guarantee="none", upper_bound=level))
    assert bound.upper_bound == level and "upper confidence bound" in bound.method
    assert drop_bound(logits, y, bound.thresholds, level) <= 0.02 + 1e-9
    # the plain calibration spends the whole drop, so its bound is above it; the bound costs FLOPs
    assert drop_bound(logits, y, plain.thresholds, level) > 0.02
    assert bound.validation.accuracy_drop < plain.validation.accuracy_drop
    assert bound.validation.expected_flops > plain.validation.expected_flops
    assert bound.to_dict()["upper_bound"] == level


@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_evaluation_drop_bound_matches_the_per_sample_bound(level):
    """An Evaluation's bound (e.g. on held-out rows) is the one calibrate holds, from the same counts."""
    logits, y = synthetic(n=1200, seed=6)
    for thresholds in ([0.5, 0.6, 0.7], [0.9, 0.9, 0.9], [DISABLED] * 3):
        e = evaluate(logits, y, confidence="max-softmax", thresholds=thresholds, costs=COSTS, baseline_flops=BASELINE)
        assert e.drop_upper_bound(level) == pytest.approx(drop_bound(logits, y, thresholds, level), abs=1e-12)
        _, _, same = brute_force(logits, y, thresholds, agree=True)
        assert e.disagreement == pytest.approx(1 - same / len(y))
    assert e.disagreement == 0.0 and e.drop_upper_bound(level) == 0.0  # every gate off: the un-gated model


def test_holdout_keeps_rows_out_of_the_choice_and_reports_them():
    logits, y = synthetic(n=2000, seed=5)
    result = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, seed=3,
                       target=Target(max_drop=0.02, guarantee="none", holdout=0.3))
    kept, out = cal.holdout_rows(len(y), 0.3, seed=3)
    assert len(out) == 600 and len(kept) == 1400 and not set(kept) & set(out)
    # the same as calibrating on the kept rows alone, then evaluating on the others
    alone = calibrate([lg[kept] for lg in logits], y[kept], costs=COSTS, baseline_flops=BASELINE,
                      target=Target(max_drop=0.02, guarantee="none"))
    assert result.thresholds == alone.thresholds and result.validation.samples == 1400
    check = evaluate([lg[out] for lg in logits], y[out], confidence="max-softmax", thresholds=result.thresholds,
                     costs=COSTS, baseline_flops=BASELINE)
    assert result.held_out == check and result.holdout == 0.3
    assert result.to_dict()["held_out"]["samples"] == 600 and "held out" in result.method
    for bad in (0.0, 1.0, 1.5, 0.0001):
        with pytest.raises(UserError, match="holdout"):
            calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                      target=Target(max_drop=0.02, guarantee="none", holdout=bad))


def test_upper_bound_refinement_keeps_the_bound():
    """Coordinate descent moves thresholds one by one; each move must keep the bound, not just the count."""
    logits, y = synthetic(n=1500, seed=7)
    coarse = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, refine=False,
                       target=Target(max_drop=0.03, guarantee="none", upper_bound=0.9))
    fine = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                     target=Target(max_drop=0.03, guarantee="none", upper_bound=0.9))
    assert fine.validation.expected_flops <= coarse.validation.expected_flops
    for result in (coarse, fine):
        assert drop_bound(logits, y, result.thresholds, 0.9) <= 0.03 + 1e-9


@pytest.mark.parametrize("max_drop", [0.0, 0.01, 0.05])
def test_max_drop_is_met_and_saves_flops(max_drop):
    logits, y = synthetic()
    result = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                       target=Target(max_drop=max_drop, guarantee="none"))
    val = result.validation
    acc, flops = brute_force(logits, y, result.thresholds)
    assert val.accuracy == pytest.approx(acc) and val.expected_flops == pytest.approx(flops)
    assert val.accuracy >= val.accuracy_ungated - max_drop - 1e-12
    assert val.flops_reduction > 0.2  # easy samples leave early
    assert sum(val.exit_fractions) == pytest.approx(1.0)
    assert len(result.thresholds) == 3 and result.mode == "max_drop"


def test_looser_drop_costs_less():
    logits, y = synthetic()
    costs = [calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                       target=Target(max_drop=d, guarantee="none")).validation.expected_flops
             for d in (0.0, 0.02, 0.1)]
    assert costs[0] >= costs[1] >= costs[2] and costs[0] > costs[2]


def test_refinement_never_hurts():
    logits, y = synthetic()
    coarse = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, refine=False,
                       target=Target(max_drop=0.01, guarantee="none"))
    fine = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                     target=Target(max_drop=0.01, guarantee="none"))
    assert fine.validation.expected_flops <= coarse.validation.expected_flops
    assert fine.validation.accuracy >= fine.validation.accuracy_ungated - 0.01


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.8])
def test_budget_is_met_and_more_budget_is_more_accurate(budget):
    logits, y = synthetic()
    result = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, target=Target(budget=budget))
    assert result.validation.expected_flops <= budget * BASELINE + 1e-9
    tighter = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, target=Target(budget=budget - 0.1))
    assert tighter.validation.accuracy <= result.validation.accuracy


def test_pareto_curve_is_monotone_and_contains_the_extremes():
    logits, y = synthetic()
    result = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                       target=Target(max_drop=0.01, guarantee="none"))
    flops = [p["flops"] for p in result.curve]
    accs = [p["accuracy"] for p in result.curve]
    assert flops == sorted(flops) and accs == sorted(accs)
    assert flops[0] == pytest.approx(COSTS[0])       # everyone leaves at gate 0
    best_acc, _ = brute_force(logits, y, result.curve[-1]["thresholds"])
    assert accs[-1] == pytest.approx(best_acc)
    # No curve point is dominated by the chosen point's figures on both axes.
    assert result.validation.accuracy <= accs[-1] + 1e-12


def test_infeasible_budget_reports_the_cheapest():
    logits, y = synthetic()
    with pytest.raises(UserError, match=r"0\.154"):   # cheapest = COSTS[0] / BASELINE = 10 / 65
        calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, target=Target(budget=0.1))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_drop": 0.01, "budget": 0.5}, "exactly one"),
    ({"max_drop": -0.1}, "max_drop"),
    ({"budget": 0.0}, "positive"),
    ({"budget": 0.5, "upper_bound": 0.9}, "needs max_drop"),
    ({"max_drop": 0.01, "upper_bound": 1.0}, "level in"),
    ({"max_drop": 0.01, "upper_bound": 0.9}, "replaces the default guarantee"),
    ({"delta": 1.5}, "delta"),
    ({"guarantee": "always"}, "Unknown guarantee"),
    ({"holdout": 1.0}, "holdout"),
])
def test_bad_targets_are_refused_when_made(kwargs, message):
    """A Target checks itself when it is made: a bad flag fails before any data is read."""
    with pytest.raises(UserError, match=message):
        Target(**kwargs)


def test_the_default_target_is_the_one_point_promise():
    assert Target() == Target(max_drop=0.01, guarantee="ltt", delta=0.1)
    assert Target(budget=0.5).max_drop is None
    assert Target.from_dict(Target(budget=0.5, holdout=0.3).to_dict()) == Target(budget=0.5, holdout=0.3)


def test_an_unknown_confidence_is_a_user_error():
    logits, y = synthetic(n=50)
    with pytest.raises(UserError, match="Unknown confidence"):
        calibrate(logits, y, confidence="nope", costs=COSTS, baseline_flops=BASELINE)


@pytest.mark.parametrize("name", ["margin", "entropy"])
def test_other_confidences(name):
    logits, y = synthetic()
    result = calibrate(logits, y, confidence=name, costs=COSTS, baseline_flops=BASELINE,
                       target=Target(max_drop=0.01, guarantee="none"))
    ev = evaluate(logits, y, confidence=name, thresholds=result.thresholds, costs=COSTS,
                  baseline_flops=BASELINE)
    assert ev.accuracy == pytest.approx(result.validation.accuracy)
    assert ev.accuracy >= ev.accuracy_ungated - 0.01 and ev.flops_reduction > 0


def test_single_gate_and_many_gates():
    logits, y = synthetic(gates=1)
    one = calibrate(logits, y, costs=[10.0, 70.0], baseline_flops=65.0,
                    target=Target(max_drop=0.01, guarantee="none"))
    assert len(one.thresholds) == 1
    logits, y = synthetic(gates=5, n=1000)
    costs = [10.0 * (k + 1) for k in range(6)]
    five = calibrate(logits, y, costs=costs, baseline_flops=55.0,
                     target=Target(max_drop=0.01, guarantee="none"))
    assert len(five.thresholds) == 5
    assert five.validation.accuracy >= five.validation.accuracy_ungated - 0.01


def test_exit_costs_from_flops():
    flops = {"segments": [10, 14, 15, 30], "heads": [1, 2, 3], "baseline": 69}
    assert exit_costs(flops) == [11.0, 27.0, 45.0, 75.0]


def test_save_curve_writes_json_and_render_the_png(tmp_path):
    logits, y = synthetic()
    result = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                       target=Target(max_drop=0.01, guarantee="none"))
    test = evaluate(logits, y, confidence="max-softmax", thresholds=result.thresholds, costs=COSTS,
                    baseline_flops=BASELINE)
    save_curve(result, tmp_path / "m.curve.json", test=test)
    calibration_plot(result, tmp_path / "m.curve.png", test=test)
    data = json.loads((tmp_path / "m.curve.json").read_text())
    assert data["thresholds"] == result.thresholds and data["mode"] == "max_drop"
    assert len(data["curve"]) == len(result.curve) and "flops_reduction" in data["test"]
    assert (tmp_path / "m.curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.curve.json", "m.curve.png"]  # no temp files
