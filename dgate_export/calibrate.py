"""Choose the gates' thresholds on the validation split (numpy only).

Input: the logits of every exit (K gates, then the backbone's own classifier) on the validation split,
the labels, the confidence measure and the cost of leaving at each exit (cumulative FLOPs per sample:
segments 0..k plus heads 0..k). A sample leaves at the first gate k whose confidence is >= threshold k.

Two modes:
- `max_drop`: keep accuracy >= (un-gated accuracy - max_drop), spend as few FLOPs as possible;
- `budget`: spend at most budget × the un-gated model's FLOPs, be as accurate as possible.

Method (two steps, both exact on the validation samples):
1. Grid: per gate, G candidate thresholds = G-1 quantiles of that gate's confidences (observed values,
   so each candidate moves at least one sample) plus "disabled" (above 1). Every sample falls in one
   cell of the K-dimensional histogram of candidate ranks; prefix sums over that histogram give the
   accuracy and cost of *all* G^K threshold combinations at once, in O(N·K + G^K) time and memory.
   G is chosen so that G^K stays near one million (K=3: G=100; K=4: G=31), so the search takes well
   under a second for K=3 and 5000 samples. The accuracy-vs-cost Pareto front comes from this grid.
2. Refine: coordinate descent on the best grid point. For one gate at a time (others fixed), every
   distinct confidence value of that gate is a candidate; one sort and two cumulative sums evaluate
   them all (O(N log N) per step). Rounds repeat until no step improves (at most 20 rounds).
Counts are integers, so "within max_drop" is decided without rounding surprises.

`upper_bound=P` (max_drop mode): thresholds chosen this way are the cheapest that pass on *these*
samples, so on new data they drop more than on the calibration split (the winner's curse; 0.5-0.7
points more in benchmarks/). With P, the drop's one-sided P upper confidence bound must be within
max_drop instead of the drop itself. The bound is the paired normal approximation: per sample
d = [un-gated right] - [gated right] in {-1, 0, 1}, bound = mean(d) + z_P * std(d) / sqrt(N); only the
samples on which the two disagree make std(d) non-zero. Both steps track that count too.

`holdout=F`: a seeded random fraction F of the rows is held out; the thresholds are chosen on the rest
and evaluated on the held-out rows (`Calibration.held_out`). Those rows never influenced the choice,
so their drop shows what the promise is worth on new data without touching the test split (in
benchmarks/, a held-out half predicted the test drop within 0.3 points, where the calibration rows
were 1-2 points optimistic).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from .confidence import check_confidence_name, confidence
from .errors import UserError

# A threshold above every confidence (all confidences are <= 1): the gate never lets a sample leave.
# The same value GatedModel uses for gates that have not been calibrated.
DISABLED = 1.01
_GRID_CELLS = 1_000_000      # target size of the exhaustive grid (G^K)
_MAX_CANDIDATES = 1000       # cap on G for K = 1, 2
_MAX_ROUNDS = 20


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

    def to_dict(self) -> dict:
        return {"mode": self.mode, "target": self.target, "confidence": self.confidence,
                "thresholds": self.thresholds, "validation": self.validation.to_dict(),
                "method": self.method, "upper_bound": self.upper_bound, "holdout": self.holdout,
                "held_out": self.held_out.to_dict() if self.held_out is not None else None,
                "curve": self.curve}


def holdout_rows(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) sorted row indices of n rows: a seeded random `fraction` of them held out."""
    perm = np.random.default_rng(seed).permutation(n)
    k = round(n * fraction)
    return np.sort(perm[k:]), np.sort(perm[:k])


def exit_costs(flops: dict) -> list[float]:
    """Cumulative FLOPs per sample of leaving at exit k, from GatedModel.flops."""
    costs, total = [], 0.0
    num_gates = len(flops["heads"])
    for k in range(num_gates + 1):
        total += flops["segments"][k] + (flops["heads"][k] if k < num_gates else 0)
        costs.append(float(total))
    return costs


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


def _exits_of(conf: np.ndarray, thresholds) -> np.ndarray:
    """Exit index [N] of every sample: the first gate whose confidence passes, else K."""
    num_gates, n = conf.shape
    exits = np.full(n, num_gates, dtype=np.int64)
    for k in range(num_gates - 1, -1, -1):
        exits[conf[k] >= thresholds[k]] = k
    return exits


def _evaluate(conf, correct, costs, baseline: float, thresholds) -> Evaluation:
    num_exits, n = correct.shape
    exits = _exits_of(conf, thresholds)
    counts = np.bincount(exits, minlength=num_exits)
    right = np.bincount(exits, weights=correct[exits, np.arange(n)], minlength=num_exits)
    return Evaluation(
        thresholds=[float(t) for t in thresholds],
        accuracy=float(right.sum() / n),
        accuracy_ungated=float(correct[-1].mean()),
        exit_fractions=[float(c / n) for c in counts],
        exit_accuracy=[float(r / c) if c else None for r, c in zip(right, counts)],
        expected_flops=float((counts * costs).sum() / n),
        baseline_flops=float(baseline),
        samples=int(n),
        disagreement=float(np.count_nonzero(correct[exits, np.arange(n)] != correct[-1]) / n),
    )


