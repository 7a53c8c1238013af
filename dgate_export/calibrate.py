"""Choose the gates' thresholds on the validation split (numpy only).

Input: the logits of every exit (K gates, then the backbone's own classifier) on the validation split,
the labels, the confidence measure and the cost of leaving at each exit (cumulative FLOPs per sample:
segments 0..k plus heads 0..k, or measured times from `dgate-export profile`). A sample leaves at the
first gate k whose confidence is >= threshold k.

Targets:
- `max_drop` with guarantee "ltt" (the default): with probability at least 1 - delta over the draw of
  the validation rows, the expected accuracy drop on new data from the same distribution is at most
  max_drop; among the thresholds that carry this promise, the cheapest;
- `max_drop` with guarantee "none": accuracy >= un-gated accuracy - max_drop on the validation rows
  (optionally its normal-approximation upper bound, `upper_bound`), as cheap as possible;
- `budget`: spend at most budget × the un-gated model's cost on the validation rows, be as accurate
  as possible (no promise on new data).

The promise (Learn then Test: Angelopoulos, Bates, Candès, Jordan & Lei 2021; used for early exits by
CALM, Schuster et al. 2022). Per sample, d = [un-gated right] - [gated right] is -1, 0 or 1; the drop
is E[d] = P(worse) - P(better), where "worse" is "the gated model wrong, the un-gated right" and
"better" the reverse. Each threshold set is a hypothesis "its drop exceeds max_drop", tested with an
exact bound: the Clopper-Pearson upper bound of P(worse) at level delta/2 minus the lower bound of
P(better) at delta/2 (Bonferroni), both from binomial counts, so the test needs no normal approximation
and is valid for any number of rows. Why these counts: the drop takes three values, and a bound for any
[0, 1]-valued loss (Hoeffding-Bentkus) treats the ~98% of rows where both models agree as if they could
be anything, which costs several times more rows; bounding P(worse) alone is valid too but gives up the
rows the gates get right and the backbone wrong (a third of the disagreements on the benchmarks).
The rows are cut in two (seeded, `search_fraction` = 30% to search): on the search rows the grid below
gives every threshold set's counts, and the path is the sets that are Pareto-optimal in (cost, predicted
test bound), ordered from the un-gated model (no gate leaves, drop exactly 0) to the cheapest. The
other rows test the path in that order and stop at the first failure (fixed-sequence testing): because
the order was fixed without the test rows, the chance that any set passed has a drop above max_drop is
at most delta, and the cheapest of the passed sets (on all rows) is kept. The one assumption: the
validation rows and the new data are exchangeable (e.g. independent draws from one distribution);
data that drifts, or a validation split chosen by hand, void it. The promise is on the expected drop:
on a finite test set the measured drop scatters around it (by ~0.1-0.2 points on 10 000 rows).
If not even the first gated set passes, the error says so, with a rough estimate of the rows needed.

Search (both steps exact on the rows they see):
1. Grid: per gate, G candidate thresholds = G-1 quantiles of that gate's confidences, each moved
   half-way down to the next lower observed confidence (the same samples leave, but no sample sits on
   a threshold, where a backend computing the confidence in the last bits differently, ONNX Runtime or
   fp16, would flip it), plus "disabled" (above 1). Every sample falls in one cell of the K-dimensional
   histogram of candidate ranks; prefix sums over that histogram give the accuracy, cost and agreement
   count of *all* G^K threshold combinations at once, in O(N·K + G^K) time and memory. G is chosen so
   that G^K stays near one million (K=3: G=100; K=4: G=31), under a second for K=3 and 5000 samples.
2. Refine (guarantee "none" and budget): coordinate descent on the best grid point. For one gate at a
   time (others fixed), every distinct confidence value of that gate is a candidate; one sort and two
   cumulative sums evaluate them all (O(N log N) per step), ties kept together. Rounds repeat until no
   step improves (at most 20 rounds); the result is moved half-way down as in step 1.
Counts are integers, so "within max_drop" is decided without rounding surprises.

`holdout=F`: a seeded random fraction F of the rows is held out; the thresholds are chosen on the rest
and evaluated on the held-out rows (`Calibration.held_out`): their drop shows what the promise is worth
on new data without touching the test split.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from . import contract
from .confidence import check_confidence_name, confidence, lowest
from .contract import NEVER_EXIT
from .errors import UserError
from .files import write_text_atomic

DISABLED = NEVER_EXIT  # a threshold above every confidence: the gate never lets a sample leave
_GRID_CELLS = 1_000_000      # target size of the exhaustive grid (G^K)
_MAX_CANDIDATES = 1000       # cap on G for K = 1, 2
_MAX_ROUNDS = 20
GUARANTEES = ("ltt", "none")  # Learn then Test (default), or the drop held on the validation rows only
DEFAULT_DELTA = 0.1            # the promise holds with probability >= 1 - delta
DEFAULT_MAX_DROP = 0.01        # the target when neither max_drop nor budget is given
_SEARCH_NOISE = 1.0           # weight of the search rows' own noise in the order of the path
_TEST_CHUNK = 64              # threshold sets tested at once
SEARCH_FRACTION = 0.3          # of the validation rows, those that order the threshold path (ltt)


@dataclass
class Evaluation:
    """How a set of thresholds does on one data split."""

    thresholds: list[float]
    accuracy: float              # gated (early-exit) accuracy
    accuracy_ungated: float      # the backbone's own classifier on every sample
    exit_fractions: list[float]  # K+1 fractions of samples leaving at each exit
    exit_accuracy: list[float | None]  # accuracy of the samples that left at each exit (None: nobody)
    expected_flops: float        # per sample, gate heads included
    baseline_flops: float        # the un-gated backbone, per sample
    samples: int
    disagreement: float = 0.0    # fraction of samples that one of gated / un-gated gets right, the other wrong

    @property
    def accuracy_drop(self) -> float:
        return self.accuracy_ungated - self.accuracy

    def drop_upper_bound(self, level: float) -> float:
        """The drop's one-sided `level` upper confidence bound (paired normal approximation, as
        `calibrate(..., upper_bound=level)` holds it): how large the drop on new samples may be."""
        return float(_drop_bound(self.accuracy_drop, self.disagreement, self.samples, NormalDist().inv_cdf(level)))

    @property
    def flops_reduction(self) -> float:
        """1 - expected / baseline: the fraction of the un-gated model's FLOPs saved."""
        return 1.0 - self.expected_flops / self.baseline_flops

    @property
    def ideal_speedup(self) -> float:
        return self.baseline_flops / self.expected_flops

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(accuracy_drop=self.accuracy_drop, flops_reduction=self.flops_reduction,
                   ideal_speedup=self.ideal_speedup)
        return out


