"""The gate model of a Triton repository (copied as NAME/1/model.py by `dgate-export triton`).

It runs inside Triton's Python backend, never in this package: `GatedRuntime` (the project's own
runtime, copied next to this file with the modules it imports) runs its early-exit loop with one
runner per segment model, and each runner call is a BLS request to that model. So requests get the
same exits, logits and errors as `GatedRuntime.run` in a process, and the survivors of concurrent
requests meet in the segment models' dynamic-batching queues.

Per request: input `input` [N, C, H, W] (the bundle's float type) or, where the bundle has a
normalization, `input_raw` UINT8 raw pixels; optional request parameter `thresholds` (a string of
comma-separated numbers, or a JSON list). Outputs: logits, predictions, exits, confidence.
A user mistake (shape, dtype, thresholds) answers that request with INVALID_ARG (HTTP 400); a failed
segment call fails the requests it was running for and nothing else.

Metrics (Triton's Prometheus endpoint; docs/serving.md): per exit, the samples that left there and the
requests that had a sample leave there; per gate, a histogram of the confidences of every sample that
reached it; requests in flight. Labelled `thresholds="bundle"` or `"request"` (a request's own
thresholds change the exit mix by design: the drift signal reads "bundle" only). Counted per request in
the instance and added to the server's metrics by a thread every FLUSH_SECONDS (each metric call is
an IPC round trip to the server; per sample it would cost more than a segment). A request with the
parameter `dgate_probe` (`serve`'s health probe) is answered but not counted.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dgate_export.contract import CONFIDENCE, INDEX, INPUT, LOGITS
from dgate_export.errors import UserError  # the copy next to this file
from dgate_export.manifest import Manifest
from dgate_export.runtime import GatedRuntime

RAW_INPUT = "input_raw"
THRESHOLDS = "thresholds"
PROBE = "dgate_probe"  # request parameter of serve's health probe: answered, not counted
FLUSH_SECONDS = 0.25
BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)  # confidence histogram upper bounds


class SegmentError(Exception):
    """A segment model answered with an error."""


class SegmentModel:
    """A GatedRuntime runner whose `run` is a BLS request to one segment model of the repository.

    The runtime feeds segment k>0 the previous segment's carries for all its rows plus `index`, the
    survivors' row numbers; the segment models of the repository take the survivors' carries only (see
    dgate_export/serving/repository.py), so the rows are kept here before the request.
    """

    # The runtime's Runner interface (dgate_export.backends.Runner): Triton batches, not the runtime.
    batch_buckets = False
    fixed_buffers = False
    cuda_graphs = False
    slots_for_one = False

    def __init__(self, model: str, inputs: list[str], outputs: list[str]):
        self.model = model
        self.inputs = inputs
        self.outputs = outputs
        self.input_names = inputs
        self.output_names = outputs
        self.seen: list[np.ndarray] = []  # the gate's confidences since the request began (one execute at a time)

    def close(self) -> None:
        pass  # nothing held: each run is one BLS request

    def run(self, feeds: dict, host=None) -> dict:
        index = feeds.get(INDEX)
        tensors = []
        for name in self.inputs:
            value = feeds[name]
            # `index` is strictly increasing (nonzero's output, or 0..n-1 when nobody left): as long as
            # the carry it indexes, it keeps every row, in order.
            if index is not None and len(index) != len(value):
                value = np.take(value, index, axis=0)
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value)))
        request = pb_utils.InferenceRequest(model_name=self.model, inputs=tensors,
                                            requested_output_names=self.outputs)
        response = request.exec()
        if response.has_error():
            raise SegmentError(f"{self.model}: {response.error().message()}")
        out = {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}
        if CONFIDENCE in out:
            out[CONFIDENCE] = out[CONFIDENCE].reshape(-1)  # [batch] travels as [batch, 1]
            self.seen.append(out[CONFIDENCE])  # every sample that reached this gate (for the histogram)
        return out


def thresholds_of(request) -> list[float] | None:
    """The request's `thresholds` parameter, or None; the runtime checks count and values."""
    params = json.loads(request.parameters() or "{}")
    value = params.get(THRESHOLDS)
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise UserError(f"The request parameter {THRESHOLDS!r} must be comma-separated numbers, got {value!r}.",
                            "Send e.g. thresholds=\"0.9,0.95\".") from err
        return parsed if isinstance(parsed, list) else [parsed]
    return [value]  # a single number: the runtime says how many it needs


