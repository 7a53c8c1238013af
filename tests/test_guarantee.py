"""The default calibration's promise (Learn then Test): exact binomial bounds, the fixed-sequence choice
against a direct re-computation, ties, thresholds off the observed confidences, brute-force optima, and a
simulation of the guarantee on real per-sample scores of a benchmark network."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from test_calibrate import BASELINE, COSTS, synthetic

from dgate_export import calibrate as cal
from dgate_export.calibrate import DISABLED, Target, calibrate, calibrate_scores
from dgate_export.errors import UserError

SCORES = Path(__file__).parent / "data" / "resnet56_test_scores.npz"


def binomial_cdf(k: int, m: int, p: float) -> float:
    return sum(math.comb(m, i) * p**i * (1 - p) ** (m - i) for i in range(k + 1))


@pytest.mark.parametrize("k, m, alpha", [(0, 100, 0.05), (3, 50, 0.05), (17, 400, 0.1), (40, 41, 0.2)])
def test_clopper_pearson_bounds_are_exact(k, m, alpha):
    upper = cal.binomial_upper(k, m, alpha)
    # The upper bound is where P(Bin(m, p) <= k) falls to alpha; just below it, the tail is above alpha.
    assert binomial_cdf(k, m, upper) == pytest.approx(alpha, rel=1e-6)
    assert binomial_cdf(k, m, upper - 1e-6) > alpha and upper >= k / m
    lower = cal.binomial_lower(k, m, alpha)
    assert lower <= k / m
    if k > 0:
        assert 1 - binomial_cdf(k - 1, m, lower) == pytest.approx(alpha, rel=1e-6)
    assert cal.binomial_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-9)
    assert cal.binomial_lower(0, m, alpha) == 0.0 and cal.binomial_upper(m, m, alpha) == 1.0


def test_drop_bound_splits_delta_between_both_disagreements():
    b = cal.drop_bound_exact(30, 10, 2000, 0.1)
    assert b == pytest.approx(cal.binomial_upper(30, 2000, 0.05) - cal.binomial_lower(10, 2000, 0.05))
    assert (30 - 10) / 2000 < b < cal.binomial_upper(30, 2000, 0.1)


def saturated(n=1500, seed=1):
    """Synthetic exits whose gate-0 logits saturate the softmax for a third of the rows (max-softmax exactly
    1.0 in float32, right or wrong): the ties real networks produce."""
    logits, y = synthetic(n=n, seed=seed)
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, n // 3, replace=False)
    wrong = rows[: len(rows) // 12]  # some saturated rows are confidently wrong
    logits[0][rows] = 0.0
    logits[0][rows, y[rows]] = 200.0
    logits[0][wrong, (y[wrong] + 1) % 10] = 300.0
    assert (cal.confidence("max-softmax", logits[0][rows]) == 1.0).all()
    return logits, y


def test_thresholds_sit_between_observed_confidences():
    logits, y = saturated()
    conf, correct, costs = cal._prepare(logits, y, "max-softmax", COSTS)
    for guarantee in ("ltt", "none"):
        for kw in ({"max_drop": 0.02}, {"budget": 0.6}):
            result = calibrate_scores(conf, correct, confidence="max-softmax", costs=costs,
                                      baseline_flops=BASELINE, target=Target(guarantee=guarantee, **kw))
            for k, t in enumerate(result.thresholds):
                assert t == DISABLED or not np.any(conf[k] == np.float32(t)), (guarantee, kw, k, t)
                # half-way: the same rows pass as at the observed confidence just above it
                above = conf[k][conf[k] >= t]
                if t < DISABLED and above.size and (conf[k] < t).any():
                    below = conf[k][conf[k] < t].max()
                    assert np.float32(t) > below and np.float32(t) <= above.min()
    # the midpoint keeps every decision on the rows it was computed from
    t = cal._between(conf[1], np.unique(conf[1])[[0, 5, 200, -1]])
    assert t[0] < conf[1].min() and (t[1:] < np.unique(conf[1])[[5, 200, -1]]).all()
    for v, mid in zip(np.unique(conf[1])[[5, 200, -1]], t[1:]):
        assert np.array_equal(conf[1] >= v, conf[1] >= mid)
    assert cal._between(conf[0], np.array([DISABLED]))[0] == np.float32(DISABLED)


def brute_optimum(conf, correct, costs, max_drop):
    """The cheapest thresholds that keep the drop on these rows within max_drop, by trying every combination
    of observed confidences (and disabled) at every gate, sample by sample."""
    n = conf.shape[1]
    full = int(correct[-1].sum())
    options = [sorted(set(conf[k].tolist())) + [DISABLED] for k in range(conf.shape[0])]
    best = None
    for t in itertools.product(*options):
        right, cost = 0, 0.0
        for i in range(n):
            k = next((g for g in range(len(t)) if conf[g, i] >= t[g]), len(t))
            right += int(correct[k, i])
            cost += costs[k]
        if full - right <= max_drop * n + 1e-9 and (best is None or cost < best[0] - 1e-9):
            best = (cost, right)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_none_mode_finds_the_brute_force_optimum_with_ties(seed):
    """Small cases (the grid then holds every distinct value, so its choice is exact); the confidences are
    rounded to a few levels, so ties are everywhere."""
    logits, y = synthetic(n=40, gates=2, seed=seed)
    conf, correct, costs = cal._prepare(logits, y, "max-softmax", [10.0, 30.0, 70.0])
    conf = np.round(conf * 8) / 8  # 9 levels: runs of equal confidences
    for max_drop in (0.0, 0.05, 0.1):
        best = brute_optimum(conf, correct, costs, max_drop)
        result = calibrate_scores(conf.astype(np.float32), correct, confidence="max-softmax", costs=costs,
                                  baseline_flops=65.0, target=Target(max_drop=max_drop, guarantee="none"))
        v = result.validation
        assert v.accuracy_ungated - v.accuracy <= max_drop + 1e-9
        assert v.expected_flops * 40 == pytest.approx(best[0]), (seed, max_drop)


def test_refinement_respects_ties_on_saturated_logits(monkeypatch):
    """A coarse grid leaves the choice to the refinement; a split inside a run of equal confidences (1.0)
    would let the whole run leave and break the drop."""
    monkeypatch.setattr(cal, "_GRID_CELLS", 64)
    for seed in range(6):
        logits, y = saturated(n=900, seed=seed)
        for max_drop in (0.0, 0.005, 0.02):
            r = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                          target=Target(max_drop=max_drop, guarantee="none"))
            exits = cal.exits_of(cal._prepare(logits, y, "max-softmax", COSTS)[0], r.thresholds)
            right = sum(np.argmax(logits[k][i]) == y[i] for i, k in enumerate(exits))
            full = int((np.argmax(logits[-1], axis=1) == y).sum())
            assert full - right <= max_drop * len(y) + 1e-9, (seed, max_drop)


def walk(conf, correct, costs, max_drop, delta, search_fraction=cal.SEARCH_FRACTION, seed=0):
    """Learn then Test re-computed directly: the search rows' Pareto front, tested in order on the other rows,
    sample by sample; the cheapest (on all rows) of the sets passed before the first failure."""
    n = conf.shape[1]
    test, search = cal.holdout_rows(n, search_fraction, seed)
    cands, right, cost, _ = cal._grid(conf[:, search], correct[:, search], costs)
    path = [[DISABLED] * conf.shape[0]]
    for fid in cal._pareto(right, cost)[::-1]:
        combo = np.unravel_index(fid, right.shape)
        path.append([float(cands[k][combo[k]]) for k in range(conf.shape[0])])

    def run(t, rows):
        exits = [next((g for g in range(len(t)) if conf[g, i] >= t[g]), len(t)) for i in rows]
        gated = np.array([correct[k, i] for k, i in zip(exits, rows)])
        return gated, float(sum(costs[k] for k in exits))

    passed = [path[0]]
    full = correct[-1, test]
    for t in path[1:]:
        gated, _ = run(t, test)
        if cal.drop_bound_exact(int((full & ~gated).sum()), int((gated & ~full).sum()), len(test), delta) > max_drop:
            break
        passed.append(t)
    return min(passed, key=lambda t: run(t, range(n))[1]), len(passed)


@pytest.mark.parametrize("max_drop, delta", [(0.03, 0.1), (0.05, 0.2), (0.02, 0.05)])
def test_learn_then_test_keeps_the_cheapest_set_that_passed(monkeypatch, max_drop, delta):
    monkeypatch.setattr(cal, "_GRID_CELLS", 1000)  # 10 candidates per gate: a short path, checked row by row
    monkeypatch.setattr(cal, "_TEST_CHUNK", 2)     # sets are tested in chunks: across chunk boundaries too
    logits, y = synthetic(n=1200, seed=11)
    conf, correct, costs = cal._prepare(logits, y, "max-softmax", COSTS)
    result = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                       target=Target(max_drop=max_drop, delta=delta))
    expected, passed = walk(conf, correct, costs, max_drop, delta)
    assert result.thresholds == pytest.approx(expected)
    g = result.guarantee
    assert g.passed == passed and g.passed > 1 and g.drop_bound <= max_drop
    assert g.search_rows == 360 and g.test_rows == 840 and g.delta == delta
    assert result.validation.flops_reduction > 0.1
    assert "probability at least" in result.promise() and "exchangeable" in result.promise()
    assert result.to_dict()["guarantee"]["passed"] == passed


def test_fixed_sequence_stops_at_the_first_failure(monkeypatch):
    """A set after a failure is never taken, even if it would pass on its own."""
    monkeypatch.setattr(cal, "_TEST_CHUNK", 2)
    rng = np.random.default_rng(0)
    n = 3000
    conf = rng.random((1, n)).astype(np.float32)
    full = rng.random(n) < 0.9
    gate = full.copy()
    gate[conf[0] > 0.5] &= rng.random(int((conf[0] > 0.5).sum())) < 0.9  # high confidences: 10% more errors
    correct = np.stack([gate, full])
    # low confidences are as right as the full model; high ones are not
    path = np.array([[DISABLED], [0.98], [0.95], [0.3], [0.9], [0.99], [0.97], [0.8]], dtype=np.float32)
    ok = [cal.drop_bound_exact(int((full & ~g).sum()), int((g & ~full).sum()), n, 0.1) <= 0.01
          for g in (np.where(conf[0] >= t, gate, full) for t in path[1:, 0])]
    assert ok[:3] == [True, True, False] and ok[3:] == [False, True, True, False]  # (0.3 lets bad rows out)
    assert cal._fixed_sequence(conf, correct, path, 0.01, 0.1) == 3


def test_learn_then_test_is_more_cautious_than_the_validation_drop():
    logits, y = synthetic(n=4000, seed=2)
    plain = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                      target=Target(max_drop=0.02, guarantee="none"))
    ltt = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, target=Target(max_drop=0.02))
    assert plain.guarantee is None and ltt.guarantee is not None
    assert ltt.validation.accuracy_drop < plain.validation.accuracy_drop
    assert ltt.validation.expected_flops > plain.validation.expected_flops
    looser = calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE,
                       target=Target(max_drop=0.02, delta=0.5))
    assert looser.validation.expected_flops <= ltt.validation.expected_flops


def test_too_few_rows_says_how_many_would_do():
    logits, y = synthetic(n=4000, seed=3)
    few = [lg[:300] for lg in logits], y[:300]
    with pytest.raises(UserError, match=r"about [\d,]+ validation rows") as err:
        calibrate(*few, costs=COSTS, baseline_flops=BASELINE, target=Target(max_drop=0.01))
    needed = int(err.value.args[0].split("about ")[1].split(" validation")[0].replace(",", ""))
    # at least what a set with no disagreement at all needs
    assert math.log(2 / 0.1) / 0.01 / (1 - cal.SEARCH_FRACTION) < needed < 100_000
    assert calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, target=Target(max_drop=0.01)).guarantee.passed > 1
    with pytest.raises(UserError, match="drops at least that much"):
        calibrate(logits, y, costs=COSTS, baseline_flops=BASELINE, target=Target(max_drop=0.0))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_drop": 0.01, "delta": 0.0}, "delta"),
    ({"max_drop": 0.01, "delta": 1.0}, "delta"),
    ({"max_drop": 0.01, "delta": -0.5}, "delta"),
    ({"max_drop": 0.01, "guarantee": "maybe"}, "guarantee"),
    ({"max_drop": 0.01, "upper_bound": 0.9}, "guarantee none"),
])
def test_bad_guarantee_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        Target(**kwargs)


@pytest.mark.slow
def test_the_guarantee_holds_over_random_splits_of_real_scores(monkeypatch):
    """200 random splits of ResNet-56's real per-sample scores on the Fashion-MNIST test split (10 000 rows,
    benchmarks/weights/resnet56_gated.pt; tests/data/resnet56_test_scores.npz): calibrate on 4000 rows
    with max_drop 0.01 and delta 0.1, measure the drop on the other 6000. The promise is on the expected
    drop; a finite held-out part adds its own noise, so we allow the held-out drop to exceed max_drop in at
    most 0.1 * 200 + 2 standard deviations of a Binomial(200, 0.1) = 28 of the 200 splits. The grid is
    cut to 20^3 cells to keep the test fast (the path is then coarser; the guarantee does not depend on it)."""
    monkeypatch.setattr(cal, "_GRID_CELLS", 8000)
    data = np.load(SCORES)
    conf, correct, costs = data["conf"], data["correct"], data["costs"]
    n, rng = conf.shape[1], np.random.default_rng(0)
    exceed, saved = 0, []
    for _ in range(200):
        perm = rng.permutation(n)
        fit, new = perm[:4000], perm[4000:]
        r = calibrate_scores(conf[:, fit], correct[:, fit], confidence="max-softmax", costs=costs,
                             baseline_flops=float(data["baseline"]), target=Target(max_drop=0.01, delta=0.1))
        exits = cal.exits_of(conf[:, new], r.thresholds)
        drop = correct[-1, new].mean() - correct[exits, new].mean()
        exceed += drop > 0.01
        saved.append(r.validation.flops_reduction)
    assert exceed <= 28, exceed
    assert np.mean(saved) > 0.5  # the promise is kept by gating, not by switching gates off


def _fail_then_pass(n=3000, seed=0):
    """One gate whose Learn-then-Test path is [un-gated, t1, t2, t3] with, on the test rows, t1 passing, t2
    failing and t3 (the cheapest) passing again: four confidence bands A > B > C > D; on the search rows C
    and D leave some rows worse than the full model (so the path orders t2 before t3), on the test rows C
    leaves many worse and D many better (the gated model right, the full one wrong), which cancel."""
    rng = np.random.default_rng(seed)
    test, _ = cal.holdout_rows(n, cal.SEARCH_FRACTION, seed)
    band = rng.integers(0, 4, n)  # 0: A ... 3: D
    conf = np.array([0.9, 0.7, 0.5, 0.3], np.float32)[band][None, :]
    full = np.ones(n, bool)
    gate = np.ones(n, bool)
    in_test = np.zeros(n, bool)
    in_test[test] = True
    draw = rng.random(n)
    gate[~in_test & (band == 2) & (draw < 0.05)] = False   # search rows: C 5% worse,
    gate[~in_test & (band == 3) & (draw < 0.20)] = False   # D 20% worse
    gate[in_test & (band == 2) & (draw < 0.15)] = False    # test rows: C 15% worse,
    full[in_test & (band == 3) & (draw < 0.30)] = False    # D 30% better
    return conf, np.stack([gate, full]), test


def test_learn_then_test_never_takes_a_set_after_the_first_failure():
    """A calibration that kept testing after the first failure would take t3 (cheapest, passes on its own),
    breaking the fixed-sequence guarantee; the promise allows only the sets before the failure."""
    conf, correct, test = _fail_then_pass()
    costs, max_drop, delta = np.array([1.0, 10.0]), 0.01, 0.1
    expected, passed = walk(conf, correct, costs, max_drop, delta)
    result = calibrate_scores(conf, correct, confidence="max-softmax", costs=costs, baseline_flops=10.0,
                              target=Target(max_drop=max_drop, delta=delta))
    search = np.setdiff1d(np.arange(conf.shape[1]), test)
    cands, right, cost, _ = cal._grid(conf[:, search], correct[:, search], costs)
    path = [DISABLED] + [float(cands[0][i]) for i in cal._pareto(right, cost)[::-1]]
    assert len(path) == 4 and path[1] > path[2] > path[3]

    def ok(t):  # the exact test of one set on the test rows
        g = np.where(conf[0, test] >= t, correct[0, test], correct[1, test])
        f = correct[1, test]
        return cal.drop_bound_exact(int((f & ~g).sum()), int((g & ~f).sum()), len(test), delta) <= max_drop

    assert [ok(t) for t in path[1:]] == [True, False, True]  # t3 alone would pass
    assert passed == 2 and expected == [path[1]]
    assert result.guarantee.passed == 2 and result.thresholds == pytest.approx([path[1]])
    assert result.guarantee.path_length == 4


def test_no_threshold_below_what_the_measure_can_give():
    """Gates at chance (max-softmax near 1/classes everywhere) and a target every set meets: the cheapest
    thresholds send everyone out at gate 0, and none lies below 1/classes, the lowest max-softmax."""
    rng = np.random.default_rng(0)
    classes, n = 10, 400
    logits = [rng.normal(0, 0.01, (n, classes)).astype(np.float32) for _ in range(3)]
    y = rng.integers(0, classes, n)
    for target in (Target(max_drop=0.5, guarantee="none"), Target(max_drop=0.5)):
        result = calibrate(logits, y, costs=[1.0, 2.0, 3.0], baseline_flops=3.0, target=target)
        assert result.validation.exit_fractions[0] == 1.0
        assert min(result.thresholds) >= np.float32(1 / classes), result.thresholds
