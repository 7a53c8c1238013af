"""The drift signal: is the served exit mix still the one the thresholds were calibrated on?

Thresholds are chosen on validation rows, and their promise (calibrate.py) holds for data from the same
distribution. A shift in the data shows first as a change in how many samples leave at each exit: a
darker camera, a new class mix. The bundle records the exit mix of its calibration rows
(`reference_of`: counts per exit on `rows` validation samples); `exit_mix_test` compares a served
window's counts with it.

The test: Pearson's chi-square test of homogeneity on the 2 x (K+1) table (calibration rows, served
samples) x exit. Why this one:
- it compares the whole exit distribution at once (one test, not one per exit, so no multiplicity over
  exits);
- it is two-sample: the reference is itself a sample (a few thousand rows, so its fractions are known
  to about a point), and a goodness-of-fit test against fixed fractions would call that noise drift
  once windows are large;
- its false alarms are controlled: under no drift (served samples exchangeable with the calibration
  rows, the assumption the accuracy promise rests on), a window raises an alarm with probability at
  most `alpha` (asymptotically; exits whose expected count is below MIN_EXPECTED are merged with a
  neighbouring exit so that the approximation holds). Disjoint windows make the alarms of different
  windows independent given the reference: about alpha x windows false alarms in all;
- it needs no library: the chi-square tail for integer degrees of freedom has a closed form (`chi2_sf`).
Samples are treated as independent: a client that sends many near-identical images in one request
counts them all. Measured false-alarm and detection rates: docs/serving.md, "The drift signal".
"""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .manifest import Manifest

DEFAULT_ALPHA = 0.001
MIN_EXPECTED = 5.0
SAMPLES_METRIC = "dgate_exit_samples_total"


@dataclass
class Reference:
    """The exit mix the bundle's thresholds gave on its calibration rows."""

    counts: np.ndarray  # int64 [K+1]
    rows: int
    where: str  # what recorded it

    @property
    def fractions(self) -> np.ndarray:
        return self.counts / max(int(self.counts.sum()), 1)


@dataclass
class DriftTest:
    reference: np.ndarray  # counts [K+1]
    observed: np.ndarray  # counts [K+1]
    statistic: float
    df: int
    p_value: float
    alpha: float
    groups: list[list[int]]  # the exits tested as one cell each (merged where counts were too small)
    rough: bool = False  # some expected count stayed below MIN_EXPECTED: too few samples for a sure answer

    @property
    def alarm(self) -> bool:
        return self.p_value < self.alpha

    def fractions(self, counts: np.ndarray) -> list[float]:
        return (counts / max(int(counts.sum()), 1)).tolist()

    def sentence(self) -> str:
        verdict = (f"DRIFT: the exit mix differs from the calibration's (p = {self.p_value:.3g} < {self.alpha:g})"
                   if self.alarm else f"no drift (p = {self.p_value:.3g} >= {self.alpha:g})")
        rough = "; too few samples for the chi-square approximation, read it as rough" if self.rough else ""
        return (f"{verdict}; chi-square {self.statistic:.2f} on {self.df} df, {int(self.observed.sum())} samples "
                f"against {int(self.reference.sum())} calibration rows{rough}")


def reference_record(fractions, rows: int, thresholds, *, on: str, by: str) -> dict:
    """The manifest's `exit_reference`: the exit mix `thresholds` gave on `rows` calibration rows."""
    return {"exit_fractions": [float(f) for f in fractions], "rows": int(rows),
            "thresholds": [float(t) for t in thresholds], "on": on, "by": by}


