"""A closed-loop load on a Triton gate model that checks every answer, for tests/test_serving_faults.py.

Runs in the Triton environment (.venv-triton: tritonclient), as a subprocess:

    .venv-triton/bin/python tests/triton_load.py JOB.json

JOB.json: {"url", "model", "threads", "seconds" (at most), "stop" (a file: stop when it exists),
"cases": NPZ with x_i, exits_i, predictions_i, logits_i (what GatedRuntime.run answers), "out": JSON}.
Each thread sends the cases in turn over one keep-alive HTTP connection (reconnecting after an error)
and compares each answer with the expected one. The report: one event per request [start, end, kind]
(wall-clock seconds; kind "ok", "wrong" (answered, but not what the runtime answers), or the error:
"refused", "cut", "http:<status>:<message>", other), and the counts.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def kind_of(err: BaseException) -> str:
    if isinstance(err, InferenceServerException):
        return f"http:{err.status()}:{(err.message() or '')[:120]}"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    name = type(err).__name__
    if "Closed" in name or isinstance(err, (ConnectionResetError, BrokenPipeError)):
        return "cut"
    return f"{name}:{str(err)[:120]}"


def main(path: str) -> None:
    job = json.loads(Path(path).read_text())
    data = np.load(job["cases"])
    n = sum(1 for k in data.files if k.startswith("x_"))
    cases = [(data[f"x_{i}"], data[f"exits_{i}"], data[f"predictions_{i}"], data[f"logits_{i}"]) for i in range(n)]
    stop_file = Path(job["stop"])
    deadline = time.monotonic() + float(job["seconds"])
    events: list[list] = []
    lock = threading.Lock()

    def worker(w: int) -> None:
        client = None
        i = w
        while time.monotonic() < deadline and not stop_file.exists():
            x, exits, predictions, logits = cases[i % n]
            i += 1
            start = time.time()
            try:
                if client is None:
                    client = httpclient.InferenceServerClient(job["url"], connection_timeout=30, network_timeout=60)
                inp = httpclient.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                res = client.infer(job["model"], [inp])
                same = (np.array_equal(res.as_numpy("exits"), exits)
                        and np.array_equal(res.as_numpy("predictions"), predictions)
                        and np.allclose(res.as_numpy("logits"), logits, rtol=0, atol=1e-4))
                kind = "ok" if same else "wrong"
            except Exception as err:  # noqa: BLE001  (every failure is recorded, by kind)
                kind = kind_of(err)
                client = None
                time.sleep(0.05)
            with lock:
                events.append([start, time.time(), kind])

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(int(job["threads"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(e[2] for e in events)
    Path(job["out"]).write_text(json.dumps({"events": events, "counts": counts}))
    print(json.dumps(counts))


if __name__ == "__main__":
    main(sys.argv[1])
