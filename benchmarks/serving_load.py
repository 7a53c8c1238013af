"""Load generator of benchmarks/serving.py: runs in the Triton environment (.venv-triton, where
tritonclient lives) and drives a server over gRPC on 127.0.0.1.

    .venv-triton/bin/python benchmarks/serving_load.py JOB.json > RESULT.json

JOB.json: {"url", "inputs": NPZ with x [M, C, H, W] float32, "warmup_seconds", "server_pid" (its session's
CPU time is read around every item), "items": [...]}; each item
{"model", "loop": "closed"|"open", "size": rows per request, "seconds", "concurrency" (closed) or
"rate" (open: requests per second), "stats": [models whose statistics are read before and after]}.
Closed loop: `concurrency` clients, each sends its next request when the last one returns. Open loop:
requests are sent at fixed times (rate per second) whatever the answers; a request's latency counts
from its scheduled time. Every loop is bounded by `seconds` (open loops also by a 60 s drain).
Requests take consecutive rows of x at random offsets.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def _inputs(x: np.ndarray) -> list:
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _stats(client, models: list[str]) -> dict[str, list[int]]:
    out = {}
    for m in models:
        s = client.get_inference_statistics(m, as_json=True)["model_stats"][0]
        out[m] = [int(s.get("inference_count", 0)), int(s.get("execution_count", 0))]
    return out


def server_cpu_seconds(sid: int | None) -> float:
    """CPU time (user + system) of every live process in the server's session (tritonserver and its
    Python backend stubs): throughput per server CPU-second does not depend on how much of the shared
    machine the server got."""
    if not sid:
        return 0.0
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state ppid pgrp session ... utime(11) stime(12)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def closed(url: str, model: str, x: np.ndarray, size: int, concurrency: int, seconds: float, seed: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    rows = [0]

    def client_loop(k: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        rng = np.random.default_rng(seed + k)
        mine, done = [], 0
        while time.perf_counter() < deadline:
            start = int(rng.integers(0, len(x) - size + 1))
            t0 = time.perf_counter()
            try:
                client.infer(model, _inputs(x[start:start + size]))
            except InferenceServerException as err:
                with lock:
                    errors.append(err.message())
                continue
            mine.append(time.perf_counter() - t0)
            done += size
        with lock:
            latencies.extend(mine)
            rows[0] += done
        client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "rows": rows[0], "elapsed": time.perf_counter() - t0, "errors": errors}


def open_loop(url: str, model: str, x: np.ndarray, size: int, rate: float, seconds: float, seed: int) -> dict:
    client = grpcclient.InferenceServerClient(url)
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * seconds))
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)
    t0 = time.perf_counter()

    def callback(scheduled: float, result, error) -> None:
        end = time.perf_counter()
        with lock:
            if error is not None:
                errors.append(str(error))
            else:
                latencies.append(end - scheduled)
        done.release()

    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        start = int(rng.integers(0, len(x) - size + 1))
        client.async_infer(model, _inputs(x[start:start + size]),
                           callback=lambda result, error, s=scheduled: callback(s, result, error))
    drain = time.perf_counter() + 60
    answered = 0
    while answered < n and done.acquire(timeout=max(0.0, drain - time.perf_counter())):
        answered += 1
    elapsed = time.perf_counter() - t0
    client.close()
    return {"latencies": latencies, "rows": len(latencies) * size, "elapsed": elapsed, "errors": errors,
            "sent": n, "unanswered": n - answered}


def main(path: str) -> None:
    with open(path, encoding="utf-8") as f:
        job = json.load(f)
    x = np.load(job["inputs"])["x"]
    url = job["url"]
    stats_client = grpcclient.InferenceServerClient(url)
    warmed: set[str] = set()
    results = []
    for i, item in enumerate(job["items"]):
        model = item["model"]
        if model not in warmed:  # every model's first requests pay one-time costs
            closed(url, model, x, 16, 4, job.get("warmup_seconds", 2.0), seed=10_000 + i)
            warmed.add(model)
        before = _stats(stats_client, item["stats"])
        cpu = server_cpu_seconds(job.get("server_pid"))
        if item["loop"] == "closed":
            out = closed(url, model, x, item["size"], item["concurrency"], item["seconds"], seed=i)
        else:
            out = open_loop(url, model, x, item["size"], item["rate"], item["seconds"], seed=i)
        out["server_cpu_seconds"] = server_cpu_seconds(job.get("server_pid")) - cpu
        after = _stats(stats_client, item["stats"])
        out["stats"] = {m: [after[m][0] - before[m][0], after[m][1] - before[m][1]] for m in item["stats"]}
        results.append({**item, **out})
        print(f"{model} {item['loop']} size {item['size']} "
              f"{item.get('concurrency', item.get('rate'))}: {out['rows'] / out['elapsed']:.0f} samples/s",
              file=sys.stderr, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
