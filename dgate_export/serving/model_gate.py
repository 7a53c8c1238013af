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
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dgate_export.contract import CONFIDENCE, INDEX, INPUT, LOGITS
from dgate_export.errors import UserError  # the copy next to this file
from dgate_export.manifest import Manifest
from dgate_export.runtime import GatedRuntime

RAW_INPUT = "input_raw"
THRESHOLDS = "thresholds"


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


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "manifest.json"), encoding="utf-8") as f:
            manifest = Manifest.from_dict(json.load(f))
        with open(os.path.join(here, "gate.json"), encoding="utf-8") as f:
            gate = json.load(f)
        runners = [SegmentModel(s["model"], s["inputs"], s["outputs"]) for s in gate["segments"]]
        self.runtime = GatedRuntime(manifest, runners)
        self.has_raw = manifest.input.normalization is not None
        # With --gate-batching the gate model has dynamic batching too: one execute gets several requests,
        # and those with the same thresholds run as one batch (one chain of segment calls for all).
        self.batched = int(json.loads(args["model_config"]).get("max_batch_size", 0)) > 0

    def execute(self, requests):
        if not self.batched:
            return [self._one(request) for request in requests]
        return self._batched(requests)

    def _input(self, request):
        x = pb_utils.get_input_tensor_by_name(request, INPUT)
        raw = pb_utils.get_input_tensor_by_name(request, RAW_INPUT) if self.has_raw else None
        if (x is None) == (raw is None):
            raise UserError("Send exactly one of the inputs 'input' (model input)"
                            + (f" and {RAW_INPUT!r} (raw pixels)." if self.has_raw else "."))
        return (x if raw is None else raw).as_numpy()

    def _one(self, request):
        try:
            res = self.runtime.run(self._input(request), thresholds_of(request))
        except (UserError, SegmentError) as err:
            return _error(err)
        return _response(res, slice(None))

    def _batched(self, requests):
        responses = [None] * len(requests)
        groups = {}  # thresholds (None: the bundle's) -> [(request number, prepared rows)]
        for i, request in enumerate(requests):
            try:  # checked per request, so that one bad request fails alone
                x = self.runtime._prepare(self._input(request))
                thr = thresholds_of(request)
                key = None if thr is None else self.runtime._check_thresholds(thr)
            except UserError as err:
                responses[i] = _error(err)
                continue
            groups.setdefault(key, []).append((i, x))
        for key, members in groups.items():
            x = members[0][1] if len(members) == 1 else np.concatenate([m[1] for m in members])
            try:
                res = self.runtime.run(x, key)
            except (UserError, SegmentError) as err:
                for i, _ in members:
                    responses[i] = _error(err)
                continue
            start = 0
            for i, rows in members:
                responses[i] = _response(res, slice(start, start + len(rows)))
                start += len(rows)
        return responses


def _error(err):
    code = pb_utils.TritonError.INVALID_ARG if isinstance(err, UserError) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), code))


def _response(res, rows):
    outputs = [pb_utils.Tensor(LOGITS, np.ascontiguousarray(res.logits[rows], dtype=np.float32)),
               pb_utils.Tensor("predictions", np.ascontiguousarray(res.predictions[rows], dtype=np.int64)),
               pb_utils.Tensor("exits", np.ascontiguousarray(res.exits[rows])),
               pb_utils.Tensor(CONFIDENCE, np.ascontiguousarray(res.confidence[rows]))]
    return pb_utils.InferenceResponse(output_tensors=outputs)