def record_reference(bundle: str | Path, data: str, *, data_dir: str | Path | None = None,
                     repeat_channels: bool = False) -> Reference:
    """`drift --record`: the bundle's exit mix, with its thresholds, on the validation split it records
    (the rows its thresholds were chosen on), written into its manifest as `exit_reference` (only that
    field changes; the artifacts and their hashes stay)."""
    from .data import recorded_split, rows_for_bundle
    from .files import sha256_file
    from .manifest import MANIFEST_FILE, write_manifest
    from .outputs import check_rewrite
    from .runtime import GatedRuntime

    manifest_path = check_rewrite(Path(bundle) / MANIFEST_FILE, "--record")  # before any data is loaded
    read = sha256_file(manifest_path)  # a rewrite by another process meanwhile is refused, not lost
    rt = GatedRuntime.load(bundle)  # verifies every file first
    try:
        manifest = rt.manifest
        split = (manifest.source or {}).get("data_split")
        val_size, seed = recorded_split(split, str(bundle))
        val = rows_for_bundle(manifest, data, ("val",), where=str(bundle), data_dir=data_dir,
                              repeat_channels=repeat_channels, val_size=val_size, seed=seed)["val"]
        # read in batches: memory does not grow with the rows
        exits = np.concatenate([rt.run(xb).exits for xb, _ in val.batches(rt.max_batch)])
    finally:
        rt.close()
    fractions = np.bincount(exits, minlength=manifest.num_gates + 1) / len(exits)
    manifest.exit_reference = reference_record(fractions, len(exits), manifest.thresholds, by="drift --record",
                                               on=f"validation split of {data} ({len(exits)} rows, seed {seed})")
    write_manifest(bundle, manifest, expect_sha256=read)
    return reference_of(manifest)


