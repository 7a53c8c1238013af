"""Offline scoring on Ray Data: a pool of actors, each holding one GatedRuntime, classifies a Dataset.

    import ray
    from dgate_export.integrations.ray import score_dataset

    ds = ray.data.read_parquet("s3://bucket/images/")      # a column "image": [N, C, H, W] per batch
    out = score_dataset(ds, "/shared/engines/model")        # lazy: nothing runs until it is consumed
    out.write_parquet("s3://bucket/predictions/")

`BundleClassifier` is the callable class Ray Data instantiates once per actor (the bundle is loaded,
and its files verified, once per actor, not per batch). A batch is Ray Data's numpy format, a dict of
column name -> array; the classifier runs the image column through the runtime and returns the other
columns unchanged (ids, labels) plus `prediction` (int64), `exit` (int64: 0..K-1 a gate, K the full
network), `confidence` (float32, at the exit taken) and, on request, `logits` (float32 [N, classes]).

`score_dataset` applies it with `map_batches` and a fixed-size `ActorPoolStrategy`: as many actors as
the resources it is given hold (`cpus_per_actor` / `gpus_per_actor` each; the whole cluster's by
default), or `actors`. Output order is the input's (`preserve_order`). Ray restarts an actor whose
process dies and retries its batches, so no row is lost or scored twice; `max_retries` (default 3;
Ray Data's own default is forever) bounds both, so a batch that kills every actor that runs it (out of
memory, a crash) fails the job instead of retrying without end. A `BatchLog` actor (`batch_log=`)
records which rows each batch started and finished: `died_on` names the batch the actors died on. A
bundle that cannot be loaded (a damaged file) fails the job at its first batch (Ray Data does not
retry exceptions raised by a batch), and `user_error_in` recovers the runtime's UserError from the
exception Ray raises. `ray_output_to` sends what Ray prints on this process's stdout and stderr (its
workers' deaths, its core worker's messages) to a file instead of the user's terminal.

The bundle is read from `bundle` on each actor's node: on a cluster, put it on storage every node
mounts at the same path. Like the runtime, this module imports no torch; it imports Ray only when
called (`pip install 'dgate-export[ray]'`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import socket
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..errors import UserError
from ..runtime import GatedRuntime

INSTALL_HINT = "Install the Ray extra: `pip install 'dgate-export[ray]'` (ray[data,client] and pyarrow)."
IMAGE = "image"  # the input column's default name
DEFAULT_MAX_RETRIES = 3  # restarts of an actor, and retries of a batch, before the job fails


CONNECT_TIMEOUT_S = 10.0  # for something to answer at a cluster's address


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse (UserError) a cluster address where nothing answers within `timeout` seconds, before Ray
    tries: for HOST:PORT, Ray's own reconnect loop goes on for many minutes without a word. `ray://`
    addresses (Ray Client) also need the client's gRPC library. "local", "auto" and other schemes are Ray's
    to resolve."""
    client = address.startswith("ray://")
    if address in ("local", "auto") or ("://" in address and not client):
        return
    rest = address[len("ray://"):] if client else address
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UserError(f"--ray {address!r} is not a cluster address.",
                        "Give ray://HOST:10001 (Ray Client), HOST:6379 (on a cluster node), auto, or nothing "
                        "(a local instance).")
    if client and importlib.util.find_spec("grpc") is None:
        raise UserError("A ray:// address needs Ray Client (the grpcio package), which is not installed here.",
                        INSTALL_HINT)
    try:
        socket.create_connection((host.strip("[]"), int(port_text)), timeout=timeout).close()
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise UserError(f"Nothing answers at {address} ({reason}, {timeout:g} s allowed): no Ray cluster listens "
                        "there.", "Check the host and port (ray://HOST:10001 for Ray Client, HOST:6379 from a "
                        "cluster node), that the cluster is up, or drop the address to start a local instance.") from err


