"""Run a bundle: per-sample early exit with batch compaction. numpy + the backend's library, no torch.

    from dgate_export.runtime import GatedRuntime

    rt = GatedRuntime.load("engines/NAME")          # verifies every file's sha256
    res = rt.run(x)                                 # x: numpy [N, C, H, W], any N >= 1
    res.predictions, res.exits, res.exit_counts

`load(bundle, backend=None, thresholds=None, **options)`: the backend defaults to the manifest's
(`backend="onnxruntime"` runs any bundle's ONNX graphs); `options` go to the backend's Runner (for
ONNX Runtime: providers, intra_op_num_threads, ... see dgate_export/backends/onnxruntime.py).
Thresholds come from the manifest unless given at load, per call (`run(x, thresholds=...)`), or set
with `rt.thresholds = [...]`. Batches larger than the bundle's max_batch are split.

The embedding contract (`RunResult`, arrays indexed by the input's row):
    logits       float32 [N, classes]  the class scores of the exit each sample took
    predictions  int64   [N]           argmax of logits
    exits        int64   [N]           0..K-1: left at gate k; K: ran the full network
    confidence   float32 [N]           the bundle's confidence measure at the exit taken
    exit_counts  int64   [K+1]         how many samples took each exit

For each chunk of at most max_batch rows: run segment 0 on every row; at gate k the rows whose
confidence reaches threshold k leave with that exit's logits, and segment k+1 runs on the others only
(its graph gathers their carries by `index`); later segments never run once every row has left. The
loop in pseudo-code is in docs/architecture.md, "The runtime loop". Batches of one run the same loop
with Python scalars (`_run_one`). Where the runners ask for `batch_buckets` (ONNX Runtime on a GPU)
every batch is padded to a power of two (padded rows' results dropped) and `warmup()` runs every size
it will see; where they have `fixed_buffers` (and for single samples where they have `slots_for_one`:
ONNX Runtime's CPU provider), the loop runs over slots bound once per (segment, bucket), and a `bucket_times` table (`profile_buckets()`) lets `next_bucket` keep a batch padded where
compacting is not faster: docs/architecture.md, "Fixed buffers, compact or pad". Timings of these
paths: benchmarks/README.md, "Runtime modes".

Input: float arrays are model input (float64 is converted with a warning); uint8 arrays are raw
pixels, normalized with the manifest's input.normalization as x = (raw * scale - mean[c]) / std[c]
(refused when the bundle has none); other integer types are refused (no agreed scale). fp16 bundles
get float16. NaN or inf in the input, or in the outputs (values that overflow inside the network), and
anything else are a UserError.

Thread safety: `run` keeps no state between calls beyond the read-only runners, thresholds and
row-number vector (sliced for every batch instead of allocated), and the backends' runners are
thread-safe, so many threads may call `run` on one runtime and each gets its own result.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from . import backends
from .backends import batch_bucket
from .confidence import confidence as confidence_np
from .contract import CONFIDENCE, HOST_OUTPUTS, INDEX, INPUT, LOGITS, NEVER_EXIT, batch_input
from .errors import UserError
from .manifest import Manifest, verify_bundle


@dataclass
class RunResult:
    logits: np.ndarray  # float32 [N, classes]
    predictions: np.ndarray  # int64 [N]
    exits: np.ndarray  # int64 [N], 0..K-1 gates, K the final classifier
    confidence: np.ndarray  # float32 [N]
    exit_counts: np.ndarray  # int64 [K+1]


class GatedRuntime:
    """The scheduler over one bundle's K+1 segment runners."""

    def __init__(self, manifest: Manifest, runners: Sequence[backends.Runner],
                 thresholds: Sequence[float] | None = None):
        self.manifest = manifest
        self.num_gates = manifest.num_gates
        self.num_classes = manifest.num_classes
        self.class_names = manifest.class_names
        self.max_batch = manifest.max_batch
        self.input_shape = tuple(int(d) for d in manifest.input.shape[1:])  # (C, H, W)
        self._runners = list(runners)
        self._closed = False
        # set by load(): opens another artifact of the bundle like the segments
        self._open: Callable[[str], backends.Runner] | None = None
        self._backend_name = manifest.backend
        self._float = np.dtype(manifest.input.dtype)
        self._measure = manifest.confidence
        self._thresholds = self._check_thresholds(manifest.thresholds if thresholds is None else thresholds)
        # Feeds of segment k>0: its input prev_carry_i takes segment k-1's output carry_i.
        self._links = [seg.carry_inputs for seg in manifest.segments]
        self._input_name = manifest.input.name
        # Backends that prefer few distinct shapes get every segment's batch padded to a bucket.
        self._buckets = runners[0].batch_buckets
        # Runners with fixed-address slots (ONNX Runtime's fixed_buffers / cuda_graphs) run the slot loop.
        self._fixed = all(r.fixed_buffers for r in runners)
        # Batch 1 runs from slots where the runners say it pays (ONNX Runtime's CPU provider: measured 4-6%
        # faster than plain session runs, benchmarks/README.md "Runtime modes") or where all runs do.
        self._one_in_slots = self._fixed or all(r.slots_for_one for r in runners)
        self._slotted = (cast(list[backends.FixedRunner], self._runners) if self._fixed or self._one_in_slots
                         else [])
        self._bucket_times: list[dict[int, float]] | None = None  # compact-or-pad table, see bucket_times
        self._rows = np.arange(self.max_batch, dtype=np.int64)  # shared by all calls: sliced, never written
        self._rows.flags.writeable = False
        norm = manifest.input.normalization
        self._norm = None
        if norm is not None:
            c = self.input_shape[0]
            mean = np.asarray(norm["mean"], dtype=np.float32)
            std = np.asarray(norm["std"], dtype=np.float32)
            if mean.size not in (1, c):
                raise UserError(f"input.normalization has {mean.size} means for {c} channels.", "Rebuild the bundle.")
            shape = (1, -1, 1, 1)
            self._norm = (np.float32(norm["scale"]), np.broadcast_to(mean.reshape(shape), (1, c, 1, 1)),
                          np.broadcast_to(std.reshape(shape), (1, c, 1, 1)))

    @property
    def thresholds(self) -> tuple[float, ...]:
        """One per gate; a sample leaves at gate k when its confidence >= thresholds[k]."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values: Sequence[float]) -> None:
        self._thresholds = self._check_thresholds(values)  # one assignment: running calls see old or new

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, bundle: str | Path, backend: str | None = None, thresholds: Sequence[float] | None = None,
             **options: Any) -> GatedRuntime:
        """Verify the bundle's files and start one runner per segment. `options` go to the backend's Runner."""
        manifest = verify_bundle(bundle)  # refuses unknown formats, missing files, changed sha256
        name = backend or manifest.backend
        backends.get_backend(name, check=False)  # an unknown name is reported as such
        files = [cls._artifact(manifest, seg.engine["file"], seg.file, name) for seg in manifest.segments]
        module = backends.get_backend(name)  # refuses a backend whose library is missing here
        runner_options = {"precision": manifest.precision, "max_batch": manifest.max_batch, **options}
        if name == manifest.backend:  # e.g. TensorRT checks its engines were built for this GPU
            runner_options.setdefault("backend_info", manifest.backend_info)
        # The runners are told which input sets a run's batch (the contract's meaning, kept out of them).
        runners = [module.Runner(manifest.path(f), {**runner_options, "batch_input": batch_input(seg.input_names)})
                   for f, seg in zip(files, manifest.segments)]
        rt = cls(manifest, runners, thresholds)
        rt._open = lambda f: module.Runner(manifest.path(f), {**runner_options, "batch_input": INPUT})
        rt._backend_name = name
        return rt

    def baseline_runner(self) -> backends.Runner:
        """A runner of the bundle's un-gated baseline (input "input", output "logits") on the same
        backend with the same options, for benchmarks and comparisons."""
        self._check_open()
        if self._open is None:
            raise ValueError("baseline_runner() needs a runtime made by GatedRuntime.load")
        base = self.manifest.baseline
        return self._open(self._artifact(self.manifest, base.engine["file"], base.file, self._backend_name))

    @staticmethod
    def _artifact(manifest: Manifest, engine_file: str, onnx_file: str, backend: str) -> str:
        if backend == manifest.backend:
            return engine_file
        if backend == "onnxruntime":
            return onnx_file  # every bundle carries its ONNX graphs, which ONNX Runtime runs directly
        raise UserError(f"The bundle was built for {manifest.backend}, so it has no {backend} engines.",
                        f"Build it for {backend}: `dgate-export build MODEL --backend {backend}`.")

    def close(self) -> None:
        """Release every runner; the runtime refuses to run afterwards (a UserError), and closing again is
        harmless."""
        self._closed = True
        for runner in self._runners:
            runner.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UserError("This GatedRuntime was closed: its sessions are released and it cannot run.",
                            "Load the bundle again with GatedRuntime.load(...), and close it only when done.")

    # ------------------------------------------------------------------------------------------ running

    def run(self, x: np.ndarray, thresholds: Sequence[float] | None = None) -> RunResult:
        """Classify x [N, C, H, W]; per-call `thresholds` override the runtime's for this call only."""
        self._check_open()
        thr = self._thresholds if thresholds is None else self._check_thresholds(thresholds)
        x = self._prepare(x)
        n = x.shape[0]
        if n == 1:
            return self._check_output(self._run_one_fixed(x, thr) if self._one_in_slots else self._run_one(x, thr))
        logits = np.empty((n, self.num_classes), dtype=np.float32)
        exits = np.empty(n, dtype=np.int64)
        conf = np.empty(n, dtype=np.float32)
        counts = [0] * (self.num_gates + 1)
        run_chunk = self._run_chunk_fixed if self._fixed else self._run_chunk
        for start in range(0, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            run_chunk(x[start:stop], thr, logits[start:stop], exits[start:stop], conf[start:stop], counts)
        return self._check_output(RunResult(logits=logits, predictions=logits.argmax(axis=1), exits=exits,
                                            confidence=conf, exit_counts=np.array(counts, dtype=np.int64)))

    def _run_chunk(self, x: np.ndarray, thr: tuple[float, ...], logits: np.ndarray, exits: np.ndarray,
                   conf: np.ndarray, counts: list[int]) -> None:
        # logits / exits / conf are this chunk's views of the result arrays. The loop makes few numpy
        # calls: at batch 1 each costs microseconds, its caches cold after the segment run before it.
        rows = self._rows[: len(x)]
        if self._buckets:
            x = self._pad_rows(x)
        out = self._runners[0].run({self._input_name: x}, host=HOST_OUTPUTS)
        for k in range(self.num_gates):
            c, lg = out[CONFIDENCE], out[LOGITS]
            if self._buckets:  # rows past len(rows) are padding
                c, lg = c[: len(rows)], lg[: len(rows)]
            leave = c >= thr[k]  # float32 comparison, as the torch reference does
            n_leave = int(np.count_nonzero(leave))
            counts[k] += n_leave
            if n_leave == len(rows):  # everyone left: later segments never run
                logits[rows], exits[rows], conf[rows] = lg, k, c
                return
            if n_leave:
                left = rows[leave]
                logits[left], exits[left], conf[left] = lg[leave], k, c[leave]
                keep = (~leave).nonzero()[0]  # row numbers in this segment's batch
                rows = rows[keep]
            else:
                keep = self._rows[: len(rows)]
            feeds = {dst: out[src] for dst, src in self._links[k + 1]}
            if self._buckets:
                keep = self._pad_rows(keep, self.next_bucket(k + 1, len(out[CONFIDENCE]), len(keep)))
            feeds[INDEX] = keep
            out = self._runners[k + 1].run(feeds, host=HOST_OUTPUTS)
        counts[-1] += len(rows)
        final = out[LOGITS][: len(rows)] if self._buckets else out[LOGITS]
        with np.errstate(all="ignore"):  # non-finite logits are reported by _check_output
            logits[rows], exits[rows], conf[rows] = final, self.num_gates, confidence_np(self._measure, final)

    def _run_chunk_fixed(self, x: np.ndarray, thr: tuple[float, ...], logits: np.ndarray, exits: np.ndarray,
                         conf: np.ndarray, counts: list[int]) -> None:
        """The loop over fixed-address slots (docs/architecture.md "Fixed buffers, compact or pad"): per
        gate one read of the confidences; the logits of the rows that left are read once, at the end."""
        rows = self._rows[: len(x)]  # original row of each live sample; rows past len(rows) are padding
        bucket = batch_bucket(len(x), self.max_batch)
        slot = self._slotted[0].slot(bucket)
        slot.write(self._input_name, x)
        slot.run()
        left = []  # (slot, its rows that left there or None for the first len(where), original rows, exit)
        for k in range(self.num_gates):
            c = slot.read(CONFIDENCE)[: len(rows)]
            leave = c >= thr[k]  # float32 comparison, as the torch reference does
            n_leave = int(np.count_nonzero(leave))
            counts[k] += n_leave
            if n_leave == len(rows):  # everyone left: later segments never run
                conf[rows] = c
                left.append((slot, None, rows, k))
                break
            if n_leave:
                pos = leave.nonzero()[0]
                conf[rows[pos]] = c[pos]
                left.append((slot, pos, rows[pos], k))
                keep = (~leave).nonzero()[0]  # row numbers in this segment's batch
                rows = rows[keep]
            else:
                keep = self._rows[: len(rows)]
            bucket = self.next_bucket(k + 1, bucket, len(keep))
            slot = self._slotted[k + 1].slot(bucket, slot, self._links[k + 1])
            slot.write(INDEX, keep)
            slot.run()
        else:
            counts[-1] += len(rows)
            left.append((slot, None, rows, self.num_gates))
        for slot, pos, where, k in left:  # each slot's buffers are untouched since its run in this chunk
            lg = slot.read(LOGITS)
            lg = lg[: len(where)] if pos is None else lg[pos]
            logits[where], exits[where] = lg, k
            if k == self.num_gates:
                with np.errstate(all="ignore"):  # non-finite logits are reported by _check_output
                    conf[where] = confidence_np(self._measure, lg)

    def next_bucket(self, segment: int, current: int, survivors: int) -> int:
        """The batch bucket segment `segment` runs at when `survivors` of the `current` bucket's rows go on.

        Without a table (`bucket_times`), compact: the smallest bucket that holds them. With one, the
        bucket from that one up to `current` whose measured time for this segment is least, `current`
        (keep the batch, exited rows carried as padding) unless a smaller one is strictly faster.
        """
        small = batch_bucket(survivors, self.max_batch)
        table = self._bucket_times
        if table is None or small >= current:
            return small
        times = table[segment]
        best = current
        b = small
        while b < current:
            if times.get(b, math.inf) < times.get(best, math.inf):
                best = b
            b = batch_bucket(2 * b, self.max_batch)
        return best

    @property
    def bucket_times(self) -> list[dict[int, float]] | None:
        """The compact-or-pad table: per segment, seconds per run at each batch bucket (`profile_buckets`
        measures it); None compacts at every gate. Setting it checks its shape."""
        return self._bucket_times

    @bucket_times.setter
    def bucket_times(self, table: Sequence[dict[int, float]] | None) -> None:
        if table is not None:
            if len(table) != self.num_gates + 1:
                raise UserError(f"bucket_times has {len(table)} entries for {self.num_gates + 1} segments.",
                                "Give one {bucket: seconds} dict per segment, as profile_buckets() returns.")
            table = [{int(b): float(t) for b, t in seg.items()} for seg in table]
        self._bucket_times = table

    def buckets(self) -> list[int]:
        """The batch buckets a bucketed runtime pads to: powers of two up to max_batch, and max_batch."""
        return sorted({batch_bucket(1 << i, self.max_batch) for i in range(self.max_batch.bit_length())}
                      | {self.max_batch})

    def profile_buckets(self, repeats: int = 5) -> list[dict[int, float]]:
        """Measure every segment's time per run at every batch bucket (median of `repeats`, buckets
        interleaved so that drift hits all alike) and return the table; `rt.bucket_times = table` makes
        the runtime decide compact-or-pad by it. Needs a bucketed runtime."""
        self._check_open()
        if not self._buckets:
            raise UserError("profile_buckets needs a bucketed runtime (batch_buckets or fixed_buffers).",
                            "Load it with batch_buckets=True or fixed_buffers=True.")
        samples: list[dict[int, list[float]]] = [{b: [] for b in self.buckets()} for _ in self._runners]
        for b in self.buckets():  # unrecorded: first runs (and CUDA graph captures) are not typical
            for _ in range(3):
                self._time_chain(b)
        for _ in range(repeats):
            for b in self.buckets():
                for k, seconds in enumerate(self._time_chain(b)):
                    samples[k][b].append(seconds)
        return [{b: float(np.median(ts)) for b, ts in seg.items()} for seg in samples]

    def _time_chain(self, b: int) -> list[float]:
        """Seconds of each segment's run at batch b, every sample going on (the gather an identity)."""
        x = np.zeros((b, *self.input_shape), dtype=self._float)
        keep = self._rows[:b]
        times = []
        if self._fixed:
            slot = self._slotted[0].slot(b)
            slot.write(self._input_name, x)
            t0 = time.perf_counter()
            slot.run()
            slot.read(CONFIDENCE)
            times.append(time.perf_counter() - t0)
            for k in range(1, self.num_gates + 1):
                slot = self._slotted[k].slot(b, slot, self._links[k])
                t0 = time.perf_counter()
                slot.write(INDEX, keep)
                slot.run()
                slot.read(LOGITS if k == self.num_gates else CONFIDENCE)
                times.append(time.perf_counter() - t0)
            return times
        t0 = time.perf_counter()
        out = self._runners[0].run({self._input_name: x}, host=HOST_OUTPUTS)
        times.append(time.perf_counter() - t0)
        for k in range(1, self.num_gates + 1):
            feeds = {dst: out[src] for dst, src in self._links[k]}
            feeds[INDEX] = keep
            t0 = time.perf_counter()
            out = self._runners[k].run(feeds, host=HOST_OUTPUTS)
            times.append(time.perf_counter() - t0)
        return times

    def _pad_rows(self, a: np.ndarray, bucket: int | None = None) -> np.ndarray:
        """`a` with its last row repeated up to `bucket`, by default the batch bucket of len(a) (the padded
        rows' results are dropped)."""
        b = batch_bucket(len(a), self.max_batch) if bucket is None else bucket
        return a if b == len(a) else np.concatenate([a, np.repeat(a[-1:], b - len(a), axis=0)])

    def warmup(self) -> None:
        """Run every segment once at every batch size it will see (each bucket up to max_batch with
        bucketing, else batch 1 and max_batch), so that first calls pay no one-time costs: ONNX Runtime's
        CUDA provider prepares its convolutions (cuDNN algorithm search) for each new shape, tens of ms.
        With fixed buffers, every slot a run can reach (each bucket after each larger one the table allows)
        is made and run, three times with CUDA graphs: a slot captures its graph on its third run."""
        self._check_open()
        sizes = self.buckets() if self._buckets else [1, self.max_batch]
        no_exit = [NEVER_EXIT] * self.num_gates  # above any confidence: every segment runs
        runs = 3 if any(r.cuda_graphs for r in self._runners) else 1
        for b in sizes:
            for _ in range(runs if self._fixed else 1):
                self.run(np.zeros((b, *self.input_shape), dtype=self._float), thresholds=no_exit)
        if not self._fixed:
            return
        chain = {}  # (segment, bucket): the slot the runs above used
        for b in sizes:
            slot = chain[0, b] = self._slotted[0].slot(b)
            for k in range(1, self.num_gates + 1):
                slot = chain[k, b] = self._slotted[k].slot(b, slot, self._links[k])
        for k in range(1, self.num_gates + 1):
            for up in sizes:
                upstream = chain[k - 1, up]  # its output buffers are those of every slot of its size
                for b in sorted({self.next_bucket(k, up, n) for n in range(1, up + 1)}):
                    slot = self._slotted[k].slot(b, upstream, self._links[k])
                    slot.write(INDEX, self._rows[:1])
                    while slot.runs < runs:
                        slot.run()

    def _run_one(self, x: np.ndarray, thr: tuple[float, ...]) -> RunResult:
        """The same loop for one sample with Python scalars: at batch 1, numpy calls between segment runs
        cost as much as the segments' own per-run overhead (benchmarks/README.md, "Measurements behind
        the defaults")."""
        out = self._runners[0].run({self._input_name: x}, host=HOST_OUTPUTS)
        for k in range(self.num_gates):
            c = out[CONFIDENCE].item()
            if c >= thr[k]:
                return self._result_one(out[LOGITS], k, c)
            feeds = {dst: out[src] for dst, src in self._links[k + 1]}
            feeds[INDEX] = self._rows[:1]
            out = self._runners[k + 1].run(feeds, host=HOST_OUTPUTS)
        final = out[LOGITS]
        with np.errstate(all="ignore"):
            return self._result_one(final, self.num_gates, confidence_np(self._measure, final).item())

    def _run_one_fixed(self, x: np.ndarray, thr: tuple[float, ...]) -> RunResult:
        """`_run_one` over the slots of bucket 1. Their `index` is always [0]: written on first use only."""
        slot = self._slotted[0].slot(1)
        slot.write(self._input_name, x)
        slot.run()
        for k in range(self.num_gates):
            c = slot.read(CONFIDENCE).item()
            if c >= thr[k]:
                return self._result_one(slot.read(LOGITS), k, c)
            slot = self._slotted[k + 1].slot(1, slot, self._links[k + 1])
            if not slot.runs:
                slot.write(INDEX, self._rows[:1])
            slot.run()
        final = slot.read(LOGITS)
        with np.errstate(all="ignore"):  # non-finite logits are reported by _check_output
            conf = confidence_np(self._measure, final).item()
        return self._result_one(final, self.num_gates, conf)

    def _result_one(self, logits: np.ndarray, exit_: int, conf: float) -> RunResult:
        counts = [0] * (self.num_gates + 1)
        counts[exit_] = 1
        logits = logits.astype(np.float32)  # a copy: the backend may reuse its output buffer
        return RunResult(logits=logits, predictions=logits.argmax(axis=1), exits=np.array([exit_], np.int64),
                         confidence=np.array([conf], np.float32), exit_counts=np.array(counts, np.int64))

    # ----------------------------------------------------------------------------------------- checking

    def _check_thresholds(self, thresholds: Sequence[float]) -> tuple[float, ...]:
        try:
            values = tuple(float(t) for t in thresholds)
        except (TypeError, ValueError) as err:
            raise UserError(f"Thresholds must be a list of numbers, got {thresholds!r}.",
                            f"Give {self.num_gates} numbers, one per gate.") from err
        if len(values) != self.num_gates:
            raise UserError(f"{len(values)} thresholds given for a bundle with {self.num_gates} gates.",
                            f"Give {self.num_gates} numbers, one per gate (a value above 1 disables a gate).")
        if not all(map(math.isfinite, values)):
            raise UserError(f"Thresholds must be finite numbers, got {values}.",
                            "Use a value above 1 to disable a gate.")
        # Rounded to float32, the confidences' type: comparisons then decide as the torch reference's
        # float32 comparison does, whether made against float32 arrays or Python floats.
        return tuple(float(np.float32(v)) for v in values)

    def _prepare(self, x: Any) -> np.ndarray:
        """Validate x and return it as contiguous model input in the bundle's float dtype."""
        c, h, w = self.input_shape
        expected = f"[N, {c}, {h}, {w}]"
        if not isinstance(x, np.ndarray):
            raise UserError(f"The runtime takes a numpy array {expected}, got {type(x).__name__}.",
                            "Convert it first, e.g. np.asarray(x, dtype=np.float32).")
        if x.ndim != 4:
            hint = " Add the batch axis: x[None]." if x.shape == (c, h, w) else ""
            raise UserError(f"Input must have 4 dimensions {expected}, got shape {x.shape}.",
                            f"Pass a batch of images in NCHW layout.{hint}")
        if x.shape[0] == 0:
            raise UserError("The input batch is empty (N = 0).", "Pass at least one sample.")
        if x.shape[1] != c:
            raise UserError(f"Input has {x.shape[1]} channels, the model takes {c} (shape {x.shape}, "
                            f"expected {expected}).", "Check the layout (NCHW, not NHWC) and the color mode.")
        if x.shape[2:] != (h, w):
            raise UserError(f"Input images are {x.shape[2]}x{x.shape[3]}, the model takes {h}x{w} "
                            f"(shape {x.shape}).", f"Resize the images to {h}x{w}.")
        kind = x.dtype.kind
        if x.dtype == np.uint8:
            if self._norm is None:
                raise UserError(f"Input has integer dtype {x.dtype}, but this bundle records no "
                                "input.normalization to turn raw pixels into model input.",
                                "Normalize the images yourself and pass float32.")
            scale, mean, std = self._norm
            x = (x.astype(np.float32) * scale - mean) / std
        elif kind in "iu":
            raise UserError(f"Input has integer dtype {x.dtype}: raw pixels are uint8 (0..255), and other integer "
                            "types have no agreed scale (16-bit images, signed values).",
                            "Pass uint8 pixels, or convert and normalize the images yourself and pass float32.")
        elif kind == "f":
            if x.dtype == np.float64:
                warnings.warn("Input is float64; converting it to the model's float type.", stacklevel=3)
        else:
            raise UserError(f"Input dtype {x.dtype} is not supported.",
                            "Pass float32 model input, or uint8 raw pixels when the bundle has a normalization.")
        with np.errstate(over="ignore", invalid="ignore"):  # values too large for the float type become inf
            x = np.ascontiguousarray(x, dtype=self._float)
        # One reduction instead of a boolean array: NaN and inf make the sum non-finite (so can an
        # overflow of huge finite values, which the exact check then clears).
        with np.errstate(over="ignore"):
            suspect = not np.isfinite(x.sum())
        if suspect and not np.isfinite(x).all():
            bad = int(x.size - np.isfinite(x).sum())
            raise UserError(f"Input holds {bad} non-finite value(s) (NaN or inf)"
                            f"{' after conversion to float16' if self._float == np.float16 else ''}.",
                            "Clean the input; the model cannot classify NaN or inf.")
        return x

    @staticmethod
    def _check_output(res: RunResult) -> RunResult:
        """Refuse results holding NaN or inf: finite input far outside the range the model was trained on
        overflows inside the network."""
        if np.isfinite(res.logits.sum(dtype=np.float64)) and np.isfinite(res.confidence.sum(dtype=np.float64)):
            return res
        bad = np.nonzero(~(np.isfinite(res.logits).all(axis=1) & np.isfinite(res.confidence)))[0]
        if not len(bad):  # finite values whose sum overflowed
            return res
        shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise UserError(f"The model's outputs are not finite (NaN or inf) for {len(bad)} input row(s) (rows {shown}): "
                        "their values overflow inside the network.",
                        "Check the input's scale: pass normalized float32 model input, or uint8 raw pixels.")
