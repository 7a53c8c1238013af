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
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
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
SHM_DIR = Path("/dev/shm")  # where the Python backend keeps its shared-memory regions


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


def check_port(port: int, flag: str, address: str = "127.0.0.1") -> None:
    """Refuse a port something already listens on (at `address` or on all addresses), naming it, before
    anything starts: another server there would answer the health checks meant for ours."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "in use"
        try:
            s.bind((address, port))
        except OSError as err:
            raise UserError(f"Port {port} on {address} ({flag}) is in use: another process listens there "
                            f"({err.strerror}).", f"Stop that process, or choose another port with {flag} PORT.") from err


def describe_exit(status: int | None) -> str:
    """A process's end in words, from a Popen-style status (negative: the signal that killed it)."""
    if status is None:
        return "is still running"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-status} ({name})"
    return f"exited with status {status}"


@dataclass
class Stub:
    """A Python backend stub process of a running server: one per model instance."""
    pid: int
    model: str  # the model whose instance it runs (from its model.py path)
    region: str  # its shared-memory region in /dev/shm


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _status_from_wait(code: int) -> int:
    """A wait status (as /proc/PID/stat's exit_code holds it) as a Popen-style status."""
    return -(code & 0x7F) if code & 0x7F else (code >> 8) & 0xFF


def stubs_of(server_pid: int) -> list[Stub]:
    """The live Python backend stubs whose parent is `server_pid` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or fields[1] != str(server_pid) or fields[0] == "Z":
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
            found.append(Stub(int(entry.name), Path(argv[1].decode()).parent.parent.name, argv[2].decode()))
    return found


def stub_death(stub: Stub, server_pid: int) -> str | None:
    """None while `stub` runs; else how it ended ("was killed by signal 9 (SIGKILL)", when the server has
    not reaped it yet)."""
    fields = _stat(stub.pid)
    if fields is not None and fields[1] == str(server_pid) and fields[0] != "Z":
        return None
    if fields is not None and fields[0] == "Z" and len(fields) >= 50:  # exit_code, the last field (Linux >= 3.5)
        return describe_exit(_status_from_wait(int(fields[-1])))
    return "ended"


def owns_port(pid: int, port: int) -> bool | None:
    """Whether process `pid` holds the socket listening on `port` (None where /proc cannot tell): the
    health check's answer is only ours if it is."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
        except OSError:
            continue
    return False


