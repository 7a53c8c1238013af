"""`dgate-export serve`: a bundle served by a local Triton Inference Server on 127.0.0.1 until stopped.

Write the model repository (`repository.write_repository`; into a temporary folder unless `repo` is
given), start `tritonserver` (`server.TritonServer`), wait until every model is ready, say where it
listens, and on Ctrl-C or SIGTERM stop it in order. A server that exits by itself is a UserError with
the end of its log.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..manifest import load_manifest
from ..outputs import REPOSITORY, check_output
from .repository import write_repository
from .server import TritonServer, find_server, port_in_use


def serve_bundle(bundle: str | Path, *, port: int = 8000, grpc_port: int = 8001, repo: str | Path | None = None,
                 platform: str = "auto", repository_options: Mapping[str, Any] | None = None,
                 triton_env: str | Path | None = None, echo: Callable[[str], Any] = print) -> None:
    """Serve `bundle` until Ctrl-C / SIGTERM. `repository_options` go to write_repository (instances,
    segment_instances, max_queue_delay_us, kind, threads, name, unbatched, gate_batching)."""
    if repo is not None:  # serve writes a fresh repository there, never over an existing folder
        check_output(repo, flag="--repo", folder=REPOSITORY, reads=(bundle,))
    if port == grpc_port:
        raise UserError(f"--port and --grpc-port are both {port}.", "Give the HTTP and gRPC endpoints different ports.")
    install = find_server(triton_env)  # first: no repository is written for a server that is not there
    taken = [f"{flag} {number}" for flag, number in (("--port", port), ("--grpc-port", grpc_port))
             if port_in_use(number)]
    if taken:
        raise UserError(f"{' and '.join(taken)}: something already listens there on 127.0.0.1.",
                        "Choose free ports with --port and --grpc-port, or stop what uses them.")
    manifest = load_manifest(bundle)
    if platform == "auto":
        native = "tensorrt" if manifest.backend == "tensorrt" else "onnxruntime"
        platform = native if native in install.available else "python"
    if platform != "python" and platform not in install.available:
        raise UserError(f"This Triton server has no {platform} backend (it has: "
                        f"{', '.join(sorted(install.available)) or 'none'}).", "Use --platform python.")
    work = None
    if repo is None:
        work = Path(tempfile.mkdtemp(prefix="dgate-serve-"))
        repo = work / "repo"
    server = None
    try:
        info = write_repository(bundle, repo, platform=platform, force=work is not None,
                                **dict(repository_options or {}))
        # Ctrl-C and SIGTERM (docker stop, systemd) both stop the server in order, whatever disposition
        # this process inherited (a parent may have ignored or blocked SIGINT).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        server = TritonServer(info.path, http_port=port, grpc_port=grpc_port, install=install)
        echo(f"starting tritonserver ({install.binary}) for {info.path} ...")
        server.start()
        c, h, w = (int(d) for d in manifest.input.shape[1:])
        echo(f"ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  models: {', '.join(info.models)}")
        echo(f"server log: {server.log_path}")
        echo("example (tritonclient):\n"
             "  import numpy as np, tritonclient.http as httpclient\n"
             f"  client = httpclient.InferenceServerClient('{server.http_url}')\n"
             f"  x = np.zeros((4, {c}, {h}, {w}), np.float32)\n"
             f"  inp = httpclient.InferInput('input', x.shape, 'FP32'); inp.set_data_from_numpy(x)\n"
             f"  res = client.infer('{info.name}', [inp])   # parameters={{'thresholds': '...'}} per request\n"
             "  res.as_numpy('predictions'), res.as_numpy('exits')\n"
             "Ctrl-C stops the server.")
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            echo("stopping tritonserver ...")
        else:
            raise UserError(f"tritonserver exited unexpectedly. Its log ends:\n{server.log_tail()}")
    finally:
        if server is not None:
            server.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    echo("stopped")
