"""A local Triton Inference Server on 127.0.0.1 for a model repository (`dgate-export serve`).

Where the server comes from (`find_server`), first found wins:
1. `env` given by the caller, or the environment variable DGATE_TRITON_ENV: a Python environment (a
   venv folder) with PyPI's `nvidia-pytriton`, whose wheel bundles a `tritonserver` binary with the
   Python backend (no ONNX Runtime or TensorRT backend: write the repository with --platform python);
2. `.venv-triton` at the root of this checkout (what scripts/setup.sh creates);
3. a `tritonserver` on PATH (NVIDIA's container: /opt/tritonserver/bin, backends next to it).

Two facts about nvidia-pytriton's server are handled here, not in the user's shell:
- its Python backend stub links libpython3.X.so (and the wheel's libcudart, found through an rpath that
  no longer holds once the stub is copied, so the wheel's library folder goes on LD_LIBRARY_PATH); unless LD_LIBRARY_PATH points at the environment's
  own LIBDIR it may load another build of the same Python found on the system, which fails
  (`No module named numpy`, or `RLock._recursion_count`);
- Triton 2.51's Python backend does not support numpy 2 (BLS requests fail with "input byte size
  mismatch"), and the stub takes its packages from the `python3` first on PATH: the server runs with
  that environment's bin/ first on PATH, and an environment with numpy 2 is refused.
The stub itself is copied, with the backend library, into a private backend folder (the wheel's
backend folder has no stub: pytriton copies it in at run time too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

ENV_VARIABLE = "DGATE_TRITON_ENV"
DEFAULT_ENV = ".venv-triton"
INSTALL_HINT = (
    "Run ./scripts/setup.sh (it creates .venv-triton with nvidia-pytriton, numpy<2 and onnxruntime), or "
    "make such a venv yourself (`python -m venv V && V/bin/pip install nvidia-pytriton 'numpy<2' onnxruntime`) "
    f"and point {ENV_VARIABLE} at it; on a GPU host use NVIDIA's container nvcr.io/nvidia/tritonserver."
)
_ROOT = Path(__file__).resolve().parents[2]  # the checkout this package lives in


@dataclass
class ServerInstall:
    binary: Path  # tritonserver
    backends: Path  # the backend folder as shipped (python/, maybe onnxruntime/, tensorrt/)
    python: Path | None = None  # the Python environment of the Python backend (pytriton layout)
    stub: Path | None = None  # the Python backend stub for that Python (pytriton layout)
    libdir: str | None = None  # that Python's LIBDIR (for libpython3.X.so)
    libs: list[Path] = field(default_factory=list)  # libraries the wheel ships beside the server (libcudart)
    available: set[str] = field(default_factory=set)  # backends the server has: "python", "onnxruntime", ...


def find_server(env: str | Path | None = None) -> ServerInstall:
    """Locate a Triton server and the Python environment its Python backend will use; UserError if none."""
    tried = []
    candidates = [env, os.environ.get(ENV_VARIABLE)] if env or os.environ.get(ENV_VARIABLE) else [_ROOT / DEFAULT_ENV]
    for cand in candidates:
        if not cand:
            continue
        found = _from_venv(Path(cand))
        if found is not None:
            return found
        tried.append(str(cand))
    binary = shutil.which("tritonserver")
    if binary:
        path = Path(binary).resolve()
        backends = path.parent.parent / "backends"
        return ServerInstall(binary=path, backends=backends, available=_backends(backends))
    where = f" (looked in {', '.join(tried)} and on PATH)" if tried else " (looked on PATH)"
    raise UserError(f"No Triton Inference Server is installed here{where}.", INSTALL_HINT)


def _from_venv(venv: Path) -> ServerInstall | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    probe = ("import json, sys, sysconfig\n"
             "out = {'version': '%d.%d' % sys.version_info[:2], 'libdir': sysconfig.get_config_var('LIBDIR')}\n"
             "try:\n import pytriton, os; out['pytriton'] = os.path.dirname(pytriton.__file__)\n"
             "except ImportError: pass\n"
             "try:\n import numpy; out['numpy'] = numpy.__version__\n"
             "except ImportError: pass\n"
             "try:\n import onnxruntime; out['onnxruntime'] = onnxruntime.__version__\n"
             "except ImportError: pass\n"
             "print(json.dumps(out))\n")
    try:
        info = json.loads(subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True,
                                         env=_clean_env(), timeout=120).stdout)
    except (subprocess.SubprocessError, json.JSONDecodeError, OSError) as err:
        raise UserError(f"The Triton environment {venv} does not run ({err}).", INSTALL_HINT) from err
    if "pytriton" not in info:
        return None
    numpy = info.get("numpy")
    if numpy is None or int(numpy.split(".")[0]) >= 2:
        raise UserError(f"The Triton environment {venv} has numpy {numpy or '(none)'}; the Python backend of the "
                        "server nvidia-pytriton bundles (Triton 2.51) needs numpy 1.x.",
                        f"{venv}/bin/pip install 'numpy<2'")
    root = Path(info["pytriton"]) / "tritonserver"
    stub = root / "python_backend_stubs" / info["version"] / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton in {venv} has no Python backend stub for Python {info['version']}.",
                        "Make the environment with a Python version it supports (3.8-3.13).")
    if "onnxruntime" not in info:  # what the segment models of --platform python run on
        raise UserError(f"The Triton environment {venv} has no onnxruntime.", f"{venv}/bin/pip install onnxruntime")
    return ServerInstall(binary=root / "bin" / "tritonserver", backends=root / "backends", python=python,
                         stub=stub, libdir=info.get("libdir"), available=_backends(root / "backends"),
                         libs=[p for p in (root / "external_libs", root.parent.parent / "nvidia_pytriton.libs")
                               if p.is_dir()])


def _backends(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def _clean_env() -> dict[str, str]:
    """The environment minus what would make another Python's packages leak into the server's."""
    env = dict(os.environ)
    for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    """Is something already listening on 127.0.0.1:`port` (a bind that would fail, as the server's)?"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "in use"
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


class TritonServer:
    """`tritonserver` for `repo` on 127.0.0.1; a context manager that stops it (and its stubs) on exit.

    Ports default to free ones. `log` collects the server's output (a temp file unless given).
    """

    def __init__(self, repo: str | Path, *, http_port: int | None = None, grpc_port: int | None = None,
                 install: ServerInstall | None = None, log: str | Path | None = None, verbose: int = 0):
        self.repo = Path(repo).resolve()
        self.install = install or find_server()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self._work = Path(tempfile.mkdtemp(prefix="dgate-triton-"))
        self.log_path = Path(log) if log else self._work / "tritonserver.log"
        self.verbose = verbose
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _backend_dir(self) -> Path:
        """The backend folder to give the server: the shipped one, or (pytriton) a private copy of its
        Python backend with the stub for the environment's Python put in."""
        inst = self.install
        if inst.stub is None:
            return inst.backends
        folder = self._work / "backends" / "python"
        shutil.copytree(inst.backends / "python", folder, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(inst.stub, folder / inst.stub.name)
        return folder.parent

    def _env(self) -> dict[str, str]:
        env = _clean_env()
        inst = self.install
        if inst.python is not None:
            env["PATH"] = f"{inst.python.parent}{os.pathsep}{env.get('PATH', '')}"
            # The stub, copied out of the wheel, no longer finds the wheel's libraries through its rpath.
            paths = [inst.libdir, *map(str, inst.libs), env.get("LD_LIBRARY_PATH")]
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        return env

    def start(self, timeout: float = 180.0) -> TritonServer:
        if not self.repo.is_dir():
            raise UserError(f"{self.repo} is not a model repository folder.",
                            "Write one with `dgate-export triton BUNDLE -o REPO`.")
        cmd = [str(self.install.binary), f"--model-repository={self.repo}",
               f"--backend-directory={self._backend_dir()}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=false", "--exit-on-error=true", "--strict-readiness=true",
               "--disable-auto-complete-config", "--exit-timeout-secs=10", f"--log-verbose={self.verbose}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the server's lifetime)
        try:
            # Its own session: Ctrl-C in a terminal reaches us, and we stop the server in order.
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                            start_new_session=True)
        finally:
            log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                status = self.process.returncode  # stop() forgets the process
                self.stop()
                tail = self.log_tail()
                hint = "Fix what the log says"
                if "failed to load" in tail:
                    hint += " (a model that failed to load is named there)"
                elif "already in use" in tail.lower() or "failed to start" in tail.lower():
                    hint += f" (a port it listens on, {self.http_port} or {self.grpc_port}, may be taken)"
                raise UserError(f"tritonserver exited with status {status} before it was ready. "
                                f"Its log ends:\n{tail}", hint + ".")
            if self.ready():
                return
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise UserError(f"tritonserver was not ready after {timeout:.0f} s. Its log ends:\n{tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def statistics(self, model: str) -> dict:
        """The server's statistics of `model` (KServe v2 extension: /v2/models/NAME/stats)."""
        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/stats", timeout=10) as r:
            return dict(json.loads(r.read()))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (Triton unloads its models, which ends their stub processes), then SIGKILL to the
        server's process group for whatever is left after `timeout`."""
        proc = self.process
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group we started: stubs the server left behind
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(5)
        self.process = None
        shutil.rmtree(self._work / "backends", ignore_errors=True)

    def close(self) -> None:
        self.stop()
        if self.log_path.parent == self._work:
            shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> TritonServer:  # noqa: PYI034
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mean_batch_size(stats: dict) -> float:
    """Rows per execution of one model from its statistics: inference_count / execution_count."""
    model = stats["model_stats"][0]
    executions = int(model.get("execution_count", 0))
    return int(model.get("inference_count", 0)) / executions if executions else 0.0