class Tally:
    """This instance's counts not yet added to the server's metrics, per thresholds label."""

    def __init__(self, num_gates: int):
        self.k = num_gates
        self.lock = threading.Lock()
        self.in_flight = 0
        self.reset()

    def reset(self):
        k = self.k
        self.samples = {lab: np.zeros(k + 1, np.int64) for lab in LABELS}
        self.requests = {lab: np.zeros(k + 1, np.int64) for lab in LABELS}
        self.buckets = {lab: np.zeros((k, len(BUCKETS)), np.int64) for lab in LABELS}  # cumulative: <= bound
        self.count = {lab: np.zeros(k, np.int64) for lab in LABELS}
        self.sum = {lab: np.zeros(k, np.float64) for lab in LABELS}

    def add(self, label: str, exits: np.ndarray, seen: list[list[np.ndarray]], sizes: list[int]) -> None:
        """One run's counts: `exits` of its samples, `seen[g]` the confidences gate g computed, `sizes` the
        rows of each request it ran (in order)."""
        n = self.k + 1
        per_exit = np.bincount(exits, minlength=n)[:n]
        starts = np.cumsum([0, *sizes[:-1]])
        reached = np.zeros(n, np.int64)
        for start, size in zip(starts, sizes):
            reached += np.bincount(exits[start:start + size], minlength=n)[:n] > 0
        with self.lock:
            self.samples[label] += per_exit
            self.requests[label] += reached
            for gate, arrays in enumerate(seen):
                if not arrays:
                    continue
                conf = np.concatenate(arrays)
                self.buckets[label][gate] += np.searchsorted(np.sort(conf), BUCKETS, side="right")
                self.count[label][gate] += len(conf)
                self.sum[label][gate] += float(conf.sum())

    def take(self):
        with self.lock:
            out = (self.samples, self.requests, self.buckets, self.count, self.sum, self.in_flight)
            self.reset()
        return out


LABELS = ("bundle", "request")  # the thresholds a request ran with: the bundle's, or its own