class TritonServer:
    """`tritonserver` for `repo` on 127.0.0.1; a context manager that stops it (and its stubs) on exit.

    Ports default to free ones; ports given are checked free first (`check_port`). The server gets:
    - its own process group, so that everything it started (the Python backend's stubs) can be ended
      with it, and nothing else;
    - its own shared-memory prefix (`shm_prefix`, Python backend's shm-region-prefix-name): every
      region it makes is /dev/shm/<prefix>*, so `stop` and `kill` remove exactly its regions, also
      after a crash that left them behind;
    - Prometheus metrics on 127.0.0.1:`metrics_port`, explicit model control (every model loaded at
      start; `unload` is how `serve` drains) and `exit_timeout` seconds for Triton's own stop.
    `log` collects the server's output (a temp file unless given).
    """

    def __init__(self, repo: str | Path, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, install: ServerInstall | None = None,
                 log: str | Path | None = None, verbose: int = 0, exit_timeout: int = 30,
                 check_ports: bool = True):
        self.repo = Path(repo).resolve()
        self.install = install or find_server()
        if check_ports:
            for port, flag in ((http_port, "--port"), (grpc_port, "--grpc-port"), (metrics_port, "--metrics-port")):
                if port:
                    check_port(port, flag)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self._work = Path(tempfile.mkdtemp(prefix="dgate-triton-"))
        self.log_path = Path(log) if log else self._work / "tritonserver.log"
        self.verbose = verbose
        self.exit_timeout = exit_timeout
        self.shm_prefix = f"dgate{os.getpid()}x{secrets.token_hex(4)}_"
        self.process: subprocess.Popen | None = None
        self.stubs: list[Stub] = []  # the stubs seen when the server became ready
        self.status: int | None = None  # how the last process ended (Popen-style), once it has

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _backend_dir(self) -> Path:
        """The backend folder to give the server: the shipped one, or (pytriton) a private copy of its
        Python backend with the stub for the environment's Python put in."""
        inst = self.install
        if inst.stub is None:
            return inst.backends
        folder = self._work / "backends" / "python"
        if not folder.is_dir():
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

    def start(self, timeout: float = 180.0, should_stop: Callable[[], bool] | None = None) -> TritonServer:
        if not self.repo.is_dir():
            raise UserError(f"{self.repo} is not a model repository folder.",
                            "Write one with `dgate-export triton BUNDLE -o REPO`.")
        cmd = [str(self.install.binary), f"--model-repository={self.repo}",
               f"--backend-directory={self._backend_dir()}",
               "--http-address=127.0.0.1", f"--http-port={self.http_port}",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
               "--allow-metrics=true", "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               "--model-control-mode=explicit", "--load-model=*",
               "--exit-on-error=true", "--strict-readiness=true", "--disable-auto-complete-config",
               f"--exit-timeout-secs={self.exit_timeout}", f"--log-verbose={self.verbose}"]
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the server's lifetime)
        try:
            # Its own session: Ctrl-C in a terminal reaches us, and we stop the server in order.
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                            start_new_session=True)
        finally:
            log.close()
        self.status = None
        self.wait_ready(timeout, should_stop)
        return self

    def exited(self) -> int | None:
        """The server process's status once it has ended (Popen-style), without reaping it: while it is
        not reaped, its pid (and so its process group's id) cannot be reused, so ending the group stays safe."""
        if self.process is None:
            return self.status
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere
            return self.process.returncode if self.process.returncode is not None else -1
        if info is None:
            return None
        return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status

    def wait_ready(self, timeout: float, should_stop: Callable[[], bool] | None = None) -> None:
        """Until the server answers ready on its own port; UserError (with the log's end, verbatim) if it
        ends or is not ready in `timeout` s; returns early when `should_stop()` says so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.exited()
            if status is not None:
                self.kill()
                tail = self.log_tail()
                hint = "Fix what the log says"
                if "failed to load" in tail:
                    hint += " (a model that failed to load is named there)"
                elif "already in use" in tail.lower() or "failed to start" in tail.lower():
                    hint += f" (a port it listens on, {self.http_port} or {self.grpc_port}, may be taken)"
                raise UserError(f"tritonserver {describe_exit(status)} before it was ready. Its log "
                                f"({self.log_path}) ends:", hint + ".", detail=tail)
            if should_stop is not None and should_stop():
                return
            if self.ready():
                self.stubs = stubs_of(self.process.pid) if self.process else []
                return
            time.sleep(0.2)
        tail = self.log_tail()
        self.kill()
        raise UserError(f"tritonserver was not ready after {timeout:.0f} s. Its log ({self.log_path}) ends:",
                        detail=tail)

    def ready(self) -> bool:
        """Ready on /v2/health/ready, answered by this server (not another process on the port)."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                if r.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
        return self.process is not None and owns_port(self.process.pid, self.http_port) is not False

    def dead_stubs(self) -> list[tuple[Stub, str]]:
        """The stubs seen at start that have died since, with how they ended."""
        if self.process is None:
            return []
        return [(stub, how) for stub in self.stubs if (how := stub_death(stub, self.process.pid)) is not None]

    def statistics(self, model: str) -> dict:
        """The server's statistics of `model` (KServe v2 extension: /v2/models/NAME/stats)."""
        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/stats", timeout=10) as r:
            return dict(json.loads(r.read()))

    def metrics(self, timeout: float = 5.0) -> str:
        """The server's Prometheus metrics text."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as r:
            return str(r.read().decode("utf-8", "replace"))

    def model_states(self) -> dict[str, str]:
        """Model name -> state (READY, UNLOADING, UNAVAILABLE, ...) from the repository index."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            return {m["name"]: m.get("state", "") for m in json.loads(r.read())}

    def unload(self, model: str) -> None:
        """Ask the server to unload `model`: new requests for it are refused at once, those in flight (queued
        or running) finish first (explicit model control)."""
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/unload", data=b"{}",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def shm_regions(self) -> list[Path]:
        """This server's shared-memory regions (its prefix's), left behind or in use."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Triton unloads its models, which ends their stubs), then `kill` for whatever is left
        after `timeout` s. Returns the server's status (Popen-style; None if there was no server)."""
        if self.process is not None and self.exited() is None:
            self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.exited() is None and time.monotonic() < deadline:
                time.sleep(0.1)
        return self.kill()

    def kill(self) -> int | None:
        """SIGKILL to the server's process group (the server and the stubs it started, nothing else), reap
        it, remove its shared-memory regions. Returns the server's status (None if there was no server)."""
        proc = self.process
        if proc is not None:
            if proc.returncode is None:  # not reaped yet, so the group id is still ours
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self.status = _wait(proc)
            _wait_group_gone(proc.pid)
        self.process = None
        for region in self.shm_regions():
            region.unlink(missing_ok=True)
        return self.status

    def close(self, stop: bool = True) -> None:
        """Stop the server (`stop`; already stopped: `stop=False`) and remove its private folder (the
        backend copy; the log too when it lives there)."""
        if stop:
            self.stop()
        shutil.rmtree(self._work / "backends", ignore_errors=True)
        if self._work.is_dir() and (self.log_path.parent == self._work or not any(self._work.iterdir())):
            shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> TritonServer:  # noqa: PYI034
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:  # a process in uninterruptible sleep: SIGKILL lands when it wakes
        return proc.wait()


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Wait until no process of group `pgid` is left (stubs end soon after SIGKILL; init reaps them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def mean_batch_size(stats: dict) -> float:
    """Rows per execution of one model from its statistics: inference_count / execution_count."""
    model = stats["model_stats"][0]
    executions = int(model.get("execution_count", 0))
    return int(model.get("inference_count", 0)) / executions if executions else 0.0