@contextlib.contextmanager
def bounded_connect(address: str) -> Iterator[None]:
    """Joining a cluster at `address`, Ray tries once instead of its default dozens of times (each waits
    about 30 s for the cluster's GCS), unless the user set RAY_gcs_server_port_wait_time_s: something that
    answers at the address but is not Ray fails ray.init in about 40 s instead of many minutes. Not for
    "local": starting an instance, the same variable bounds the wait for its new GCS to come up."""
    key = "RAY_gcs_server_port_wait_time_s"
    if key in os.environ or address == "local":
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def require_ray() -> Any:
    """Import Ray Data, or say which extra installs it."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise UserError(f"Scoring on Ray needs Ray Data, which is not installed here ({err}).", INSTALL_HINT) from err
    return ray


class BundleClassifier:
    """Classify Ray Data batches with one bundle, loaded once per instance (per actor).

    `thresholds` (one per gate) replace the manifest's; `logits` adds the class scores of the exit
    taken; `input_column` names the images (float32 model input, or integer raw pixels that the
    bundle's normalization turns into model input); `backend` and `runner_options` go to
    `GatedRuntime.load` (e.g. `intra_op_num_threads` for ONNX Runtime, `providers=["cuda"]`)."""

    def __init__(self, bundle: str | Path, *, thresholds: Sequence[float] | None = None, logits: bool = False,
                 input_column: str = IMAGE, backend: str | None = None,
                 runner_options: Mapping[str, Any] | None = None, batch_log: Any = None):
        # A bundle that fails to load (a damaged file) fails the first batch instead of the constructor:
        # an actor whose constructor raises dies, and Ray's tasks on the dead actor then print retry
        # warnings after the job has already failed; a batch's exception just ends the job.
        self.error: UserError | None = None
        try:
            self.runtime = GatedRuntime.load(bundle, backend=backend, thresholds=thresholds,
                                             **dict(runner_options or {}))
        except UserError as err:
            self.error = err
        self.logits = logits
        self.input_column = input_column
        self.batch_log = batch_log

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        rows = batch.get("row")
        span = (int(rows[0]), int(rows[-1])) if self.batch_log is not None and rows is not None and len(rows) else None
        if span is not None:
            _tell(self.batch_log.start, span, wait=True)  # known to the driver before this process may die
        out = self._classify(batch)
        if span is not None:
            _tell(self.batch_log.finish, span, wait=False)
        return out

    def _classify(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.input_column not in batch:
            raise UserError(f"The batch has no column {self.input_column!r} (columns: {', '.join(batch)}).",
                            "Name the image column with input_column=..., or rename it.")
        x = np.asarray(batch[self.input_column])
        out = {name: np.asarray(col) for name, col in batch.items() if name != self.input_column}
        if len(x) == 0:  # the runtime refuses empty input; an empty batch gives empty columns
            classes = self.runtime.num_classes
            res = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32),
                   np.empty((0, classes), np.float32))
        else:
            r = self.runtime.run(x)
            res = (r.predictions, r.exits, r.confidence, r.logits)
        out["prediction"], out["exit"], out["confidence"] = res[:3]
        if self.logits:
            out["logits"] = res[3]
        return out


def _tell(method: Any, span: tuple[int, int], wait: bool) -> None:
    """Record a batch in the BatchLog; never fails the batch (the log only serves error messages)."""
    import ray

    try:
        ref = method.remote(*span)
        if wait:
            ray.get(ref, timeout=10)
    except Exception:  # noqa: BLE001, S110 (a lost record costs a vaguer message, nothing else)
        pass


class BatchLog:
    """Which batches (first and last row) the actors started, and which they finished: after actors died,
    the batch they died on. Made a Ray actor by `start_batch_log`."""

    def __init__(self) -> None:
        self.started: Counter[tuple[int, int]] = Counter()
        self.finished: set[tuple[int, int]] = set()

    def start(self, first: int, last: int) -> None:
        self.started[first, last] += 1

    def finish(self, first: int, last: int) -> None:
        self.finished.add((first, last))

    def unfinished(self) -> list[tuple[int, int, int]]:
        """(times started, first row, last row) of the batches started and never finished, most tried first."""
        return sorted(((n, a, b) for (a, b), n in self.started.items() if (a, b) not in self.finished), reverse=True)


def start_batch_log() -> Any:
    """A BatchLog actor for one job (no CPU reserved: it only counts)."""
    ray = require_ray()
    return ray.remote(num_cpus=0)(BatchLog).remote()


def died_on(err: BaseException, batch_log: Any, max_retries: int | None, first_missing: int) -> UserError | None:
    """A UserError naming the batch the actors died on, when `err` is Ray's "the actor died"; else None."""
    ray = require_ray()
    if not isinstance(err, ray.exceptions.RayActorError):
        return None
    where = f"the rows from {first_missing} on were not scored"
    try:
        unfinished = ray.get(batch_log.unfinished.remote(), timeout=10) if batch_log is not None else []
    except Exception:  # noqa: BLE001 (the log is best effort: the message gets vaguer)
        unfinished = []
    if unfinished:
        tries, first, last = unfinished[0]
        where = f"the batch of rows {first}..{last} was started {tries} times and never finished"
    retries = "their retries" if max_retries is None else f"{max_retries} retries (--max-retries)"
    return UserError(f"Scoring on Ray failed: the actors' processes kept dying (killed by the system, out of "
                     f"memory, or crashed) and Ray gave up after {retries}; {where}.",
                     "Look at those rows, give the actors more memory or a smaller --batch-size, or allow more "
                     "--max-retries.")


@contextmanager
def ray_output_to(path: str | Path) -> Iterator[TextIO]:
    """While Ray runs: what this process writes to its stdout and stderr (file descriptors 1 and 2, where
    Ray's core worker logs, and sys.stdout / sys.stderr, where Ray prints its workers' errors) goes to
    `path`, appended. Yields a stream on the terminal's stderr, for a progress bar of our own."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    old = sys.stdout, sys.stderr
    saved = os.dup(1), os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
    try:
        real = old[1].fileno() == 2
    except (OSError, ValueError, AttributeError):  # a captured stream (click's test runner, a notebook)
        real = False
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1) if real else old[1]
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = sys.stderr = log
        yield terminal
    finally:
        sys.stdout, sys.stderr = old
        log.close()
        if terminal is not old[1]:
            terminal.close()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)


def pool_size(resources: Mapping[str, float], cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0) -> int:
    """How many actors of `cpus_per_actor` CPUs (and `gpus_per_actor` GPUs) the `resources` hold."""
    if cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise UserError(f"Each actor needs a positive number of CPUs (got {cpus_per_actor}) and a "
                        f"non-negative number of GPUs (got {gpus_per_actor}).")
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    size = math.floor(cpus / cpus_per_actor + 1e-9)
    if gpus_per_actor > 0:
        size = min(size, math.floor(gpus / gpus_per_actor + 1e-9))
    if size < 1:
        raise UserError(f"The resources given ({cpus:g} CPUs, {gpus:g} GPUs) hold no actor of "
                        f"{cpus_per_actor:g} CPUs and {gpus_per_actor:g} GPUs.",
                        "Ask for less per actor, or run on a larger Ray cluster.")
    return size


def score_dataset(ds: Any, bundle: str | Path, *, actors: int | None = None,
                  resources: Mapping[str, float] | None = None, cpus_per_actor: float = 1.0,
                  gpus_per_actor: float = 0.0, batch_size: int = 256, thresholds: Sequence[float] | None = None,
                  logits: bool = False, input_column: str = IMAGE, backend: str | None = None,
                  runner_options: Mapping[str, Any] | None = None, classifier: type = BundleClassifier,
                  max_retries: int | None = DEFAULT_MAX_RETRIES, batch_log: Any = None) -> Any:
    """`ds` classified by a pool of `BundleClassifier` actors (a lazy ray.data.Dataset, input order kept).

    The pool has `actors` actors, or as many as `resources` hold (default: the cluster's,
    `ray.cluster_resources()`). ONNX Runtime sessions get one thread per CPU an actor holds unless
    `runner_options` say otherwise. `classifier` may be a subclass of BundleClassifier (one that decodes
    images first, say). `max_retries`: restarts of each actor and retries of each batch (None: Ray
    Data's default, forever); `batch_log`: a `start_batch_log()` actor the classifiers report to."""
    ray = require_ray()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"The batch size must be a positive integer, got {batch_size!r}.")
    available = dict(resources) if resources is not None else dict(ray.cluster_resources())
    fits = pool_size(available, cpus_per_actor, gpus_per_actor)
    if actors is None:
        actors = fits
    elif actors < 1 or actors > fits:
        raise UserError(f"{actors} actors of {cpus_per_actor:g} CPUs and {gpus_per_actor:g} GPUs do not fit the "
                        f"resources given ({available.get('CPU', 0):g} CPUs, {available.get('GPU', 0):g} GPUs): "
                        "Ray would wait for them forever.",
                        f"Ask for 1 to {fits} actors, or fewer CPUs per actor.")
    if max_retries is not None and (isinstance(max_retries, bool) or max_retries < 0):
        raise UserError(f"--max-retries must be >= 0, got {max_retries}.")
    options = dict(runner_options or {})
    options.setdefault("intra_op_num_threads", max(1, int(cpus_per_actor)))
    retries = {} if max_retries is None else {"max_restarts": max_retries, "max_task_retries": max_retries}
    with warnings.catch_warnings():  # Ray 2.60 calls these keyword arguments deprecated, and has no other way
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        out = ds.map_batches(
            classifier,
            fn_constructor_args=(str(bundle),),
            fn_constructor_kwargs={"thresholds": None if thresholds is None else list(thresholds), "logits": logits,
                                   "input_column": input_column, "backend": backend, "runner_options": options,
                                   **({"batch_log": batch_log} if batch_log is not None else {})},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor or None,
            udf_modifying_row_count=False,
            **retries,
        )
    out.context.execution_options.preserve_order = True  # this Dataset's own context, not the process's
    return out


def dataset_from_arrays(x: np.ndarray, labels: np.ndarray | None = None, *, block_rows: int = 256) -> Any:
    """A ray.data.Dataset of columns `row` (0..N-1), `image` (x's rows) and `label` when given, in blocks
    of `block_rows` rows: a block is the unit Ray schedules (and retries) on an actor, so many small
    blocks spread the work over the pool."""
    ray = require_ray()
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    n = len(x)
    tables = []
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        columns = {"row": pa.array(np.arange(start, stop, dtype=np.int64)),
                   IMAGE: ArrowTensorArray.from_numpy(np.ascontiguousarray(x[start:stop]))}
        if labels is not None:
            columns["label"] = pa.array(np.asarray(labels[start:stop], dtype=np.int64))
        tables.append(pa.table(columns))
    return ray.data.from_arrow(tables)


READ_TASKS = 2  # read tasks at a time (each one block of rows)


class _ReadRows:
    """A Ray Data batch of block starts -> the rows of those blocks (columns row, image, label), read
    from data.Rows where the task runs (an image folder or a memory-mapped array: a path every node
    must see, like the bundle's)."""

    def __init__(self, rows: Any, block_rows: int):
        self.rows, self.block_rows = rows, block_rows

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(self.rows)
        picks = [np.arange(s, min(s + self.block_rows, n)) for s in np.asarray(batch["start"]).tolist()]
        numbers = np.concatenate(picks) if picks else np.empty(0, np.int64)
        images, labels = [], []
        for xb, yb in self.rows.batches(self.block_rows, numbers):
            images.append(xb)
            if yb is not None:
                labels.append(np.asarray(yb, dtype=np.int64))
        out = {"row": numbers.astype(np.int64),
               IMAGE: np.concatenate(images) if images else np.empty((0, *self.rows.sample_shape), np.float32)}
        if labels:
            out["label"] = np.concatenate(labels)
        return out


def dataset_from_rows(rows: Any, *, block_rows: int = 256) -> Any:
    """A ray.data.Dataset of columns `row`, `image` and `label` (when labelled) read from data.Rows by
    Ray's tasks, one block of `block_rows` rows each: the driver holds only the block starts."""
    ray = require_ray()
    starts = list(range(0, len(rows), block_rows))
    ds = ray.data.from_items([{"start": s} for s in starts], override_num_blocks=max(1, len(starts)))
    # num_cpus=0: the actor pool may hold every CPU (2 actors on 2 cores), and read tasks that each
    # reserve one would never be scheduled (the job hung). `concurrency` bounds them instead.
    return ds.map_batches(_ReadRows(rows, block_rows), batch_size=1, batch_format="numpy",
                          udf_modifying_row_count=True, num_cpus=0, concurrency=READ_TASKS)


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError an actor raised, recovered from the exception Ray raises in the driver, or None.

    Ray sends an actor's exception to the driver as the text of its traceback (a constructor's
    exception is only text, and a batch's loses its `__cause__` chain on the way), so the message is
    read from the line Python prints for it: `dgate_export.errors.UserError: <message and hint>`."""
    if isinstance(err, UserError):
        return err
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    text = str(err)
    at = text.rfind(marker)
    if at < 0:
        return None
    message = text[at + len(marker):].split("\n\n", 1)[0].strip()
    return UserError(message) if message else None