@dataclass
class Calibration:
    """Chosen thresholds, their figures on the validation split, and the accuracy-vs-cost front."""

    mode: str                    # "max_drop" or "budget"
    target: float                # the max_drop or the budget asked for
    confidence: str
    thresholds: list[float]
    validation: Evaluation
    curve: list[dict] = field(default_factory=list)  # Pareto front: thresholds, accuracy, flops, relative_flops
    method: str = ""
    upper_bound: float | None = None  # max_drop held by the drop's one-sided bound at this level
    holdout: float | None = None      # fraction of the rows held out of the choice
    held_out: Evaluation | None = None  # the thresholds on those rows
    guarantee: Guarantee | None = None  # how Learn then Test chose them (max_drop, guarantee "ltt")
    cost: dict | None = None            # what was minimized when not FLOPs (calibrate --cost: measured time)

    def promise(self) -> str:
        """The promise in one plain sentence."""
        if self.guarantee is not None:
            return self.guarantee.sentence()
        if self.mode == "max_drop":
            how = (f"its one-sided {self.upper_bound:.0%} normal-approximation upper bound"
                   if self.upper_bound is not None else "the drop")
            return (f"The accuracy drop is held to {self.target * 100:.3g} point(s) on the {self.validation.samples} "
                    f"validation rows ({how}); on new data it may be larger: no guarantee (--guarantee none).")
        return (f"The expected FLOPs are at most {self.target:g} x the un-gated model's on the "
                f"{self.validation.samples} validation rows; no promise on accuracy.")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target": self.target, "confidence": self.confidence,
                "thresholds": self.thresholds, "validation": self.validation.to_dict(),
                "method": self.method, "upper_bound": self.upper_bound, "holdout": self.holdout,
                "held_out": self.held_out.to_dict() if self.held_out is not None else None,
                "guarantee": asdict(self.guarantee) if self.guarantee is not None else None,
                "promise": self.promise(), "cost": self.cost, "curve": self.curve}


