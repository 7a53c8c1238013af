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
process dies and retries its batches (Ray Data's defaults for actor pools: `max_restarts=-1`,
`max_task_retries=-1`), so no row is lost or scored twice. A bundle that cannot be loaded (a damaged
file) fails the job at its first batch (Ray Data does not retry exceptions raised by a batch), and
`user_error_in` recovers the runtime's UserError from the exception Ray raises.

The bundle is read from `bundle` on each actor's node: on a cluster, put it on storage every node
mounts at the same path. Like the runtime, this module imports no torch; it imports Ray only when
called (`pip install 'dgate-export[ray]'`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..runtime import GatedRuntime

INSTALL_HINT = "Install the Ray extra: `pip install 'dgate-export[ray]'` (ray[data] and pyarrow)."
IMAGE = "image"  # the input column's default name


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
                 runner_options: Mapping[str, Any] | None = None):
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

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
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
                  runner_options: Mapping[str, Any] | None = None, classifier: type = BundleClassifier) -> Any:
    """`ds` classified by a pool of `BundleClassifier` actors (a lazy ray.data.Dataset, input order kept).

    The pool has `actors` actors, or as many as `resources` hold (default: the cluster's,
    `ray.cluster_resources()`). ONNX Runtime sessions get one thread per CPU an actor holds unless
    `runner_options` say otherwise. `classifier` may be a subclass of BundleClassifier (one that decodes
    images first, say)."""
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
    options = dict(runner_options or {})
    options.setdefault("intra_op_num_threads", max(1, int(cpus_per_actor)))
    out = ds.map_batches(
        classifier,
        fn_constructor_args=(str(bundle),),
        fn_constructor_kwargs={"thresholds": None if thresholds is None else list(thresholds), "logits": logits,
                               "input_column": input_column, "backend": backend, "runner_options": options},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        udf_modifying_row_count=False,
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
    return ds.map_batches(_ReadRows(rows, block_rows), batch_size=1, batch_format="numpy",
                          udf_modifying_row_count=True)


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
