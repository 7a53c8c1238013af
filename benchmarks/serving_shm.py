"""Shared memory of a served bundle under load (docs/serving.md, "Shared memory"): how large the Python
backend's regions of a `dgate-export serve` server grow, for sizing /dev/shm in a container.

    .venv/bin/python benchmarks/serving_shm.py engines/bench-resnet56 --size 64 --concurrency 32 --seconds 20

Starts `serve` (default settings: 8 gate instances) on 127.0.0.1, drives it with benchmarks/serving_load.py
(a closed loop of `concurrency` clients sending `size`-row requests of real test images over gRPC) and
samples the total size of the server's regions (its own prefix: /dev/shm/dgate<serve pid>x*) every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dgate_export.data import load_dataset
from dgate_export.manifest import load_manifest
from dgate_export.serving.server import find_server, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    install = find_server()
    name = load_manifest(args.bundle).name
    work = Path(tempfile.mkdtemp(prefix="dgate-shm-"))
    np.savez(work / "x.npz", x=load_dataset("fashion-mnist", "test").x)
    http, grpc, metrics = free_port(), free_port(), free_port()
    serve = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(args.bundle), "--port", str(http),
                              "--grpc-port", str(grpc), "--metrics-port", str(metrics)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             start_new_session=True)
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            regions = list(Path("/dev/shm").glob(f"dgate{serve.pid}x*"))
            try:
                samples.append((len(regions), sum(r.stat().st_size for r in regions)))
            except FileNotFoundError:
                pass
            time.sleep(0.2)

    try:
        for line in serve.stdout:
            if line.startswith("ready:"):
                break
        regions = list(Path("/dev/shm").glob(f"dgate{serve.pid}x*"))
        at_ready = (len(regions), sum(r.stat().st_size for r in regions))
        threading.Thread(target=watch, daemon=True).start()
        job = {"url": f"127.0.0.1:{grpc}", "inputs": str(work / "x.npz"), "warmup_seconds": 1.0,
               "items": [{"model": name, "loop": "closed", "size": args.size, "concurrency": args.concurrency,
                          "seconds": args.seconds, "stats": []}]}
        (work / "job.json").write_text(json.dumps(job))
        proc = subprocess.run([str(install.python), str(ROOT / "benchmarks" / "serving_load.py"), str(work / "job.json")],
                              capture_output=True, text=True, timeout=600, check=True)
        load = json.loads(proc.stdout)[0]
    finally:
        stop.set()
        serve.send_signal(signal.SIGINT)
        serve.communicate(timeout=120)
    peak = max(samples, key=lambda s: s[1])
    result = {"command": " ".join(sys.argv), "load_average": os.getloadavg(), "regions": peak[0],
              "peak_bytes": peak[1], "bytes_at_start": at_ready, "samples_per_s": load["rows"] / load["elapsed"],
              "errors": load["errors"], "serve_status": serve.returncode}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
