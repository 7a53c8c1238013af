"""Offline scoring: classify every row of a data set with a bundle and write the predictions (parquet or CSV).

    summary = score("engines/model", x, labels, "predictions.parquet")                  # in-process
    summary = score("engines/model", x, labels, "predictions.csv")                      # no pyarrow needed
    summary = score("engines/model", x, labels, "predictions.parquet", ray="local")     # Ray Data
    summary = score("engines/model", rows, None, "predictions.parquet")                 # data.Rows

In-process, one GatedRuntime classifies `batch_size` rows at a time. With `ray`, a Ray instance is
started for the job (`"local"`) or joined (an address such as `ray://head:10001` or `auto`; an
already initialized Ray is used as it is), and a pool of actors classifies the rows
(`dgate_export.integrations.ray`). Rows given as data.Rows (`open_rows`: an image folder, a memory-mapped
npz) are read batch by batch, in-process or by Ray's read tasks, so memory does not grow with them.

The output has one row per input row, in input order: `row` (the input's row number), `prediction`,
`exit` (0..K-1: the gate taken, K: the full network), `confidence` (at the exit taken), `label` when
the data has labels, and `logits` (a list of class scores) on request. Batches are checked as they
arrive: each must continue the row numbers where the previous one stopped, so a lost or duplicated row
fails the job instead of writing a wrong file. The file is written under a temporary name next to the
output and renamed at the end; a failed job leaves nothing behind. No torch is imported.

The output's suffix picks the format: `.parquet` (pyarrow, from the `[parquet]` or `[ray]` extra) or
`.csv` (the standard library: what the plain install writes). The CSV has a header row and the same
columns; floats are written in the shortest form that reads back to the same float32, and `logits` is
one JSON list per row (`[0.1, -2.5, 3.0]`, quoted by the CSV dialect).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import tempfile
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from . import outputs
from .data import check_labels
from .errors import UserError
from .files import UMASK
from .manifest import Manifest, load_manifest

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11 on

PYARROW_HINT = ("Install it: pip install 'dgate-export[parquet]' (pyarrow; [ray] brings it too), or write "
                "-o NAME.csv, which needs nothing more.")
FORMATS = {".parquet": "parquet", ".csv": "csv"}  # the output's suffix -> its format
_ROW_GROUP = 65536  # rows per parquet row group


@dataclass
class ScoreSummary:
    rows: int
    exit_counts: np.ndarray  # int64 [K+1]
    exit_names: list[str]  # the gates' exit modules, then "full network"
    correct: int | None  # correct predictions, when the data has labels
    seconds: float  # from the first batch submitted to the last row written
    startup_seconds: float = 0.0  # starting or joining Ray (not in `seconds`)
    where: str = "in-process"
    columns: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / max(self.rows, 1)

    @property
    def samples_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")

    def lines(self) -> list[str]:
        fractions = ", ".join(f"{name} {count / max(self.rows, 1):.1%}"
                              for name, count in zip(self.exit_names, self.exit_counts))
        out = [f"scored {self.rows} rows {self.where}",
               f"exits: {fractions}"]
        if self.accuracy is not None:
            out.append(f"accuracy: {self.accuracy:.2%} ({self.correct}/{self.rows} labels)")
        startup = f"; Ray start-up {self.startup_seconds:.1f} s not included" if self.startup_seconds else ""
        out.append(f"speed: {self.samples_per_s:.0f} samples/s ({self.seconds:.2f} s{startup})")
        return out


class PredictionWriter:
    """Write prediction batches into `path` atomically, checking that they cover rows 0..rows-1 in order;
    the format follows the suffix (FORMATS)."""

    def __init__(self, path: str | Path, rows: int, num_exits: int, *, force: bool = False):
        self.path = Path(path)
        self.format = output_format(self.path)
        self._sink_type = _ParquetSink if self.format == "parquet" else _CsvSink
        self._sink_type.check()
        check_output(self.path, force)
        self.rows, self.num_exits = rows, num_exits
        self.next_row = 0
        self.exit_counts = np.zeros(num_exits, dtype=np.int64)
        self.correct: int | None = None
        self.columns: list[str] = []
        self._sink: _ParquetSink | _CsvSink | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> Self:
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._sink = self._sink_type(self._tmp)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        return self

    def write(self, batch: dict[str, np.ndarray]) -> None:
        assert self._sink is not None, "use the writer in a with block"
        rows = np.asarray(batch["row"])
        n = len(rows)
        if not np.array_equal(rows, np.arange(self.next_row, self.next_row + n)):
            got = f"rows {rows[0]}..{rows[-1]}" if n else "an empty batch"
            raise RuntimeError(f"Predictions arrived out of order: expected rows from {self.next_row}, got {got} "
                               "(a row lost or duplicated); nothing was written.")
        self.next_row += n
        exits = np.asarray(batch["exit"])
        self.exit_counts += np.bincount(exits, minlength=self.num_exits)[: self.num_exits]
        if "label" in batch:
            hits = int(np.count_nonzero(np.asarray(batch["prediction"]) == np.asarray(batch["label"])))
            self.correct = (self.correct or 0) + hits
        columns: dict[str, np.ndarray] = {"row": rows.astype(np.int64, copy=False),
                                          "prediction": np.asarray(batch["prediction"], dtype=np.int64),
                                          "exit": exits.astype(np.int64, copy=False),
                                          "confidence": np.asarray(batch["confidence"], dtype=np.float32)}
        if "label" in batch:
            columns["label"] = np.asarray(batch["label"], dtype=np.int64)
        if "logits" in batch:
            columns["logits"] = np.asarray(batch["logits"], dtype=np.float32).reshape(n, -1)
        self.columns = list(columns)
        self._sink.write(columns)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._tmp is not None and self._sink is not None
        try:
            if exc_type is None and self.next_row != self.rows:
                raise RuntimeError(f"The job returned {self.next_row} predictions for {self.rows} rows; "
                                   "nothing was written.")
            self._sink.close(complete=exc_type is None)
            if exc_type is None:
                os.chmod(self._tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give what a plain open gives
                os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)


class _ParquetSink:
    """Columns into a parquet file, in row groups of _ROW_GROUP rows; logits as a fixed-size list."""

    @staticmethod
    def check() -> None:
        _pyarrow()

    def __init__(self, path: Path):
        self._pa, self._pq = _pyarrow()
        self._path = path
        self._buffer: list[Any] = []
        self._buffered = 0
        self._writer: Any = None

    def write(self, columns: dict[str, np.ndarray]) -> None:
        pa = self._pa
        arrays = {name: pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1]) if v.ndim == 2
                  else pa.array(v) for name, v in columns.items()}
        self._buffer.append(pa.table(arrays))
        self._buffered += len(columns["row"])
        if self._buffered >= _ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = self._pa.concat_tables(self._buffer)
        if self._writer is None:
            self._writer = self._pq.ParquetWriter(str(self._path), table.schema)
        self._writer.write_table(table, row_group_size=_ROW_GROUP)
        self._buffer, self._buffered = [], 0

    def close(self, complete: bool) -> None:
        if complete:
            self._flush()
        if self._writer is not None:
            self._writer.close()


class _CsvSink:
    """Columns into a CSV file with a header row (the standard library's csv module; see the module docstring)."""

    @staticmethod
    def check() -> None:
        pass

    def __init__(self, path: Path):
        self._file = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._csv = csv.writer(self._file)
        self._header = False

    def write(self, columns: dict[str, np.ndarray]) -> None:
        if not self._header:
            self._csv.writerow(columns)
            self._header = True
        self._csv.writerows(zip(*(_csv_cells(v) for v in columns.values())))

    def close(self, complete: bool) -> None:
        self._file.close()


def _csv_cells(values: np.ndarray) -> list:
    """One column's CSV cells: integers as they are, floats in their shortest float32 form, rows of a 2-D
    column as JSON lists."""
    if values.ndim == 2:
        return ["[" + ", ".join(_csv_cells(row)) + "]" for row in values]
    if values.dtype.kind == "f":
        return [str(v) for v in values]  # numpy's shortest repr that reads back to the same float32
    return values.tolist()


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise UserError(f"Writing parquet needs pyarrow, which is not installed here ({err}).",
                        PYARROW_HINT) from err
    return pa, pq


def output_format(path: Path) -> str:
    """The format that `path`'s suffix names (FORMATS), or a UserError."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"-o {path}: the suffix {path.suffix or '(none)'!r} names no output format.",
                        "Give -o NAME.parquet (needs pyarrow: pip install 'dgate-export[parquet]') or "
                        "-o NAME.csv (needs nothing more).")
    return fmt


def check_output(path: Path, force: bool, reads: Sequence[str | Path | None] = ()) -> None:
    """Refuse an output that must not or cannot be written, before any work: outputs.check_output (never
    over or into what is read, `reads`, nor into a bundle), a suffix that names no format (or parquet
    without pyarrow); its folder must exist."""
    outputs.check_output(path, force=force, reads=reads)
    if output_format(path) == "parquet":
        _ParquetSink.check()
    if not path.parent.is_dir():
        raise UserError(f"-o {path}: the folder {path.parent} does not exist.", "Create it first.")


def check_ray(address: str) -> None:
    """Refuse, before any work, a Ray address where nothing answers (integrations.ray.check_address: Ray's
    own reconnect loop would go on for minutes) or Ray not installed; a Ray already running in this process
    is used as it is, whatever the address."""
    from .integrations.ray import check_address, require_ray

    if not require_ray().is_initialized():
        check_address(address)


def exit_names(manifest: Manifest) -> list[str]:
    return [seg.gate.exit for seg in manifest.segments if seg.gate is not None] + ["full network"]


def score(bundle: str | Path, x: Any, labels: np.ndarray | None, output: str | Path, *,
          ray: str | None = None, actors: int | None = None, cpus_per_actor: float = 1.0, batch_size: int = 256,
          thresholds: Sequence[float] | None = None, logits: bool = False, force: bool = False,
          progress: bool = True, describe: str = "", max_retries: int | None = None) -> ScoreSummary:
    """Classify x [N, C, H, W] (arrays, with `labels` or None; or data.Rows, whose own labels are used)
    with `bundle` into `output` (see the module docstring); `ray`: None (in-process), "local" or a Ray
    address; `max_retries`: Ray's restarts of an actor and retries of a batch (None:
    integrations.ray.DEFAULT_MAX_RETRIES). On Ray, what Ray prints goes to a log file in the temporary
    folder (named in the error when the job fails; removed when it succeeds)."""
    from tqdm import tqdm

    check_output(Path(output), force, reads=(bundle,))
    if ray is not None:
        check_ray(ray)
    manifest = load_manifest(bundle)  # a clear error before anything starts
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"The batch size must be a positive integer, got {batch_size!r}.")
    if hasattr(x, "batches"):
        labels = None  # data.Rows bring their own
    if labels is not None and len(labels) != len(x):
        raise UserError(f"{len(labels)} labels for {len(x)} rows.", "Give one label per row.")
    check_labels(x.labels() if hasattr(x, "batches") else labels, manifest.num_classes)
    if len(x) == 0:
        raise UserError("The data has no rows.", "Give at least one row to score.")
    names = exit_names(manifest)
    writer = PredictionWriter(output, len(x), len(names), force=force)
    clock: dict[str, float] = {}
    ray_log = Path(tempfile.gettempdir()) / f"dgate-score-ray-{os.getpid()}.log"
    keep_log = False
    try:
        with contextlib.ExitStack() as stack:
            terminal = None
            if ray is None:
                batches = _in_process(bundle, x, labels, batch_size, thresholds, logits, clock)
                where = "in-process"
            else:
                from .integrations.ray import DEFAULT_MAX_RETRIES, ray_output_to

                terminal = stack.enter_context(ray_output_to(ray_log))
                retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
                batches = _on_ray(ray, bundle, x, labels, actors, cpus_per_actor, batch_size, thresholds, logits,
                                  clock, retries, writer, ray_log)
                where = "on Ray Data ({})"
            stack.enter_context(contextlib.closing(batches))  # Ray stops while its output still goes to the log
            with writer, tqdm(total=len(x), unit="rows", desc="scoring", disable=not progress, leave=False,
                              file=terminal) as bar:
                for batch in batches:
                    writer.write(batch)
                    bar.update(len(batch["row"]))
    except UserError as err:
        keep_log = str(ray_log) in str(err)  # the message points at Ray's messages
        raise
    finally:
        if ray is not None and not keep_log:
            ray_log.unlink(missing_ok=True)
    seconds = time.perf_counter() - clock["start"]
    if ray is not None:
        where = where.format(f"{clock['actors']:.0f} actors, {'a local Ray instance' if ray == 'local' else ray}")
    return ScoreSummary(rows=len(x), exit_counts=writer.exit_counts, exit_names=names, correct=writer.correct,
                        seconds=seconds, startup_seconds=clock.get("startup", 0.0),
                        where=f"{describe} {where}".strip(), columns=writer.columns)


def _batches(x: Any, labels: np.ndarray | None, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(x, labels or None) per batch: data.Rows' batches, or slices of arrays."""
    if hasattr(x, "batches"):
        yield from x.batches(batch_size)
        return
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size], (None if labels is None else labels[start:start + batch_size])


