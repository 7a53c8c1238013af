"""A `dgate-export serve` subprocess for the serving tests: its output lines, readiness samples, the
tritonserver it runs and its stubs (from /proc), and an end that stops only the processes it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dgate_export.serving.server import SHM_DIR, free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Serve:
    """A `serve` subprocess, its output lines (with the time each arrived) and readiness samples."""

    proc: subprocess.Popen
    http: int
    metrics: int
    lines: list[tuple[float, str]] = field(default_factory=list)
    ready: list[tuple[float, int]] = field(default_factory=list)  # (time, HTTP status; 0: no answer)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start_threads(self) -> None:
        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append((time.time(), line.rstrip("\n")))

        def poll() -> None:
            while not self._stop.is_set():
                self.ready.append((time.time(), readiness(self.http)))
                time.sleep(0.1)

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=poll, daemon=True).start()

    def wait_line(self, prefix: str, after: float = 0.0, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if t >= after and line.startswith(prefix):
                    return t
            if self.proc.poll() is not None and not any(line.startswith(prefix) for _, line in self.lines):
                break
            time.sleep(0.1)
        raise AssertionError(f"no line {prefix!r} from serve:\n" + self.text())

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def server_pid(self) -> int | None:
        """The tritonserver serve runs now: serve's child."""
        for pid in _children(self.proc.pid):
            if _cmdline(pid)[:1] and _cmdline(pid)[0].endswith("tritonserver"):
                return pid
        return None


def readiness(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except (urllib.error.URLError, OSError):
        return 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2:].split()[1] == str(pid):
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def stub_of(server_pid: int, model: str) -> tuple[int, str]:
    """(pid, shared-memory prefix) of the Python backend stub of `model` that the server runs."""
    for pid in _children(server_pid):
        argv = _cmdline(pid)
        if len(argv) > 2 and argv[0].endswith("triton_python_backend_stub") and f"/{model}/1/" in argv[1]:
            return pid, argv[2].split("_", 1)[0] + "_"
    raise AssertionError(f"no stub of {model} under {server_pid}")


def regions(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}*"))


def start_serve(bundle: Path, tmp_path: Path, *extra: str) -> Serve:
    """`serve BUNDLE` on free ports, 2 gate instances, a probe every second; TMPDIR is `tmp_path`."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(bundle), "--port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--instances", "2",
                             "--probe-interval", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    serve = Serve(proc, http, metrics)
    serve.start_threads()
    return serve


def end(serve: Serve) -> list[str]:
    """Whatever is left of this test's serve and the server it started (only those processes); returns the
    shared-memory regions serve's servers left (removed here, after they were counted)."""
    serve._stop.set()
    if serve.proc.poll() is None:
        server = serve.server_pid()
        if server is not None:
            try:
                os.killpg(server, signal.SIGKILL)  # tritonserver leads its own group: it and its stubs
            except ProcessLookupError:
                pass
        os.killpg(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(30)
    left = sorted(SHM_DIR.glob(f"dgate{serve.proc.pid}x*"))
    for region in left:
        region.unlink(missing_ok=True)
    return [p.name for p in left]