@dataclass(frozen=True)
class Target:
    """What the thresholds are chosen for: the one owner of the threshold target (gate, calibrate,
    calibrate --engine, the int8 / fp16 refit of build, the Python API).

    Exactly one of `max_drop` (an accuracy drop, as a fraction) or `budget` (expected FLOPs, or time
    with a cost profile, as a fraction of the un-gated model's); neither means DEFAULT_MAX_DROP.
    `guarantee` "ltt" makes max_drop a promise on new data with probability >= 1 - delta (module doc),
    "none" holds it on the validation rows only (or its normal `upper_bound` at that level).
    `holdout`: the fraction of the validation rows kept out of the choice and reported on.
    Checked when made: a Target that exists makes sense (UserError otherwise), so a bad flag is
    refused before any data is read.
    """

    max_drop: float | None = None
    budget: float | None = None
    guarantee: str = "ltt"
    delta: float = DEFAULT_DELTA
    upper_bound: float | None = None
    holdout: float | None = None

    def __post_init__(self) -> None:
        if self.max_drop is None and self.budget is None:
            object.__setattr__(self, "max_drop", DEFAULT_MAX_DROP)
        check_target(max_drop=self.max_drop, budget=self.budget, guarantee=self.guarantee, delta=self.delta,
                     upper_bound=self.upper_bound)
        if self.holdout is not None and not 0.0 < self.holdout < 1.0:
            raise UserError(f"holdout {self.holdout} is not a fraction in (0, 1).", "Give e.g. --holdout 0.3.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict | None) -> Target:
        """The Target a checkpoint or manifest recorded (unknown keys ignored; None: the default)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in (record or {}).items() if k in names})


def calibration_record(result: Calibration, target: Target) -> dict:
    """What a gated checkpoint records of its calibration: the target the thresholds were chosen for
    (build's int8 / fp16 refit defaults to it) and the exit mix on the validation rows they were chosen
    on (`rows` samples; the reference of `dgate-export drift`)."""
    return {"target": target.to_dict(), "thresholds": [float(t) for t in result.thresholds],
            "exit_fractions": [float(f) for f in result.validation.exit_fractions],
            "rows": int(result.validation.samples)}


def recorded_target(record: dict | None) -> Target:
    """The Target a calibration record names; the default Target when there is none (older files)."""
    return Target.from_dict((record or {}).get("target"))


def holdout_rows(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) sorted row indices of n rows: a seeded random `fraction` of them held out."""
    perm = np.random.default_rng(seed).permutation(n)
    k = round(n * fraction)
    return np.sort(perm[k:]), np.sort(perm[:k])


def exit_costs(flops: dict) -> list[float]:
    """Cumulative FLOPs per sample of leaving at exit k, from GatedModel.flops."""
    return contract.exit_costs(flops["segments"], flops["heads"])


def _prepare(exit_logits, labels, confidence_name: str, costs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(conf [K, N] float32, correct [K+1, N] bool, costs [K+1]) with the inputs checked."""
    check_confidence_name(confidence_name)
    labels = np.asarray(labels)
    if len(exit_logits) < 2:
        raise UserError("Calibration needs at least one gate (exit logits of K >= 1 gates plus the backbone).",
                        "Attach gates with --exits.")
    if len(costs) != len(exit_logits):
        raise ValueError(f"{len(costs)} exit costs for {len(exit_logits)} exits")
    n = labels.shape[0]
    if n == 0:
        raise UserError("The calibration split is empty.", "Use a validation split with samples in it.")
    for k, logits in enumerate(exit_logits):
        if logits.ndim != 2 or logits.shape[0] != n:
            raise ValueError(f"exit {k}: logits of shape {logits.shape} for {n} labels")
    conf = np.stack([confidence(confidence_name, lg) for lg in exit_logits[:-1]])
    correct = np.stack([np.argmax(lg, axis=1) == labels for lg in exit_logits])
    return conf, correct, np.asarray(costs, dtype=np.float64)


def exits_of(conf: np.ndarray, thresholds) -> np.ndarray:
    """Exit index [N] of every sample: the first gate whose confidence passes, else K."""
    num_gates, n = conf.shape
    exits = np.full(n, num_gates, dtype=np.int64)
    for k in range(num_gates - 1, -1, -1):
        exits[conf[k] >= thresholds[k]] = k
    return exits


def evaluate_scores(conf, correct, costs, baseline: float, thresholds) -> Evaluation:
    """Figures of `thresholds` on per-sample scores: confidences conf [K, N] and correctness correct [K+1, N]."""
    num_exits, n = correct.shape
    exits = exits_of(conf, thresholds)
    counts = np.bincount(exits, minlength=num_exits)
    right = np.bincount(exits, weights=correct[exits, np.arange(n)], minlength=num_exits)
    return Evaluation(
        thresholds=[float(t) for t in thresholds],
        accuracy=float(right.sum() / n),
        accuracy_ungated=float(correct[-1].mean()),
        exit_fractions=[float(c / n) for c in counts],
        exit_accuracy=[float(r / c) if c else None for r, c in zip(right, counts)],
        expected_flops=contract.expected_cost(costs, counts / n),
        baseline_flops=float(baseline),
        samples=int(n),
        disagreement=float(np.count_nonzero(correct[exits, np.arange(n)] != correct[-1]) / n),
    )


def evaluate(exit_logits, labels, *, confidence: str, thresholds, costs, baseline_flops: float) -> Evaluation:
    """Figures of `thresholds` on a split (exit logits of every exit and the labels)."""
    conf, correct, cost = _prepare(exit_logits, labels, confidence, costs)
    if len(thresholds) != conf.shape[0]:
        raise UserError(f"{len(thresholds)} thresholds given for {conf.shape[0]} gates.")
    return evaluate_scores(conf, correct, cost, baseline_flops, thresholds)


# --- step 1: the exhaustive grid -------------------------------------------------------------------


def _candidates(conf_k: np.ndarray, g: int, floor: float = 0.0) -> np.ndarray:
    """Up to g ascending thresholds: g-1 observed quantiles of conf_k, each moved down between it and the
    next lower observed value (`_between`: the same samples leave), then DISABLED."""
    qs = np.quantile(conf_k, np.linspace(0.0, 1.0, max(g - 1, 1)), method="inverted_cdf")
    return np.append(_between(conf_k, np.unique(qs.astype(np.float32)), floor), np.float32(DISABLED))


def _between(conf_k: np.ndarray, thresholds: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """Each threshold (an observed confidence of conf_k, or DISABLED) moved to the float32 midpoint
    between it and the next lower distinct observed confidence (below the smallest: `floor`, the lowest
    value the confidence measure can give, confidence.lowest): on these rows exactly the same samples
    pass `conf >= threshold`, but no sample sits on the boundary, so a backend whose confidences differ
    in the last bits (ONNX Runtime, fp16) does not flip one; and no threshold lies below what the measure
    can produce (max-softmax: 1/classes)."""
    t = np.asarray(thresholds, dtype=np.float32)
    values = np.unique(np.asarray(conf_k, dtype=np.float32))
    pos = np.searchsorted(values, t, side="left")
    lower = np.where(pos > 0, values[np.maximum(pos - 1, 0)], np.minimum(np.float32(floor), t))
    mid = ((lower.astype(np.float64) + t.astype(np.float64)) / 2).astype(np.float32)
    # float32 rounding may land the midpoint on the lower value (adjacent floats): keep t then.
    keep = (t >= np.float32(DISABLED)) | (mid <= lower) | (t <= 0)
    return np.where(keep, t, mid)


def _grid(conf, correct, costs, floor: float = 0.0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Candidates per gate; correct count, total cost and count of samples whose correctness equals the
    un-gated model's ("agree") for every combination (arrays of shape G_0..G_K-1)."""
    num_gates = conf.shape[0]
    g = int(min(_MAX_CANDIDATES, max(2, math.floor(_GRID_CELLS ** (1.0 / num_gates)))))
    cands = [_candidates(conf[k], g, floor) for k in range(num_gates)]
    sizes = [len(c) for c in cands]
    # rank[k][i] = how many candidates of gate k are <= conf[k, i]; sample i leaves at gate k under
    # candidate j exactly when rank > j.
    ranks = [np.searchsorted(cands[k], conf[k], side="right") for k in range(num_gates)]

    agree = correct == correct[-1]
    right = np.zeros(sizes, dtype=np.int64)
    same = np.zeros(sizes, dtype=np.int64)
    cost = np.zeros(sizes, dtype=np.float64)
    for k in range(num_gates + 1):
        dims = min(k + 1, num_gates)
        shape = [s + 1 for s in sizes[:dims]]
        flat = np.ravel_multi_index(tuple(ranks[d] for d in range(dims)), shape)
        hists = [np.bincount(flat, minlength=int(np.prod(shape)))]
        hists += [np.rint(np.bincount(flat, weights=w[k], minlength=int(np.prod(shape)))).astype(np.int64)
                  for w in (correct, agree)]
        leaving = []
        for h in hists:
            h = h.reshape(shape)
            # Prefix sums over the earlier gates' ranks (rank <= j: the sample did not leave there) ...
            for d in range(min(k, num_gates)):
                h = np.cumsum(h, axis=d)
            index = tuple(slice(0, sizes[d]) for d in range(dims))
            if k < num_gates:  # ... and a suffix over this gate's rank (rank > j: the sample leaves here).
                h = h.sum(axis=k, keepdims=True) - np.cumsum(h, axis=k)
            leaving.append(h[index][(Ellipsis,) + (None,) * (num_gates - dims)])
        cost = cost + leaving[0] * costs[k]
        right = right + leaving[1]
        same = same + leaving[2]
    return cands, right, cost, same


def _pareto(right: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Flat indices of the Pareto-optimal combinations, by increasing cost."""
    r, c = right.ravel(), cost.ravel()
    order = np.lexsort((-r, c))
    best = np.maximum.accumulate(r[order])
    keep = np.ones(order.size, dtype=bool)
    keep[1:] = r[order][1:] > best[:-1]
    return order[keep]


# --- step 2: coordinate descent ----------------------------------------------------------------------


def _better(mode: str, a: tuple[int, float], b: tuple[int, float]) -> bool:
    """Is (right, cost) `a` strictly better than `b` under the mode's constraint? Both are feasible."""
    if mode == "max_drop":
        return a[1] < b[1] - 1e-9 or (abs(a[1] - b[1]) <= 1e-9 and a[0] > b[0])
    return a[0] > b[0] or (a[0] == b[0] and a[1] < b[1] - 1e-9)


Feasible = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (right, same, cost) -> ok


def _feasibility(mode: str, limit: float, n: int, full_right: int, max_drop: float | None,
                 upper_bound: float | None) -> Feasible:
    """The mode's constraint on (correct count, agreeing count, total cost) arrays."""
    if mode == "budget":
        return lambda right, same, cost: cost <= limit * (1 + 1e-12)
    if upper_bound is None:
        return lambda right, same, cost: right >= limit
    z = NormalDist().inv_cdf(upper_bound)

    def ok(right, same, cost):
        return _drop_bound((full_right - right) / n, (n - same) / n, n, z) <= max_drop + 1e-12  # type: ignore[operator]

    return ok


def _drop_bound(drop, disagreement, n: int, z: float):
    """drop + z * standard error, per sample d_i = ungated_right_i - gated_right_i in {-1, 0, 1}:
    E[d^2] is the disagreement rate, so var(d) = disagreement - drop^2 (arrays or scalars)."""
    return drop + z * np.sqrt(np.maximum(disagreement - drop * drop, 0.0) / n)


def _split_counts(w: np.ndarray, k: int, through: np.ndarray, reach: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Count of w [K+1, N] (bool) over the samples at exits taken, for every candidate j of gate k (the j-th
    smallest confidence of the samples reaching it): samples order[j:] leave at k, order[:j] go on to
    `through`, where they go without gate k; samples not reaching gate k stay where they are."""
    idx = np.arange(w.shape[1])
    before = int(w[through[~reach], idx[~reach]].sum())
    passing = np.concatenate([[0], np.cumsum(w[through[reach], idx[reach]][order], dtype=np.int64)])
    leaving = np.concatenate([np.cumsum(w[k, reach][order][::-1], dtype=np.int64)[::-1], [0]])
    return before + passing + leaving


def _refine(conf, correct, costs, thresholds: list[float], mode: str, feasible: Feasible) -> list[float]:
    num_gates, n = conf.shape
    idx = np.arange(n)
    agree = correct == correct[-1]
    t = list(thresholds)
    exits = exits_of(conf, t)
    current = (int(correct[exits, idx].sum()), float(costs[exits].sum()))
    for _ in range(_MAX_ROUNDS):
        improved = False
        for k in range(num_gates):
            # Samples that reach gate k, and where they go when gate k lets them pass.
            trial = t.copy()
            trial[k] = DISABLED
            through = exits_of(conf, trial)
            reach = through >= k
            c_k = conf[k, reach]
            order = np.argsort(c_k, kind="stable")
            c_sorted = c_k[order]

            before_cost = float(costs[through[~reach]].sum())
            pass_cost_cum = np.concatenate([[0.0], np.cumsum(costs[through[reach]][order])])
            m = c_sorted.size
            leave_cost_suf = costs[k] * (m - np.arange(m + 1))
            # Ties: a threshold equal to a value lets all equal values leave, so only the first of a
            # run of equal values is a valid split point; j = m is "disabled".
            valid = np.ones(m + 1, dtype=bool)
            valid[1:m] = c_sorted[1:] != c_sorted[:-1]
            right = _split_counts(correct, k, through, reach, order)
            same = _split_counts(agree, k, through, reach, order)
            cost = before_cost + pass_cost_cum + leave_cost_suf
            ok = valid & feasible(right, same, cost)
            if not ok.any():
                continue
            js = np.nonzero(ok)[0]
            if mode == "max_drop":
                j = js[np.lexsort((-right[js], cost[js]))[0]]
            else:
                j = js[np.lexsort((cost[js], -right[js]))[0]]
            cand = (int(right[j]), float(cost[j]))
            if _better(mode, cand, current):
                t[k] = float(c_sorted[j]) if j < m else DISABLED
                current = cand
                improved = True
        if not improved:
            break
    return t


# --- step 3 (the default): Learn then Test ---------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _log_choose(m: int) -> np.ndarray:
    """log C(m, i) for i = 0..m."""
    i = np.arange(1, m + 1, dtype=np.float64)
    return np.concatenate([[0.0], np.cumsum(np.log(m - i + 1) - np.log(i))])


def _binomial_cdf(k: int, m: int, p: float) -> float:
    """P(Binomial(m, p) <= k), summed exactly in log space."""
    if k >= m or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    log_pmf = _log_choose(m)[: k + 1] + i * math.log(p) + (m - i) * math.log1p(-p)
    top = float(log_pmf.max())
    return min(1.0, math.exp(top) * float(np.exp(log_pmf - top).sum()))


@functools.lru_cache(maxsize=1 << 16)
def binomial_upper(k: int, m: int, alpha: float) -> float:
    """Clopper-Pearson one-sided upper bound: the largest p with P(Binomial(m, p) <= k) >= alpha, so
    P(p > bound) <= alpha for k ~ Binomial(m, p). Bisection (60 steps), rounded up."""
    if k >= m:
        return 1.0
    lo, hi = k / m, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binomial_cdf(k, m, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def binomial_lower(k: int, m: int, alpha: float) -> float:
    """Clopper-Pearson one-sided lower bound (by symmetry: 1 - the upper bound of the m - k failures)."""
    return 0.0 if k <= 0 else 1.0 - binomial_upper(m - k, m, alpha)


def drop_bound_exact(worse: int, better: int, m: int, delta: float) -> float:
    """An upper bound on the expected drop that holds with probability >= 1 - delta, from m exchangeable
    rows of which `worse` the gated model gets wrong and the un-gated right, `better` the reverse.
    Drop = P(worse) - P(better); Clopper-Pearson bounds at delta/2 each (Bonferroni)."""
    return binomial_upper(int(worse), int(m), delta / 2) - binomial_lower(int(better), int(m), delta / 2)


def _disagreements(conf, correct, path: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each threshold set (rows of path [P, K]): (worse, better, cost-exit counts [P, K+1]) on the rows."""
    num_gates, n = conf.shape
    full = correct[-1]
    worse, better, counts = [], [], []
    for start in range(0, len(path), chunk):
        t = path[start:start + chunk]
        exits = np.full((len(t), n), num_gates, dtype=np.int64)
        for k in range(num_gates - 1, -1, -1):
            exits[conf[k][None, :] >= t[:, k:k + 1]] = k
        gated = correct[exits, np.arange(n)[None, :]]
        worse.append(np.count_nonzero(full & ~gated, axis=1))
        better.append(np.count_nonzero(gated & ~full, axis=1))
        counts.append(np.stack([np.count_nonzero(exits == k, axis=1) for k in range(num_gates + 1)], axis=1))
    return np.concatenate(worse), np.concatenate(better), np.concatenate(counts)


def _predicted_bound(right: np.ndarray, same: np.ndarray, full_right: int, n: int, m: int, delta: float) -> np.ndarray:
    """What the test's bound on m rows is expected to be, from counts on n search rows (the normal
    approximation: drop + z * sd / sqrt(m)). It only orders the path, so it need not be exact; a set whose
    drop is low but whose disagreements are many comes late, where it does not stop the test early."""
    drop = (full_right - right) / n
    disagree = (n - same) / n
    sd = np.sqrt(np.maximum(disagree - drop * drop, 0.0))
    return drop + NormalDist().inv_cdf(1 - delta / 2) * sd * (1 / math.sqrt(m) + _SEARCH_NOISE / math.sqrt(n))


def rows_needed(worse_rate: float, better_rate: float, max_drop: float, delta: float) -> int | None:
    """Test rows at which a threshold set with these disagreement rates would pass the test (expected
    counts), None when no number of rows would (its drop is not below max_drop)."""
    if worse_rate - better_rate >= max_drop:
        return None

    def passes(m: int) -> bool:
        return drop_bound_exact(round(worse_rate * m), round(better_rate * m), m, delta) <= max_drop

    lo, hi = 1, 64
    while not passes(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return None
    while hi - lo > max(1, lo // 100):  # to 1%
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


@dataclass
class Guarantee:
    """How Learn then Test chose the thresholds (Calibration.guarantee)."""

    method: str                  # "learn-then-test"
    delta: float
    max_drop: float
    search_rows: int             # rows that ordered the path
    test_rows: int               # rows that tested it
    path_length: int             # threshold sets on the path, the un-gated one first
    passed: int                  # of them passed before the first failure (the un-gated one included)
    drop_bound: float            # the chosen set's (1 - delta) upper bound on the expected drop
    test_drop: float             # its drop on the test rows

    def sentence(self) -> str:
        return (f"With probability at least {1 - self.delta:.0%} over the draw of the {self.search_rows + self.test_rows}"
                f" validation rows, the expected accuracy drop on new data from the same distribution is at most "
                f"{self.max_drop * 100:.3g} point{'s' if self.max_drop != 0.01 else ''} (Learn then Test; assumes the "
                "validation rows and the new data are exchangeable, e.g. drawn independently from one distribution).")


def _fixed_sequence(conf, correct, path: np.ndarray, max_drop: float, delta: float) -> int:
    """How many threshold sets of path [P, K] pass, in order, before the first failure (path[0] is the
    un-gated model and passes untested): each set is tested at level delta on these rows; stopping at the
    first failure keeps the chance that any passed set's drop exceeds max_drop at most delta."""
    m = conf.shape[1]
    passed = 1
    for start in range(1, len(path), _TEST_CHUNK):
        worse, better, _ = _disagreements(conf, correct, path[start:start + _TEST_CHUNK])
        ok = [drop_bound_exact(w, b, m, delta) <= max_drop for w, b in zip(worse, better)]
        first_fail = ok.index(False) if False in ok else len(ok)
        passed += first_fail
        if first_fail < len(ok):
            break
    return passed


def _learn_then_test(conf, correct, costs, max_drop: float, delta: float, search_fraction: float,
                     seed: int, floor: float = 0.0) -> tuple[list[float], Guarantee, tuple]:
    """Thresholds whose expected drop is <= max_drop with probability >= 1 - delta (module doc)."""
    num_gates, n = conf.shape
    test, search = holdout_rows(n, search_fraction, seed)
    if len(search) == 0 or len(test) == 0:
        raise UserError(f"{n} validation rows cannot be cut into a search part and a test part.",
                        "Calibrate on more rows (at least a few hundred).")
    s_conf, s_correct = conf[:, search], correct[:, search]
    cands, right, cost, same = _grid(s_conf, s_correct, costs, floor)
    front = _pareto(-_predicted_bound(right, same, int(s_correct[-1].sum()), len(search), len(test), delta),
                    cost)[::-1]  # from the lowest predicted bound (the most expensive) to the cheapest
    combos = np.stack(np.unravel_index(front, right.shape), axis=1)
    path = np.stack([cands[k][combos[:, k]] for k in range(num_gates)], axis=1).astype(np.float32)
    disabled = np.full((1, num_gates), DISABLED, dtype=np.float32)
    if not (path[0] >= DISABLED).all():
        path = np.concatenate([disabled, path])  # the un-gated model: drop exactly 0, passes without a test
    t_conf, t_correct = conf[:, test], correct[:, test]
    m = len(test)
    passed = _fixed_sequence(t_conf, t_correct, path, max_drop, delta)
    if passed == 1:
        # Only a hint (no promise rests on it): the rates of the path's first sets on all the rows.
        a_worse, a_better, _ = _disagreements(conf, correct, path[1:])
        # Laplace-smoothed rates: a set with no disagreement on a few rows is not taken as never disagreeing.
        needs = [rows_needed((w + 1) / (n + 2), b / (n + 2), max_drop, delta) for w, b in zip(a_worse, a_better)]
        finite = [r for r in needs if r is not None]
        hint = (f"about {math.ceil(min(finite) / (1 - search_fraction)):,} validation rows (a rough estimate from the "
                "disagreement rates of the path's thresholds on these rows)" if finite else
                "more rows than an estimate can tell: every gated threshold set on the path drops at least that much "
                "on these rows")
        raise UserError(
            f"No gated thresholds keep the accuracy drop within {max_drop:g} with probability {1 - delta:g}: with "
            f"{m} test rows (of {n} validation rows) even the most cautious gated thresholds fail the test. "
            f"The promise would need {hint}.",
            "Calibrate on more validation rows, allow a larger --max-drop or --delta, or use --guarantee none "
            "(the drop held on the validation rows only, no promise on new data).")
    chosen = path[:passed]
    # Every set that passed is valid together (fixed-sequence testing controls the family-wise error): take
    # the cheapest on all the validation rows.
    _, _, counts = _disagreements(conf, correct, chosen)
    pick = int(np.argmin(counts @ costs))
    worse, better, _ = _disagreements(t_conf, t_correct, chosen[pick:pick + 1])
    guarantee = Guarantee("learn-then-test", float(delta), float(max_drop), len(search), m, len(path), passed,
                          float(drop_bound_exact(int(worse[0]), int(better[0]), m, delta)),
                          float((worse[0] - better[0]) / m))
    return [float(v) for v in chosen[pick]], guarantee, (cands, right, cost, len(search))


# --- the entry point ---------------------------------------------------------------------------------


def check_target(*, max_drop: float | None, budget: float | None, guarantee: str, delta: float,
                 upper_bound: float | None = None, search_fraction: float = SEARCH_FRACTION) -> None:
    """Refuse a calibration target that makes no sense (UserError), before any work."""
    if (max_drop is None) == (budget is None):
        raise UserError("Give exactly one calibration target: max_drop or budget.",
                        "Use --max-drop 0.01 (accuracy) or --budget 0.5 (FLOPs), not both.")
    if max_drop is not None and not 0.0 <= max_drop < 1.0:
        raise UserError(f"max_drop {max_drop} is not an accuracy drop in [0, 1).",
                        "Give the drop as a fraction: 0.01 is one point of accuracy.")
    if budget is not None and not budget > 0.0:
        raise UserError(f"budget {budget} must be positive.",
                        "Give the budget as a fraction of the un-gated model's FLOPs, e.g. 0.5.")
    if guarantee not in GUARANTEES:
        raise UserError(f"Unknown guarantee {guarantee!r}.", f"Use one of {', '.join(GUARANTEES)}.")
    if not 0.0 < delta < 1.0:
        raise UserError(f"delta {delta} is not a probability in (0, 1).",
                        "Give e.g. --delta 0.1: the promise then holds with probability at least 90%.")
    if not 0.0 < search_fraction < 1.0:
        raise UserError(f"search fraction {search_fraction} is not in (0, 1).", "Give e.g. 0.3.")
    if upper_bound is not None and (max_drop is None or not 0.5 <= upper_bound < 1.0):
        raise UserError(f"upper_bound {upper_bound} needs max_drop and a level in [0.5, 1).",
                        "Give e.g. --max-drop 0.01 --upper-bound 0.9 (a 90% one-sided bound on the drop).")
    if upper_bound is not None and guarantee != "none":
        raise UserError("--upper-bound (a normal approximation on the validation rows) replaces the default "
                        "guarantee, whose promise is exact.",
                        "Drop --upper-bound, or add --guarantee none to use it.")


def calibrate(exit_logits, labels, *, confidence: str = "max-softmax", costs, baseline_flops: float,
              target: Target | None = None, refine: bool = True, seed: int = 0,
              search_fraction: float = SEARCH_FRACTION) -> Calibration:
    """Thresholds for `target` (default: Target(), the default promise) on the validation split: the
    exit logits of every exit and the labels. See `calibrate_scores`."""
    conf, correct, cost_k = _prepare(exit_logits, labels, confidence, costs)
    return calibrate_scores(conf, correct, confidence=confidence, costs=cost_k, baseline_flops=baseline_flops,
                            target=target, refine=refine, seed=seed, search_fraction=search_fraction,
                            num_classes=int(np.asarray(exit_logits[0]).shape[1]))


def calibrate_scores(conf: np.ndarray, correct: np.ndarray, *, confidence: str, costs, baseline_flops: float,
                     target: Target | None = None, refine: bool = True, seed: int = 0,
                     search_fraction: float = SEARCH_FRACTION, num_classes: int | None = None) -> Calibration:
    """Thresholds for `target` on per-sample scores: confidences conf [K, N] (float32) and correctness
    correct [K+1, N] (bool) of every exit. With max_drop and guarantee "ltt" (the default) the expected
    drop on new data is <= max_drop with probability >= 1 - delta (Learn then Test, module doc); with
    guarantee "none" the drop is held on these rows only, or with `upper_bound` (e.g. 0.9) its
    normal-approximation upper bound at that level. With `holdout` (e.g. 0.3) that fraction of the rows
    (seeded by `seed`) is kept out of the choice and reported on (`Calibration.held_out`). With
    `num_classes`, no threshold lies below the lowest confidence the measure can give (confidence.lowest)."""
    target = target or Target()
    floor = lowest(confidence, num_classes) if num_classes else 0.0
    check_target(max_drop=target.max_drop, budget=target.budget, guarantee=target.guarantee, delta=target.delta,
                 upper_bound=target.upper_bound, search_fraction=search_fraction)
    if target.holdout is None:
        return _choose(conf, correct, confidence=confidence, costs=costs, baseline_flops=baseline_flops,
                       goal=target, refine=refine, seed=seed, search_fraction=search_fraction, floor=floor)
    n = conf.shape[1]
    kept, out = holdout_rows(n, target.holdout, seed)
    if not len(kept) or not len(out):
        raise UserError(f"holdout {target.holdout} leaves {len(kept)} rows to calibrate on and {len(out)} to check "
                        f"({n} in all).", "Give a fraction in (0, 1) such as 0.3, or use more validation rows.")
    result = _choose(conf[:, kept], correct[:, kept], confidence=confidence, costs=costs,
                     baseline_flops=baseline_flops, goal=target, refine=refine, seed=seed,
                     search_fraction=search_fraction, floor=floor)
    result.holdout = target.holdout
    result.method += f"; {len(out)} rows ({target.holdout:g}) held out and checked"
    result.held_out = evaluate_scores(conf[:, out], correct[:, out], np.asarray(costs, dtype=np.float64),
                                      baseline_flops, result.thresholds)
    return result


def _choose(conf: np.ndarray, correct: np.ndarray, *, confidence: str, costs, baseline_flops: float,
            goal: Target, refine: bool, seed: int, search_fraction: float, floor: float = 0.0) -> Calibration:
    max_drop, budget, upper_bound, delta, guarantee = goal.max_drop, goal.budget, goal.upper_bound, goal.delta, \
        goal.guarantee
    cost_k = np.asarray(costs, dtype=np.float64)
    num_gates, n = conf.shape
    baseline = float(baseline_flops)
    full_right = int(correct[-1].sum())
    promise = None
    if max_drop is not None and guarantee == "ltt":
        mode, target = "max_drop", float(max_drop)
        thresholds, promise, (cands, right, cost, grid_n) = _learn_then_test(
            conf, correct, cost_k, target, delta, search_fraction, seed, floor)
        grid = "×".join(str(len(c)) for c in cands)
        method = (f"Learn then Test: a path of {promise.path_length} threshold sets (the Pareto front of an "
                  f"exhaustive {grid} grid on {promise.search_rows} search rows, from the un-gated model to the "
                  f"cheapest) tested in order on {promise.test_rows} other rows until the first failure, exact "
                  f"binomial bounds at delta {delta:g}; {promise.passed} passed, the cheapest of them kept")
    else:
        cands, right, cost, same = _grid(conf, correct, cost_k, floor)
        grid_n = n
        if max_drop is not None:
            mode, target = "max_drop", float(max_drop)
            # Integer sample counts: at least this many must stay correct.
            limit = float(math.ceil(full_right - max_drop * n - 1e-9))
        else:
            mode, target = "budget", float(budget)  # type: ignore[arg-type]
            limit = budget * baseline * n  # type: ignore[operator]
        check = _feasibility(mode, limit, n, full_right, max_drop, upper_bound)
        feasible = check(right, same, cost)
        if mode == "budget" and not feasible.any():
            cheapest = float(cost.min() / n)
            raise UserError(
                f"No thresholds meet a budget of {budget:.3g} × the un-gated FLOPs on the validation split: "
                f"the cheapest gated run (every sample leaving at the first gate) costs {cheapest:.4g} FLOPs "
                f"per sample, {cheapest / baseline:.3f} of the un-gated {baseline:.4g}.",
                f"Raise the budget to at least {math.ceil(cheapest / baseline * 1000) / 1000:.3f}, "
                "or put the first gate earlier.")
        if not feasible.any():
            # Only possible when even disabling every gate misses the target (max_drop >= 0 always fits).
            best = float(right.max() / n)
            raise UserError(f"No thresholds keep accuracy within {max_drop} of the un-gated "
                            f"{full_right / n:.4f}; the best gated accuracy is {best:.4f}.",
                            "Allow a larger --max-drop.")
        flat_right, flat_cost = right.ravel(), cost.ravel()
        ids = np.nonzero(feasible.ravel())[0]
        if mode == "max_drop":
            best_id = ids[np.lexsort((-flat_right[ids], flat_cost[ids]))[0]]
        else:
            best_id = ids[np.lexsort((flat_cost[ids], -flat_right[ids]))[0]]
        combo = np.unravel_index(best_id, right.shape)
        thresholds = [float(cands[k][combo[k]]) for k in range(num_gates)]
        if refine:
            thresholds = _refine(conf, correct, cost_k, thresholds, mode, check)
        thresholds = [float(_between(conf[k], np.array([t]), floor)[0]) for k, t in enumerate(thresholds)]
        grid = "×".join(str(len(c)) for c in cands)
        method = (f"exhaustive grid of {grid} confidence-quantile thresholds on {n} validation samples"
                  + (", refined by coordinate descent over every distinct confidence value" if refine else "")
                  + (f"; the drop's one-sided {upper_bound:.0%} upper confidence bound held to max_drop"
                     if upper_bound is not None else ""))

    validation = evaluate_scores(conf, correct, cost_k, baseline, thresholds)
    curve = []
    flat_right, flat_cost = right.ravel(), cost.ravel()
    for fid in _pareto(right, cost):
        c = np.unravel_index(fid, right.shape)
        curve.append({"thresholds": [float(cands[k][c[k]]) for k in range(num_gates)],
                      "accuracy": float(flat_right[fid] / grid_n), "flops": float(flat_cost[fid] / grid_n),
                      "relative_flops": float(flat_cost[fid] / grid_n / baseline)})
    return Calibration(mode, target, confidence, thresholds, validation, curve, method, upper_bound,
                       guarantee=promise)


# --- the curve on disk ------------------------------------------------------------------------------


def save_curve(result: Calibration, json_path: str | os.PathLike, *, test: Evaluation | None = None) -> Path:
    """Write the calibration (with its accuracy-vs-cost front) as JSON; render.calibration_plot draws it."""
    payload = result.to_dict()
    if test is not None:
        payload["test"] = test.to_dict()
    return write_text_atomic(json_path, json.dumps(payload, indent=1) + "\n")
