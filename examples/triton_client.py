"""Classify images with a bundle served by Triton (`dgate-export serve BUNDLE`), over HTTP or gRPC.

    python examples/triton_client.py data.npz --model NAME                    # HTTP on 127.0.0.1:8000
    python examples/triton_client.py data.npz --model NAME --grpc 127.0.0.1:8001 --thresholds 0.9,0.95,0.99

data.npz holds `x`: float32 model input [N, C, H, W], or uint8 raw pixels (sent as `input_raw`, which the
gate model normalizes as the bundle records); optional `y` labels. Needs numpy and tritonclient only
(`pip install "tritonclient[http,grpc]"`); the early-exit loop runs in the server.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def classify(x: np.ndarray, model: str, url: str, grpc: bool = False, thresholds: str | None = None,
             batch: int = 64) -> dict[str, np.ndarray]:
    """Send x in requests of `batch` rows; return the concatenated outputs."""
    if grpc:
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    client = client_lib.InferenceServerClient(url)
    name, dtype = ("input_raw", "UINT8") if x.dtype == np.uint8 else ("input", "FP32")
    x = x if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    params = {"thresholds": thresholds} if thresholds else None  # per request; default: the bundle's
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("predictions", "exits", "confidence", "logits")}
    for start in range(0, len(x), batch):
        rows = np.ascontiguousarray(x[start:start + batch])
        inp = client_lib.InferInput(name, list(rows.shape), dtype)
        inp.set_data_from_numpy(rows)
        res = client.infer(model, [inp], parameters=params)
        for k, values in parts.items():
            values.append(res.as_numpy(k))
    return {k: np.concatenate(v) for k, v in parts.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="npz with x (and optionally y)")
    ap.add_argument("--model", required=True, help="the gate model's name (the bundle's name)")
    ap.add_argument("--http", default="127.0.0.1:8000", help="HTTP endpoint")
    ap.add_argument("--grpc", default=None, help="gRPC endpoint (used instead of HTTP when given)")
    ap.add_argument("--thresholds", default=None, help="comma-separated, one per gate (default: the bundle's)")
    ap.add_argument("--batch", type=int, default=64, help="rows per request")
    args = ap.parse_args()
    data = np.load(args.data)
    x = data["x"]
    out = classify(x, args.model, args.grpc or args.http, grpc=args.grpc is not None, thresholds=args.thresholds,
                   batch=args.batch)
    counts = np.bincount(out["exits"])
    print(f"{len(x)} images; exits per gate (last: full network): {counts.tolist()}")
    if "y" in data.files:
        print(f"accuracy {(out['predictions'] == data['y']).mean():.2%}")
    print("first predictions:", out["predictions"][:10].tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
