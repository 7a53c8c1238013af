"""What a BLS segment call costs: the tests' tiny bundle (3 segments of almost no compute) on Triton.

    .venv/bin/python benchmarks/serving_overhead.py          # about 1 minute

Closed loop, 16 concurrent gRPC clients, 4 s per point, requests of 1 and 16 rows whose thresholds
(the bundle's) send every row through all 3 segments: server CPU time per request (tritonserver and its
Python backend processes, from /proc) for (a) the baseline model (one Python-backend model) and (b) the
gate model (3 BLS calls per request), with and without --gate-batching. With compute near zero the
difference is the price of the gate model and its BLS calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_bundle import SHAPE, make_tiny_bundle

from dgate_export.serving import TritonServer, find_server, write_repository


def main() -> None:
    install = find_server()
    with tempfile.TemporaryDirectory(prefix="dgate-overhead-") as tmp:
        work = Path(tmp)
        bundle, _ = make_tiny_bundle(work / "tiny", max_batch=16, thresholds=(2.0, 2.0))  # nobody leaves
        repo = write_repository(bundle, work / "repo", platform="python", instances=16)
        extra = write_repository(bundle, work / "repo_gb", platform="python", instances=4, gate_batching=True,
                                 name="tiny_gb")
        for model in extra.models:
            if not model.endswith("_baseline"):
                (extra.path / model).rename(repo.path / model)
        np.savez(work / "pool.npz", x=np.random.default_rng(0).standard_normal((256, *SHAPE)).astype(np.float32))
        models = {"baseline": ["tiny_baseline"], "gated": ["tiny", "tiny_seg0", "tiny_seg1", "tiny_seg2"],
                  "gate-batched": ["tiny_gb", "tiny_gb_seg0", "tiny_gb_seg1", "tiny_gb_seg2"]}
        with TritonServer(repo.path, install=install) as server:
            items = [{"mode": mode, "model": stats[0], "stats": stats, "loop": "closed", "size": size,
                      "concurrency": 16, "seconds": 4} for size in (1, 16) for mode, stats in models.items()]
            job = {"url": server.grpc_url, "inputs": str(work / "pool.npz"), "warmup_seconds": 1, "items": items,
                   "server_pid": server.process.pid if server.process else None}
            (work / "job.json").write_text(json.dumps(job))
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            out = subprocess.run([str(install.python or sys.executable), str(ROOT / "benchmarks" / "serving_load.py"),
                                  str(work / "job.json")], stdout=subprocess.PIPE, text=True, env=env, check=True)
    print("| model | rows/request | requests | server CPU ms per request | mean executed batch (rows) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in json.loads(out.stdout):
        n = len(r["latencies"])
        batches = ", ".join(f"{m}: {a / b:.1f}" for m, (a, b) in r["stats"].items() if b)
        print(f"| {r['mode']} | {r['size']} | {n} | {1e3 * r['server_cpu_seconds'] / n:.2f} | {batches} |")
    print("load average:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))


if __name__ == "__main__":
    main()