def evaluate(exit_logits, labels, *, confidence: str, thresholds, costs, baseline_flops: float) -> Evaluation:
    """Figures of `thresholds` on a split (exit logits of every exit and the labels)."""
    conf, correct, cost = _prepare(exit_logits, labels, confidence, costs)
    if len(thresholds) != conf.shape[0]:
        raise UserError(f"{len(thresholds)} thresholds given for {conf.shape[0]} gates.")
    return _evaluate(conf, correct, cost, baseline_flops, thresholds)


# --- step 1: the exhaustive grid -------------------------------------------------------------------


def _candidates(conf_k: np.ndarray, g: int) -> np.ndarray:
    """Up to g ascending thresholds: g-1 observed quantiles of conf_k, then DISABLED."""
    qs = np.quantile(conf_k, np.linspace(0.0, 1.0, max(g - 1, 1)), method="inverted_cdf")
    return np.append(np.unique(qs.astype(np.float32)), np.float32(DISABLED))


def _grid(conf, correct, costs) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Candidates per gate; correct count, total cost and count of samples whose correctness equals the
    un-gated model's ("agree") for every combination (arrays of shape G_0..G_K-1)."""
    num_gates = conf.shape[0]
    g = int(min(_MAX_CANDIDATES, max(2, math.floor(_GRID_CELLS ** (1.0 / num_gates)))))
    cands = [_candidates(conf[k], g) for k in range(num_gates)]
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
    exits = _exits_of(conf, t)
    current = (int(correct[exits, idx].sum()), float(costs[exits].sum()))
    for _ in range(_MAX_ROUNDS):
        improved = False
        for k in range(num_gates):
            # Samples that reach gate k, and where they go when gate k lets them pass.
            trial = t.copy()
            trial[k] = DISABLED
            through = _exits_of(conf, trial)
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


# --- the entry point ---------------------------------------------------------------------------------


def calibrate(exit_logits, labels, *, confidence: str = "max-softmax", costs, baseline_flops: float,
              max_drop: float | None = None, budget: float | None = None, refine: bool = True,
              upper_bound: float | None = None, holdout: float | None = None, seed: int = 0) -> Calibration:
    """Thresholds for `max_drop` or `budget` (exactly one) on the validation split; with `upper_bound`
    (e.g. 0.9) the drop's one-sided upper confidence bound at that level is held to max_drop; with
    `holdout` (e.g. 0.3) that fraction of the rows (seeded by `seed`) is kept out of the choice and
    reported on. See the module doc."""
    if (max_drop is None) == (budget is None):
        raise UserError("Give exactly one calibration target: max_drop or budget.",
                        "Use --max-drop 0.01 (accuracy) or --budget 0.5 (FLOPs), not both.")
    if max_drop is not None and not 0.0 <= max_drop < 1.0:
        raise UserError(f"max_drop {max_drop} is not an accuracy drop in [0, 1).",
                        "Give the drop as a fraction: 0.01 is one point of accuracy.")
    if budget is not None and not budget > 0.0:
        raise UserError(f"budget {budget} must be positive.",
                        "Give the budget as a fraction of the un-gated model's FLOPs, e.g. 0.5.")
    if upper_bound is not None and (max_drop is None or not 0.5 <= upper_bound < 1.0):
        raise UserError(f"upper_bound {upper_bound} needs max_drop and a level in [0.5, 1).",
                        "Give e.g. --max-drop 0.01 --upper-bound 0.9 (a 90% one-sided bound on the drop).")
    held = None
    if holdout is not None:
        kept, out = holdout_rows(len(labels), holdout, seed) if 0.0 < holdout < 1.0 else ([], [])
        if not len(kept) or not len(out):
            raise UserError(f"holdout {holdout} leaves {len(kept)} rows to calibrate on and {len(out)} to check "
                            f"({len(labels)} in all).", "Give a fraction in (0, 1) such as 0.3.")
        labels = np.asarray(labels)
        held = ([lg[out] for lg in exit_logits], labels[out])
        exit_logits, labels = [lg[kept] for lg in exit_logits], labels[kept]
    conf, correct, cost_k = _prepare(exit_logits, labels, confidence, costs)
    num_gates, n = conf.shape
    baseline = float(baseline_flops)
    full_right = int(correct[-1].sum())

    cands, right, cost, same = _grid(conf, correct, cost_k)
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

    validation = _evaluate(conf, correct, cost_k, baseline, thresholds)
    curve = []
    for fid in _pareto(right, cost):
        c = np.unravel_index(fid, right.shape)
        curve.append({"thresholds": [float(cands[k][c[k]]) for k in range(num_gates)],
                      "accuracy": float(flat_right[fid] / n), "flops": float(flat_cost[fid] / n),
                      "relative_flops": float(flat_cost[fid] / n / baseline)})
    grid = "×".join(str(len(c)) for c in cands)
    method = (f"exhaustive grid of {grid} confidence-quantile thresholds on {n} validation samples"
              + (", refined by coordinate descent over every distinct confidence value" if refine else "")
              + (f"; the drop's one-sided {upper_bound:.0%} upper confidence bound held to max_drop"
                 if upper_bound is not None else "")
              + (f"; {len(held[1])} rows ({holdout:g}) held out and checked" if held is not None else ""))
    held_out = None
    if held is not None:
        held_out = evaluate(held[0], held[1], confidence=confidence, thresholds=thresholds, costs=costs,
                            baseline_flops=baseline)
    return Calibration(mode, target, confidence, thresholds, validation, curve, method, upper_bound,
                       holdout, held_out)