def reference_of(manifest: Manifest) -> Reference:
    """The calibration exit mix the bundle records (`exit_reference`: written by build from its checkpoint's
    calibration, by `calibrate --engine` and build's int8 / fp16 refit, or by `drift --record`); UserError
    when there is none, or when it is for other thresholds than the bundle's."""
    hint = ("Record one: `dgate-export drift BUNDLE --record --data DATA` (the bundle's exit mix on the validation "
            "split it records), or re-calibrate (`calibrate --engine`).")
    record = manifest.exit_reference
    if not record:
        raise UserError(f"The bundle {manifest.name} records no calibration exit mix (built from a checkpoint "
                        "written before it was recorded).", hint)
    if not np.allclose(record["thresholds"], manifest.thresholds, rtol=0, atol=1e-6):
        raise UserError(f"The calibration exit mix of {manifest.name} is for other thresholds "
                        f"({record['thresholds']}) than the bundle's ({manifest.thresholds}).", hint)
    fractions = np.asarray(record["exit_fractions"], dtype=np.float64)
    rows = int(record["rows"])
    counts = np.rint(fractions / max(fractions.sum(), 1e-12) * rows).astype(np.int64)
    return Reference(counts, rows, f"{record.get('on', 'calibration rows')}; {record.get('by', '')}".strip("; "))


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square with `df` (integer >= 1) degrees of freedom: the closed forms of the
    regularized upper incomplete gamma function Q(df/2, x/2) for integer and half-integer shape."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if x <= 0:
        return 1.0
    y = x / 2.0
    if df % 2 == 0:  # Q(n, y) = e^-y sum_{i<n} y^i / i!
        term, total = 1.0, 1.0
        for i in range(1, df // 2):
            term *= y / i
            total += term
        return min(1.0, math.exp(-y) * total)
    # Q(n + 1/2, y) = erfc(sqrt y) + e^-y sum_{i<n} y^(i+1/2) / Gamma(i + 3/2)
    term, total = 2.0 * math.sqrt(y / math.pi), 0.0
    for i in range(df // 2):
        total += term
        term *= y / (i + 1.5)
    return min(1.0, math.erfc(math.sqrt(y)) + math.exp(-y) * total)


def exit_mix_test(reference: np.ndarray, observed: np.ndarray, alpha: float = DEFAULT_ALPHA) -> DriftTest:
    """Pearson's chi-square test of homogeneity of two exit-count vectors (see the module docstring)."""
    ref = np.asarray(reference, dtype=np.int64)
    obs = np.asarray(observed, dtype=np.int64)
    if ref.shape != obs.shape or ref.ndim != 1:
        raise UserError(f"{len(obs)} exits observed for a reference of {len(ref)}.",
                        "Compare counts of the bundle whose reference this is.")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"alpha {alpha} is not a probability in (0, 1).", "Give e.g. --alpha 0.001.")
    if obs.sum() < 1:
        raise UserError("No samples to test: the window counted none.", "Serve some requests first.")
    groups = [[k] for k in range(len(ref)) if ref[k] + obs[k] > 0]
    table = _table(ref, obs, groups)
    while len(groups) > 2 and _expected(table).min() < MIN_EXPECTED:
        i = int(np.argmin(_expected(table).min(axis=0)))  # the sparsest exit joins its smaller neighbour
        neighbours = [c for c in (i - 1, i + 1) if 0 <= c < len(groups)]
        j = min(neighbours, key=lambda c: table[:, c].sum())
        a = min(i, j)
        groups[a:a + 2] = [groups[a] + groups[a + 1]]
        table = _table(ref, obs, groups)
    if len(groups) < 2:  # every sample at one exit, in both: nothing differs
        return DriftTest(ref, obs, 0.0, 0, 1.0, alpha, groups)
    expected = _expected(table)
    statistic = float(((table - expected) ** 2 / expected).sum())
    df = len(groups) - 1
    return DriftTest(ref, obs, statistic, df, chi2_sf(statistic, df), alpha, groups, bool(expected.min() < MIN_EXPECTED))


def _table(ref: np.ndarray, obs: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    return np.array([[ref[g].sum() for g in groups], [obs[g].sum() for g in groups]], dtype=np.float64)


def _expected(table: np.ndarray) -> np.ndarray:
    return np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()


# ------------------------------------------------------------------------------------------- sources

_SAMPLE = re.compile(r'^(\w+)\{([^}]*)\}\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric `name` in Prometheus text: (labels, value) pairs."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            out.append((dict(_LABEL.findall(m.group(2))), float(m.group(3))))
    return out


def served_exit_counts(text: str, model: str, num_exits: int) -> np.ndarray:
    """Samples answered with the bundle's thresholds per exit, from a server's metrics (the gate model
    `model`'s dgate_exit_samples_total{thresholds="bundle"}); zeros where a series is absent."""
    counts = np.zeros(num_exits, dtype=np.int64)
    found = False
    for labels, value in parse_metrics(text, SAMPLES_METRIC):
        if labels.get("model") == model and labels.get("thresholds") == "bundle":
            found = True
            k = int(labels.get("exit", -1))
            if 0 <= k < num_exits:
                counts[k] += int(value)
    if not found:
        raise UserError(f"The metrics hold no {SAMPLES_METRIC} of the gate model {model!r}.",
                        "Point --metrics at the server that serves this bundle (dgate-export serve's --metrics-port, "
                        "or Triton's metrics endpoint), and give --model when the gate model was renamed.")
    return counts


def read_metrics(url: str, timeout: float = 10.0) -> str:
    if "://" not in url:
        url = f"http://{url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return str(r.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"Could not read metrics from {url} ({err}).",
                        "Is the server running? Give its metrics address, e.g. --metrics 127.0.0.1:8002.") from err


def scored_exit_counts(path: str | Path, num_exits: int) -> np.ndarray:
    """Rows per exit of a `dgate-export score` output (parquet, or csv)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file.", "Give a file written by `dgate-export score`.")
    if path.suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "exit" not in (reader.fieldnames or []):
                raise UserError(f"{path} has no column 'exit'.", "Give a file written by `dgate-export score`.")
            exits = np.array([int(row["exit"]) for row in reader], dtype=np.int64)
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise UserError(f"Reading {path.name} needs pyarrow ({err}).",
                            "Install it: pip install 'dgate-export[parquet]' (or pip install pyarrow).") from err
        try:
            table = pq.read_table(path, columns=["exit"])
        except Exception as err:  # pyarrow raises several types for a file that is not parquet
            raise UserError(f"{path} is not a parquet file with a column 'exit' ({err}).",
                            "Give a file written by `dgate-export score`.") from err
        exits = table.column("exit").to_numpy()
    if len(exits) and (exits.min() < 0 or exits.max() >= num_exits):
        raise UserError(f"{path} holds exits outside 0..{num_exits - 1}: it was not scored with this bundle.",
                        "Give the bundle the file was scored with.")
    return np.bincount(exits, minlength=num_exits)[:num_exits].astype(np.int64)
