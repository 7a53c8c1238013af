"""A segment (or baseline) model of a Triton repository written with `--platform python` (copied as
NAME_segK/1/model.py): the segment's ONNX graph in an ONNX Runtime session, for servers that have only
the Python backend.

Triton's dynamic batcher hands `execute` every request it merged; their rows are concatenated, run as
one batch (the project's ONNX Runtime runner, copied next to this file), and split back per request.

Segment k>0's graph is the bundle's own, which takes `index` (the rows of its carries to keep) besides
the carries; the model's Triton config has no `index` (the gate model sends the survivors' carries
only, repository.py says why), so the model feeds `index` = 0..rows-1 itself: every row, in order.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dgate_export.backends.onnxruntime import Runner  # the copies next to this file
from dgate_export.contract import INDEX


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = os.path.dirname(os.path.abspath(__file__))
        options = {"intra_op_num_threads": int(params.get("intra_op_num_threads", "1")),
                   "providers": [params.get("providers", "cpu")]}
        self.runner = Runner(os.path.join(here, "model.onnx"), options)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        # Segment k>0: the graph's `index` input, which Triton does not send (see the module docstring).
        self.index = INDEX in self.runner.input_names and INDEX not in self.inputs

    def execute(self, requests):
        arrays = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.inputs] for r in requests]
        sizes = [len(a[0]) for a in arrays]
        if len(requests) == 1:
            feeds = dict(zip(self.inputs, arrays[0]))
        else:
            feeds = {name: np.concatenate([a[i] for a in arrays]) for i, name in enumerate(self.inputs)}
        if self.index:
            feeds[INDEX] = np.arange(sum(sizes), dtype=np.int64)
        try:
            out = self.runner.run(feeds)
        except Exception as err:  # noqa: BLE001  (the requests of this batch fail; the model keeps serving)
            error = pb_utils.TritonError(f"{type(err).__name__}: {err}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses = []
        start = 0
        for n in sizes:
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(out[name][start:start + n]))
                                for name in self.outputs]))
            start += n
        return responses
