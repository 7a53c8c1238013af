"""Send requests to a Triton server with tritonclient, for tests/test_serving.py.

Runs in the Triton environment (.venv-triton: tritonclient needs a protobuf that the project's venv
does not take), so the tests call it as a subprocess:

    .venv-triton/bin/python tests/triton_client.py JOB.json

JOB.json: {"url", "protocol": "http"|"grpc", "model", "concurrency", "inputs": NPZ, "out": NPZ,
"requests": [{"key": npz key of the array, "input": "input"|"input_raw", "datatype": "FP32"|...,
"thresholds": str or null}]}. Every request is sent once; the results go to `out` as i/<output> arrays,
and errors to stdout as JSON {"errors": {i: [status, message]}, "seconds": wall time}.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

OUTPUTS = ("logits", "predictions", "exits", "confidence")


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    module = httpclient if job["protocol"] == "http" else grpcclient
    arrays = dict(np.load(job["inputs"]))
    local = threading.local()
    results: dict[str, np.ndarray] = {}
    errors: dict[int, list[str]] = {}
    outputs = job.get("outputs", list(OUTPUTS))

    def send(i: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = module.InferenceServerClient(job["url"])
        req = job["requests"][i]
        x = arrays[req["key"]]
        inp = module.InferInput(req.get("input", "input"), list(x.shape), req["datatype"])
        inp.set_data_from_numpy(x)
        params = {"thresholds": req["thresholds"]} if req.get("thresholds") is not None else None
        try:
            res = client.infer(job["model"], [inp], parameters=params)
        except InferenceServerException as err:
            errors[i] = [str(err.status()), err.message()]
            return
        for name in outputs:
            results[f"{i}/{name}"] = res.as_numpy(name)

    start = time.perf_counter()
    with ThreadPoolExecutor(max(1, int(job.get("concurrency", 1)))) as pool:
        list(pool.map(send, range(len(job["requests"]))))
    seconds = time.perf_counter() - start
    np.savez(job["out"], **results)
    print(json.dumps({"errors": errors, "seconds": seconds}))


if __name__ == "__main__":
    main(sys.argv[1])