def _in_process(bundle: str | Path, x: Any, labels: np.ndarray | None, batch_size: int,
                thresholds: Sequence[float] | None, logits: bool, clock: dict[str, float]) -> Generator[dict, None, None]:
    from .runtime import GatedRuntime

    runtime = GatedRuntime.load(bundle, thresholds=thresholds)
    clock["start"] = time.perf_counter()
    try:
        start = 0
        for xb, yb in _batches(x, labels, batch_size):
            stop = start + len(xb)
            r = runtime.run(xb)
            batch = {"row": np.arange(start, stop, dtype=np.int64), "prediction": r.predictions, "exit": r.exits,
                     "confidence": r.confidence}
            if yb is not None:
                batch["label"] = yb
            if logits:
                batch["logits"] = r.logits
            start = stop
            yield batch
    finally:
        runtime.close()


def _on_ray(address: str, bundle: str | Path, x: Any, labels: np.ndarray | None, actors: int | None,
            cpus_per_actor: float, batch_size: int, thresholds: Sequence[float] | None, logits: bool,
            clock: dict[str, float], max_retries: int, writer: PredictionWriter,
            ray_log: Path) -> Generator[dict, None, None]:
    from .integrations.ray import (
        bounded_connect,
        dataset_from_arrays,
        dataset_from_rows,
        died_on,
        pool_size,
        require_ray,
        score_dataset,
        start_batch_log,
        user_error_in,
    )

    ray = require_ray()
    started = time.perf_counter()
    own = not ray.is_initialized()  # a caller's own Ray (e.g. a notebook's) is used and left running
    if own:
        quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
        try:  # "local" is Ray's own word for a new local instance, even where another one runs
            with bounded_connect(address):
                ray.init(address=address, **quiet)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"Could not start or reach Ray at {address!r}: {err}",
                            "Check the address (ray://HOST:10001 or auto), or drop it to start a local instance.") from err
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.CRITICAL)  # Ray Data's progress and errors: ours say the same in one place
    try:
        clock["startup"] = time.perf_counter() - started
        clock["actors"] = actors or pool_size(ray.cluster_resources(), cpus_per_actor)
        clock["start"] = time.perf_counter()  # putting the rows into Ray's object store counts as scoring
        ds = (dataset_from_rows(x, block_rows=batch_size) if hasattr(x, "batches")
              else dataset_from_arrays(x, labels, block_rows=batch_size))
        batch_log = start_batch_log()
        out = score_dataset(ds, bundle, actors=actors, cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                            thresholds=thresholds, logits=logits, max_retries=max_retries, batch_log=batch_log)
        out.context.enable_progress_bars = False
        try:
            yield from out.iter_batches(batch_size=None, batch_format="numpy")
        except Exception as err:
            found = user_error_in(err)
            if found is None:
                found = died_on(err, batch_log, max_retries, writer.next_row)
                if found is None:
                    raise
                found.hint = f"{found.hint} Ray's own messages: {ray_log}."
            raise found from None
    finally:
        data_logger.setLevel(level)
        if own:
            ray.shutdown()