class Metrics:
    """The gate model's metrics on Triton's endpoint, fed from a Tally by a thread (see the module docstring)."""

    def __init__(self, model: str, instance: str, num_gates: int):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        fam = self.families = {
            "samples": pb_utils.MetricFamily("dgate_exit_samples_total", "Samples answered, by the exit they took "
                                             "(0..K-1 a gate, K the full network)", counter),
            "requests": pb_utils.MetricFamily("dgate_exit_requests_total", "Requests with at least one sample "
                                              "leaving at the exit", counter),
            "bucket": pb_utils.MetricFamily("dgate_gate_confidence_bucket", "Samples that reached the gate, by "
                                            "confidence (cumulative: at most le)", counter),
            "count": pb_utils.MetricFamily("dgate_gate_confidence_count", "Samples that reached the gate", counter),
            "sum": pb_utils.MetricFamily("dgate_gate_confidence_sum", "Sum of the confidences at the gate", counter),
            "in_flight": pb_utils.MetricFamily("dgate_requests_in_flight", "Requests this instance is running",
                                               gauge),
        }
        k = num_gates
        self.samples = {(lab, e): fam["samples"].Metric(labels={"model": model, "exit": str(e), "thresholds": lab})
                        for lab in LABELS for e in range(k + 1)}
        self.requests = {(lab, e): fam["requests"].Metric(labels={"model": model, "exit": str(e), "thresholds": lab})
                         for lab in LABELS for e in range(k + 1)}
        bounds = [*(f"{b:g}" for b in BUCKETS), "+Inf"]
        self.bucket = {(lab, g, b): fam["bucket"].Metric(labels={"model": model, "gate": str(g), "le": le,
                                                                 "thresholds": lab})
                       for lab in LABELS for g in range(k) for b, le in enumerate(bounds)}
        self.count = {(lab, g): fam["count"].Metric(labels={"model": model, "gate": str(g), "thresholds": lab})
                      for lab in LABELS for g in range(k)}
        self.sum = {(lab, g): fam["sum"].Metric(labels={"model": model, "gate": str(g), "thresholds": lab})
                    for lab in LABELS for g in range(k)}
        self.in_flight = fam["in_flight"].Metric(labels={"model": model, "instance": instance})
        self.tally = Tally(k)
        self._flushed_in_flight = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(FLUSH_SECONDS):
            self.flush()

    def flush(self):
        samples, requests, buckets, count, total, in_flight = self.tally.take()
        for lab in LABELS:
            for e, n in enumerate(samples[lab]):
                if n:
                    self.samples[lab, e].increment(float(n))
            for e, n in enumerate(requests[lab]):
                if n:
                    self.requests[lab, e].increment(float(n))
            for g, n in enumerate(count[lab]):
                if not n:
                    continue
                self.count[lab, g].increment(float(n))
                self.sum[lab, g].increment(float(total[lab][g]))
                self.bucket[lab, g, len(BUCKETS)].increment(float(n))  # +Inf
                for b, m in enumerate(buckets[lab][g]):
                    if m:
                        self.bucket[lab, g, b].increment(float(m))
        if in_flight != self._flushed_in_flight:
            self.in_flight.set(float(in_flight))
            self._flushed_in_flight = in_flight

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.flush()


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "manifest.json"), encoding="utf-8") as f:
            manifest = Manifest.from_dict(json.load(f))
        with open(os.path.join(here, "gate.json"), encoding="utf-8") as f:
            gate = json.load(f)
        self.runners = [SegmentModel(s["model"], s["inputs"], s["outputs"]) for s in gate["segments"]]
        self.runtime = GatedRuntime(manifest, self.runners)
        self.has_raw = manifest.input.normalization is not None
        # With --gate-batching the gate model has dynamic batching too: one execute gets several requests,
        # and those with the same thresholds run as one batch (one chain of segment calls for all).
        self.batched = int(json.loads(args["model_config"]).get("max_batch_size", 0)) > 0
        self.metrics = None
        if hasattr(pb_utils, "MetricFamily"):  # Triton >= 23.01 (custom metrics in the Python backend)
            self.metrics = Metrics(args["model_name"], args["model_instance_name"], manifest.num_gates)

    def finalize(self):
        if self.metrics is not None:
            self.metrics.close()

    def execute(self, requests):
        tally = self.metrics.tally if self.metrics is not None else None
        if tally is not None:
            with tally.lock:
                tally.in_flight += len(requests)
        try:
            if not self.batched:
                return [self._one(request) for request in requests]
            return self._batched(requests)
        finally:
            if tally is not None:
                with tally.lock:
                    tally.in_flight -= len(requests)

    def _run(self, x, thresholds, sizes, probe: bool = False):
        """runtime.run for requests of `sizes` rows, counted in the metrics unless it is serve's probe."""
        for runner in self.runners:
            runner.seen = []
        res = self.runtime.run(x, thresholds)
        if self.metrics is not None and not probe:
            seen = [runner.seen for runner in self.runners[:-1]]  # the last segment has no gate
            self.metrics.tally.add("bundle" if thresholds is None else "request", res.exits, seen, sizes)
        return res

    def _input(self, request):
        x = pb_utils.get_input_tensor_by_name(request, INPUT)
        raw = pb_utils.get_input_tensor_by_name(request, RAW_INPUT) if self.has_raw else None
        if (x is None) == (raw is None):
            raise UserError("Send exactly one of the inputs 'input' (model input)"
                            + (f" and {RAW_INPUT!r} (raw pixels)." if self.has_raw else "."))
        return (x if raw is None else raw).as_numpy()

    def _one(self, request):
        try:
            x = self._input(request)
            res = self._run(x, thresholds_of(request), [len(x)], probe=is_probe(request))
        except (UserError, SegmentError) as err:
            return _error(err)
        return _response(res, slice(None))

    def _batched(self, requests):
        responses = [None] * len(requests)
        groups = {}  # (thresholds (None: the bundle's), probe) -> [(request number, prepared rows)]
        for i, request in enumerate(requests):
            try:  # checked per request, so that one bad request fails alone
                x = self.runtime._prepare(self._input(request))
                thr = thresholds_of(request)
                key = None if thr is None else self.runtime._check_thresholds(thr)
            except UserError as err:
                responses[i] = _error(err)
                continue
            groups.setdefault((key, is_probe(request)), []).append((i, x))
        for (key, probe), members in groups.items():
            x = members[0][1] if len(members) == 1 else np.concatenate([m[1] for m in members])
            try:
                res = self._run(x, key, [len(m[1]) for m in members], probe)
            except (UserError, SegmentError) as err:
                for i, _ in members:
                    responses[i] = _error(err)
                continue
            start = 0
            for i, rows in members:
                responses[i] = _response(res, slice(start, start + len(rows)))
                start += len(rows)
        return responses


def is_probe(request) -> bool:
    return PROBE in json.loads(request.parameters() or "{}")


def _error(err):
    code = pb_utils.TritonError.INVALID_ARG if isinstance(err, UserError) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))


def _response(res, rows):
    outputs = [pb_utils.Tensor(LOGITS, np.ascontiguousarray(res.logits[rows], dtype=np.float32)),
               pb_utils.Tensor("predictions", np.ascontiguousarray(res.predictions[rows], dtype=np.int64)),
               pb_utils.Tensor("exits", np.ascontiguousarray(res.exits[rows])),
               pb_utils.Tensor(CONFIDENCE, np.ascontiguousarray(res.confidence[rows]))]
    return pb_utils.InferenceResponse(output_tensors=outputs)
