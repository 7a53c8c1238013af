"""The drift signal on a bundle (docs/serving.md, "The drift signal"): false alarms and detection.

Offline (the default): the bundle's exits (GatedRuntime.run, which the server's equal: tests/test_serving.py)
on Fashion-MNIST's 10 000 test images as they are and shifted (darker, noisier, another class mix); then
`--windows` windows of W samples drawn at random from each condition, each tested against the bundle's
recorded calibration exit mix (drift.exit_mix_test at --alpha). As they are: the fraction of windows that
raise the alarm is the false-alarm rate; shifted: the detection rate.

--served: the same through `dgate-export serve` (a real tritonserver on 127.0.0.1) and the example client:
`--served-windows` windows of 5000 test images as they are, then two darkened windows (x0.7); serve's own drift
lines and metrics are the result.

    .venv/bin/python benchmarks/drift.py engines/bench-resnet56 --json benchmarks/results/drift.json
    .venv/bin/python benchmarks/drift.py engines/bench-resnet56 --served
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dgate_export.data import load_dataset
from dgate_export.drift import exit_mix_test, parse_metrics, reference_of
from dgate_export.manifest import load_manifest
from dgate_export.runtime import GatedRuntime
from dgate_export.serving.server import find_server, free_port

HARD = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt: the classes early exits find hard


def raw_pixels(x: np.ndarray, norm: dict) -> np.ndarray:
    """The uint8 pixels the normalized rows came from (the runtime normalizes them again)."""
    raw = (x * np.asarray(norm["std"], np.float32).reshape(1, -1, 1, 1)
           + np.asarray(norm["mean"], np.float32).reshape(1, -1, 1, 1)) / norm["scale"]
    return np.clip(np.rint(raw), 0, 255).astype(np.uint8)


def conditions(raw: np.ndarray, y: np.ndarray, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (uint8 images, labels)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(raw.shape).astype(np.float32)

    def clip(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    mild, hard = ~np.isin(y, (1, 8)), np.isin(y, HARD)
    return {
        "as they are": (raw, y),
        "darker x0.9": (clip(raw * 0.9), y),
        "darker x0.7": (clip(raw * 0.7), y),
        "darker x0.5": (clip(raw * 0.5), y),
        "noise sigma 10": (clip(raw + 10 * noise), y),
        "noise sigma 25": (clip(raw + 25 * noise), y),
        "no trousers or bags (8000 rows)": (raw[mild], y[mild]),
        "tops, coats and shirts only (4000 rows)": (raw[hard], y[hard]),
    }


def offline(args, rt: GatedRuntime, reference) -> dict:
    test = load_dataset("fashion-mnist", "test")
    raw = raw_pixels(test.x, rt.manifest.input.normalization)
    rng = np.random.default_rng(args.seed)
    out: dict = {"reference": {"fractions": reference.fractions.tolist(), "rows": reference.rows,
                               "where": reference.where},
                 "alpha": args.alpha, "windows": args.windows, "conditions": {}}
    for name, (x, y) in conditions(raw, test.y, args.seed).items():
        started = time.perf_counter()
        runs = [rt.run(x[i:i + 1000]) for i in range(0, len(x), 1000)]
        exits = np.concatenate([r.exits for r in runs])
        accuracy = float(np.mean(np.concatenate([r.predictions for r in runs]) == y))
        whole = exit_mix_test(reference.counts, np.bincount(exits, minlength=len(reference.counts)), args.alpha)
        entry = {"rows": len(x), "accuracy": accuracy, "exit_fractions": whole.fractions(whole.observed),
                 "p_all_rows": whole.p_value, "alarm_rate": {}}
        for w in args.window:
            if w > len(x):
                continue
            alarms = 0
            for _ in range(args.windows):
                pick = rng.choice(len(x), size=w, replace=False)
                counts = np.bincount(exits[pick], minlength=len(reference.counts))
                alarms += exit_mix_test(reference.counts, counts, args.alpha).alarm
            entry["alarm_rate"][str(w)] = alarms / args.windows
        out["conditions"][name] = entry
        rates = "  ".join(f"W={w}: {r:.1%}" for w, r in entry["alarm_rate"].items())
        print(f"{name:<42} accuracy {accuracy:.2%}  exits {' '.join(f'{f:.3f}' for f in entry['exit_fractions'])}"
              f"  all rows p={whole.p_value:.2g}  alarms {rates}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def served(args, bundle: Path, reference) -> dict:
    install = find_server()
    manifest = load_manifest(bundle)
    test = load_dataset("fashion-mnist", "test")
    raw = raw_pixels(test.x, manifest.input.normalization)
    http, grpc, metrics = free_port(), free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="dgate-drift-"))
    serve = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(bundle), "--port", str(http),
                              "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--drift-window", "5000",
                              "--drift-alpha", str(args.alpha)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines: list[str] = []
    try:
        for line in serve.stdout:
            lines.append(line.rstrip())
            if line.startswith("ready:"):
                break
        rng = np.random.default_rng(args.seed)
        sent = []
        darker = conditions(raw, test.y)["darker x0.7"][0]
        plan = [("as they are", raw)] * args.served_windows + [("darker x0.7", darker)] * 2
        for k, (name, x) in enumerate(plan):
            path = work / f"w{k}.npz"
            np.savez(path, x=x[rng.choice(len(x), size=5000, replace=False)])
            started = time.perf_counter()
            proc = subprocess.run([str(install.python), str(ROOT / "examples" / "triton_client.py"), str(path),
                                   "--model", manifest.name, "--grpc", f"127.0.0.1:{grpc}", "--batch", "16"],
                                  capture_output=True, text=True, timeout=1200, check=True)
            seconds = time.perf_counter() - started
            time.sleep(3)  # serve reads the counters every 2 s: its window closes on these 5000 samples
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
                text = r.read().decode()
            own = {name.removeprefix("dgate_drift_"): [v for _, v in parse_metrics(text, name)] for name in
                   ("dgate_drift_windows_total", "dgate_drift_alarm", "dgate_drift_p_value", "dgate_drift_alarms_total")}
            sent.append({"window": k + 1, "condition": name, "seconds": seconds, "serve": own,
                         "client": proc.stdout.strip().splitlines()[-1]})
            print(f"window {k + 1}: {name}, 5000 images in {seconds:.0f} s; serve: {own}", flush=True)
        regions = list(Path("/dev/shm").glob(f"dgate{serve.pid}x*"))  # the server's shared memory, after the load
        shm = {"regions": len(regions), "bytes": sum(r.stat().st_size for r in regions),
               "resident_bytes": sum(r.stat().st_blocks * 512 for r in regions)}
        print(f"shared memory: {shm}")
    finally:
        serve.send_signal(signal.SIGINT)
        rest, _ = serve.communicate(timeout=120)
        lines += rest.splitlines()
    drift_lines = [line for line in lines if line.startswith("drift:")]
    print("\n".join(drift_lines))
    return {"windows": sent, "serve_drift_lines": drift_lines, "serve_status": serve.returncode,
            "shared_memory": shm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--windows", type=int, default=2000, help="offline: windows drawn per condition and size")
    ap.add_argument("--window", type=int, action="append", help="offline: window sizes [1000, 2000, 5000]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--served", action="store_true", help="through dgate-export serve instead")
    ap.add_argument("--served-windows", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.window = args.window or [1000, 2000, 5000]
    reference = reference_of(load_manifest(args.bundle))
    if args.served:
        result = served(args, args.bundle, reference)
    else:
        rt = GatedRuntime.load(args.bundle)
        result = offline(args, rt, reference)
    result["command"] = " ".join(sys.argv)
    result["load_average"] = os.getloadavg()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
