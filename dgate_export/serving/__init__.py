"""Serve a bundle on Triton Inference Server (docs/serving.md).

- `repository.write_repository(bundle, out, ...)`: a Triton model repository from a bundle: one model
  per segment (`NAME_seg0` .. `NAME_segK`, each with `dynamic_batching`, so Triton's per-model queue
  merges the survivors of concurrent requests), the un-gated baseline (`NAME_baseline`) and the gate
  model `NAME` (Python backend, business logic scripting) that runs the early-exit loop of
  `GatedRuntime` over the segment models.
- `server.find_server()` / `server.TritonServer`: a local `tritonserver` on 127.0.0.1 (the one bundled
  by PyPI's `nvidia-pytriton`, or an installed one), with its Python backend set up.

Nothing here imports torch or tritonclient; the gate model's code runs inside the server.
"""

from __future__ import annotations

from .repository import PLATFORMS, write_repository
from .server import TritonServer, find_server

__all__ = ["PLATFORMS", "TritonServer", "find_server", "write_repository"]