# --- the curve on disk ------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_curve(result: Calibration, json_path: str | os.PathLike, png_path: str | os.PathLike | None = None,
               *, test: Evaluation | None = None) -> None:
    """Write the calibration (with its accuracy-vs-cost front) as JSON and, optionally, a PNG plot."""
    payload = result.to_dict()
    if test is not None:
        payload["test"] = test.to_dict()

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")

    _atomic_write(Path(json_path), write_json)
    if png_path is None:
        return
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    val = result.validation
    fig = Figure(figsize=(6.4, 4.4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p["relative_flops"] for p in result.curve]
    ys = [100 * p["accuracy"] for p in result.curve]
    ax.step(xs, ys, where="post", color="tab:blue", label="gated, validation (Pareto front)")
    ax.axhline(100 * val.accuracy_ungated, color="gray", ls="--", lw=1)
    ax.plot([1.0], [100 * val.accuracy_ungated], "D", color="gray", label="un-gated, validation")
    ax.plot([val.expected_flops / val.baseline_flops], [100 * val.accuracy], "o", color="tab:red",
            label=f"chosen ({result.mode}={result.target:g}), validation")
    if test is not None:
        ax.plot([test.expected_flops / test.baseline_flops], [100 * test.accuracy], "s", color="tab:green",
                label="chosen, test")
    ax.set_xlabel("expected FLOPs / un-gated FLOPs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Accuracy vs cost ({result.confidence})")
    lo = min(ys + [100 * val.accuracy]) if ys else 100 * val.accuracy
    ax.set_ylim(max(lo - 1, 100 * val.accuracy_ungated - 15), 100 * val.accuracy_ungated + 2)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png"))


# --- the report on the terminal ---------------------------------------------------------------------


def print_report(result: Calibration, test: Evaluation | None, exits: list[str], *, console=None) -> None:
    """Rich tables: un-gated vs gated (validation and test), then every exit's share and accuracy."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    val = result.validation
    target = (f"accuracy drop <= {result.target:g}" if result.mode == "max_drop"
              else f"expected FLOPs <= {result.target:g} x un-gated")
    summary = Table(title=f"Gating ({result.confidence}; thresholds for {target} on validation)")
    for col in ("split", "un-gated", "gated", "drop", "FLOPs gated / un-gated", "saved", "ideal"):
        summary.add_column(col, justify="left" if col == "split" else "right")
    for name, ev in (("val", val), ("val, held out", result.held_out), ("test", test)):
        if ev is None:
            continue
        summary.add_row(name, f"{ev.accuracy_ungated:.2%}", f"{ev.accuracy:.2%}", f"{ev.accuracy_drop:+.2%}",
                        f"{_si(ev.expected_flops)} / {_si(ev.baseline_flops)}", f"{ev.flops_reduction:.1%}",
                        f"{ev.ideal_speedup:.2f}x")
    console.print(summary)

    per_exit = Table(title="Exits (share of samples leaving there; accuracy of those samples)")
    for col in ("exit", "after", "threshold", "val share", "test share", "test acc"):
        per_exit.add_column(col, justify="left" if col == "after" else "right")
    names = list(exits) + ["backbone output"]
    for k, name in enumerate(names):
        gate = k < len(result.thresholds)
        acc = test.exit_accuracy[k] if test is not None else None
        per_exit.add_row(
            str(k), name,
            ("disabled" if result.thresholds[k] >= DISABLED else f"{result.thresholds[k]:.4f}") if gate else "-",
            f"{val.exit_fractions[k]:.1%}",
            f"{test.exit_fractions[k]:.1%}" if test is not None else "-",
            f"{acc:.2%}" if acc is not None else "-",
        )
    console.print(per_exit)


def _si(flops: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g}{unit}"
    return f"{flops:.0f}"
