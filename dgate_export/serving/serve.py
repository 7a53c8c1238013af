"""`dgate-export serve`: a bundle served by a local Triton Inference Server on 127.0.0.1, supervised.

`serve_bundle` writes the model repository (`repository.write_repository`; into a temporary folder
unless `repo` is given), refuses ports in use, starts `tritonserver` (`server.TritonServer`) and
supervises it until SIGINT / SIGTERM (docs/serving.md, "Operating the server"):

- **Health.** Every `probe_interval` s an inference through the gate model (one all-zero sample with
  thresholds that send it through every segment; not counted in the metrics) must answer exit K; the
  stubs seen at start must stay alive; tritonserver must keep running. On a failure the whole server
  is killed at once (its ports close: readiness is false), its shared memory removed, and it is
  started again; a log line says why. More than `max_restarts` restarts within RESTART_WINDOW s, or a
  restart that fails, ends `serve` with a UserError naming the cause, the log file (kept) and its
  last lines verbatim.
- **Drain.** SIGINT / SIGTERM unloads the entry models (the gate models and the baseline): Triton
  refuses their new requests at once, readiness is false, and the requests in flight (running or
  queued) finish. Then the server is stopped. Requests still in flight after `drain_timeout` s are
  cut and counted; the exit status says whether anything was cut (0 clean, 1 cut). A second signal
  stops at once.
- **Metrics.** `metrics_address:metrics_port` serves Triton's Prometheus metrics (the gate model's own
  counters among them) plus serve's: readiness, restarts, probe failures and the drift signal
  (`drift.exit_mix_test` on every `drift_window` served samples against the calibration's exit mix).
- Every exit path kills what is left of the server's process group and removes its shared-memory
  regions (its own prefix only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import INPUT, exit_at
from ..drift import (
    DEFAULT_ALPHA,
    DriftTest,
    Reference,
    exit_mix_test,
    parse_metrics,
    reference_of,
    served_exit_counts,
)
from ..errors import UserError
from ..manifest import Manifest, load_manifest
from ..outputs import REPOSITORY, check_output
from .repository import PROBE_PARAMETER, RepositoryInfo, write_repository
from .server import ServerInstall, TritonServer, check_port, describe_exit, find_server, free_port

RESTART_WINDOW = 600.0  # seconds over which max_restarts counts
START_TIMEOUT = 300.0
STOP_GRACE = 5.0  # after a drain: Triton's own stop, then SIGKILL for what is left (nothing is in flight)
DRIFT_EVERY = 2.0  # seconds between two reads of the served exit counts


@dataclass
class Settings:
    drain_timeout: float = 30.0
    probe_interval: float = 2.0
    probe_timeout: float = 30.0
    max_restarts: int = 3
    drift_window: int = 5000
    drift_alpha: float = DEFAULT_ALPHA


def serve_bundle(bundle: str | Path, *, port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 metrics_address: str = "127.0.0.1", repo: str | Path | None = None, platform: str = "auto",
                 repository_options: Mapping[str, Any] | None = None, triton_env: str | Path | None = None,
                 log_file: str | Path | None = None, settings: Settings | None = None,
                 echo: Callable[[str], Any] = print) -> int:
    """Serve `bundle` until SIGINT / SIGTERM; the exit status: 0 after a clean stop, 1 when the drain cut
    requests. A server that fails and cannot be recovered is a UserError. `repository_options` go to
    write_repository (instances, segment_instances, max_queue_delay_us, kind, threads, name, unbatched,
    gate_batching)."""
    settings = settings or Settings()
    _check(settings, port, grpc_port, metrics_port)
    if repo is not None:  # serve writes a fresh repository there, never over an existing folder
        check_output(repo, flag="--repo", folder=REPOSITORY, reads=(bundle,))
    if log_file is not None and not Path(log_file).parent.is_dir():
        raise UserError(f"--log-file {log_file}: the folder {Path(log_file).parent} does not exist.", "Create it first.")
    install = find_server(triton_env)  # first: no repository is written for a server that is not there
    manifest = load_manifest(bundle)
    if platform == "auto":
        native = "tensorrt" if manifest.backend == "tensorrt" else "onnxruntime"
        platform = native if native in install.available else "python"
    if platform != "python" and platform not in install.available:
        raise UserError(f"This Triton server has no {platform} backend (it has: "
                        f"{', '.join(sorted(install.available)) or 'none'}).", "Use --platform python.")
    for p, flag, address in ((port, "--port", "127.0.0.1"), (grpc_port, "--grpc-port", "127.0.0.1"),
                             (metrics_port, "--metrics-port", metrics_address)):
        check_port(p, flag, address)
    work = None
    if repo is None:
        work = Path(tempfile.mkdtemp(prefix="dgate-serve-"))
        repo = work / "repo"
    log = Path(log_file) if log_file else Path(tempfile.gettempdir()) / f"dgate-serve-{os.getpid()}.log"
    supervisor = None
    status = 2
    try:
        info = write_repository(bundle, repo, platform=platform, force=work is not None,
                                **dict(repository_options or {}))
        supervisor = Supervisor(manifest, info, install, log, settings, echo, ports=(port, grpc_port),
                                metrics=(metrics_address, metrics_port))
        status = supervisor.run()
    finally:
        if supervisor is not None:
            supervisor.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if status == 0 and log_file is None and not (supervisor is not None and supervisor.restarts_total):
            log.unlink(missing_ok=True)  # a clean run: the default log goes; a failure or a restart keeps it
    return status


def _check(settings: Settings, port: int, grpc_port: int, metrics_port: int) -> None:
    if len({port, grpc_port, metrics_port}) < 3:
        raise UserError(f"--port {port}, --grpc-port {grpc_port} and --metrics-port {metrics_port} must differ.")
    for name, value in (("--drain-timeout", settings.drain_timeout), ("--probe-interval", settings.probe_interval),
                        ("--probe-timeout", settings.probe_timeout)):
        if not value > 0:
            raise UserError(f"{name} must be positive, got {value}.")
    if settings.max_restarts < 0 or settings.drift_window < 0:
        raise UserError("--max-restarts and --drift-window must be >= 0.")
    if not 0.0 < settings.drift_alpha < 1.0:
        raise UserError(f"--drift-alpha {settings.drift_alpha} is not a probability in (0, 1).")


# ------------------------------------------------------------------------------------------ the probe


class Probe:
    """One health inference through the gate model: a zero sample sent through every segment (thresholds
    above 1 at every gate) must come back from the last exit with finite logits."""

    def __init__(self, manifest: Manifest, model: str):
        c, h, w = (int(d) for d in manifest.input.shape[1:])
        half = manifest.input.dtype == "float16"
        x = np.zeros((1, c, h, w), np.float16 if half else np.float32)
        self.num_gates = manifest.num_gates
        header = json.dumps({
            "inputs": [{"name": INPUT, "shape": [1, c, h, w], "datatype": "FP16" if half else "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in ("exits", "logits")],
            "parameters": {"thresholds": ",".join(str(t) for t in exit_at(self.num_gates, self.num_gates)),
                           PROBE_PARAMETER: True}}).encode()
        self.body = header + x.tobytes()
        self.headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
        self.model = model

    def __call__(self, http_url: str, timeout: float) -> str | None:
        """None when the answer is right, else what went wrong."""
        request = urllib.request.Request(f"http://{http_url}/v2/models/{self.model}/infer", data=self.body,
                                         headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                outputs = {o["name"]: o["data"] for o in json.loads(r.read())["outputs"]}
        except urllib.error.HTTPError as err:
            try:
                message = json.loads(err.read()).get("error", "")
            except (ValueError, OSError):
                message = ""
            return f"HTTP {err.code} {message}".strip()
        except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
            return f"no answer ({err})"
        exits, logits = outputs.get("exits"), outputs.get("logits")
        if exits != [self.num_gates] or not logits or not all(np.isfinite(logits)):
            return f"a wrong answer (exits {exits}, logits {logits})"
        return None


@dataclass
class _ProbeRun:
    started: float
    done: threading.Event = field(default_factory=threading.Event)
    failure: str | None = None


# --------------------------------------------------------------------------------------- the drift watch


class DriftWatch:
    """The served exit mix (the gate model's counters, thresholds="bundle") in windows of `window`
    samples, each tested against the calibration's (drift.exit_mix_test)."""

    def __init__(self, reference: Reference, model: str, window: int, alpha: float, echo: Callable[[str], Any]):
        self.reference, self.model, self.window, self.alpha, self.echo = reference, model, window, alpha, echo
        n = len(reference.counts)
        self.last = np.zeros(n, np.int64)  # the server's cumulative counts at the last read
        self.counts = np.zeros(n, np.int64)  # the current window's
        self.windows = 0
        self.alarms = 0
        self.test: DriftTest | None = None  # the last complete window's

    def restarted(self) -> None:
        self.last[:] = 0  # a new server's counters start again from zero

    def update(self, cumulative: np.ndarray) -> None:
        delta = cumulative - self.last
        if (delta < 0).any():  # counters went back: a server we did not see restart
            delta = cumulative
        self.last = cumulative.copy()
        self.counts += delta
        if self.counts.sum() >= self.window:
            test = exit_mix_test(self.reference.counts, self.counts, self.alpha)
            was = self.test is not None and self.test.alarm
            self.test, self.windows = test, self.windows + 1
            self.alarms += test.alarm
            if test.alarm or was:
                fmt = " ".join(f"{f:.3f}" for f in test.fractions(self.counts))
                ref = " ".join(f"{f:.3f}" for f in self.reference.fractions)
                self.echo(f"drift: window {self.windows}: {test.sentence()}; exit fractions {fmt} (calibration {ref})")
            self.counts = np.zeros_like(self.counts)

    def lines(self) -> list[str]:
        m = f'model="{self.model}"'
        out = [_metric("dgate_drift_windows_total", "counter", "Windows of served samples tested", f"{{{m}}} {self.windows}"),
               _metric("dgate_drift_alarms_total", "counter", "Windows whose exit mix differed from the calibration's",
                       f"{{{m}}} {self.alarms}"),
               _metric("dgate_drift_window_samples", "gauge", "Samples counted in the current window",
                       f"{{{m}}} {int(self.counts.sum())}")]
        if self.test is not None:
            fractions = self.test.fractions(self.test.observed)
            out += [_metric("dgate_drift_alarm", "gauge", "1 if the last complete window raised the drift alarm",
                            f"{{{m}}} {int(self.test.alarm)}"),
                    _metric("dgate_drift_p_value", "gauge", "p-value of the last window's chi-square test",
                            f"{{{m}}} {self.test.p_value:.6g}"),
                    _metric("dgate_drift_exit_fraction", "gauge", "Exit fractions of the last complete window",
                            *(f'{{{m},exit="{k}"}} {f:.6g}' for k, f in enumerate(fractions)))]
        out.append(_metric("dgate_drift_reference_exit_fraction", "gauge", "Exit fractions on the calibration rows",
                           *(f'{{{m},exit="{k}"}} {f:.6g}' for k, f in enumerate(self.reference.fractions))))
        return out


def _requests(n: int) -> str:
    return f"{n} request" if n == 1 else f"{n} requests"


def _metric(name: str, kind: str, help_text: str, *samples: str) -> str:
    return "\n".join([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *(f"{name}{s}" for s in samples)])


# ------------------------------------------------------------------------------------------ supervisor


class Supervisor:
    """Runs one TritonServer at a time for a written repository: start, watch, recover, drain, stop."""

    def __init__(self, manifest: Manifest, info: RepositoryInfo, install: ServerInstall, log: Path,
                 settings: Settings, echo: Callable[[str], Any], *, ports: tuple[int, int],
                 metrics: tuple[str, int]):
        self.manifest, self.info, self.install, self.log, self.settings, self.echo = (
            manifest, info, install, log, settings, echo)
        self.ports = ports
        self.internal_metrics_port = free_port()  # Triton's own; serve's endpoint adds its lines to it
        self.server: TritonServer | None = None
        self.stop_requests = 0
        self.signal_name = ""
        self.restarts: deque[float] = deque()
        self.restarts_total = 0
        self.probe_failures = 0
        self.healthy = False
        self.probe = Probe(manifest, info.name)
        self.drift_off = ""
        self.entries = [m for m in (info.name, f"{info.name}_unbatched", f"{info.name}_baseline") if m in info.models]
        self.drift = self._drift_watch()
        self.endpoint = MetricsEndpoint(*metrics, self)
        self._old_handlers: dict[int, Any] = {}

    def _drift_watch(self) -> DriftWatch | None:
        if not self.settings.drift_window:
            return None
        try:
            reference = reference_of(self.manifest)
        except UserError as err:
            self.drift_off = err.message
            return None
        return DriftWatch(reference, self.info.name, self.settings.drift_window, self.settings.drift_alpha, self.echo)

    # ------------------------------------------------------------------------------------- lifecycle

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_requests += 1
        self.signal_name = signal.Signals(signum).name

    def _start(self) -> TritonServer:
        server = TritonServer(self.info.path, http_port=self.ports[0], grpc_port=self.ports[1],
                              metrics_port=self.internal_metrics_port, install=self.install, log=self.log,
                              check_ports=False)
        self.server = server
        server.start(START_TIMEOUT, should_stop=lambda: self.stop_requests > 0)
        if self.drift is not None:
            self.drift.restarted()
        self.healthy = server.ready()
        return server

    def run(self) -> int:
        # SIGINT and SIGTERM (docker stop, systemd) both drain, whatever disposition this process inherited.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self.echo(f"starting tritonserver ({self.install.binary}) for {self.info.path} ...")
        self.echo(f"server log: {self.log}")
        self.endpoint.start()
        self._start()
        if self.stop_requests:
            return self.drain()
        self._announce()
        probe: _ProbeRun | None = None
        next_probe = time.monotonic() + self.settings.probe_interval
        next_drift = time.monotonic() + DRIFT_EVERY
        while True:
            if self.stop_requests:
                return self.drain()
            cause, probe = self._health(probe)
            if cause is None and probe is None and time.monotonic() >= next_probe:
                probe = self._probe()
                next_probe = time.monotonic() + self.settings.probe_interval
            if cause is not None:
                probe = None
                self._recover(cause)
                next_probe = time.monotonic() + self.settings.probe_interval
                continue
            if self.drift is not None and time.monotonic() >= next_drift:
                self._read_drift()
                next_drift = time.monotonic() + DRIFT_EVERY
            time.sleep(0.1)

    def _announce(self) -> None:
        c, h, w = (int(d) for d in self.manifest.input.shape[1:])
        server = self.server
        assert server is not None
        addr, port = self.endpoint.address
        self.echo(f"ready: HTTP http://{server.http_url}  gRPC {server.grpc_url}  metrics http://{addr}:{port}/metrics"
                  f"  models: {', '.join(self.info.models)}")
        if self.drift is not None:
            self.echo(f"drift: every {self.settings.drift_window} samples served with the bundle's thresholds, the "
                      f"exit mix is tested against the calibration's ({self.drift.reference.rows} rows; chi-square, "
                      f"alpha {self.settings.drift_alpha:g})")
        elif self.drift_off:
            self.echo(f"drift: off ({self.drift_off})")
        self.echo("example (tritonclient):\n"
                  "  import numpy as np, tritonclient.http as httpclient\n"
                  f"  client = httpclient.InferenceServerClient('{server.http_url}')\n"
                  f"  x = np.zeros((4, {c}, {h}, {w}), np.float32)\n"
                  f"  inp = httpclient.InferInput('input', x.shape, 'FP32'); inp.set_data_from_numpy(x)\n"
                  f"  res = client.infer('{self.info.name}', [inp])   # parameters={{'thresholds': '...'}} per request\n"
                  "  res.as_numpy('predictions'), res.as_numpy('exits')\n"
                  "Ctrl-C or SIGTERM drains and stops the server.")

    # ------------------------------------------------------------------------------------------ health

    def _probe(self) -> _ProbeRun:
        run = _ProbeRun(time.monotonic())
        server = self.server
        assert server is not None
        url, timeout = server.http_url, self.settings.probe_timeout

        def go() -> None:
            run.failure = self.probe(url, timeout + 1.0)
            run.done.set()

        threading.Thread(target=go, daemon=True).start()
        return run

    def _health(self, probe: _ProbeRun | None) -> tuple[str | None, _ProbeRun | None]:
        """(what is wrong or None, the probe still running or None)."""
        server = self.server
        if server is None:
            return "no server is running", None
        status = server.exited()
        if status is not None:
            return f"tritonserver {describe_exit(status)}", None
        dead = server.dead_stubs()
        if dead:
            return "; ".join(f"the Python backend process of model {s.model} (pid {s.pid}) {how}" for s, how in dead), None
        if probe is not None and probe.done.is_set():
            if probe.failure is not None:
                self.probe_failures += 1
                return f"the health probe through {self.info.name} failed: {probe.failure}", None
            self.healthy = True
            return None, None
        if probe is not None and time.monotonic() - probe.started > self.settings.probe_timeout:
            self.probe_failures += 1
            return f"the health probe through {self.info.name} got no answer in {self.settings.probe_timeout:.0f} s", None
        return None, probe

    def _recover(self, cause: str) -> None:
        """Kill the broken server at once (its ports close: readiness false), then start a new one; a
        UserError when the restarts within RESTART_WINDOW are used up or a restart cannot be made."""
        while True:
            self.healthy = False
            server = self.server
            assert server is not None
            server.kill()
            server.close(stop=False)
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
                self.restarts.popleft()
            if len(self.restarts) >= self.settings.max_restarts:
                raise UserError(f"tritonserver could not be kept healthy: {cause}. It was restarted "
                                f"{len(self.restarts)} times in the last {RESTART_WINDOW / 60:.0f} minutes "
                                f"(--max-restarts {self.settings.max_restarts}); serve stops. The server log "
                                f"is kept at {self.log}; its last lines:", detail=server.log_tail())
            self.restarts.append(now)
            self.restarts_total += 1
            self.echo(f"unhealthy: {cause}. The server was stopped (readiness is false) and its shared memory "
                      f"removed; restarting it ({len(self.restarts)} of at most {self.settings.max_restarts} restarts "
                      f"in {RESTART_WINDOW / 60:.0f} minutes; log: {self.log}).")
            started = time.monotonic()
            try:
                self._start()
            except UserError as err:
                cause = f"the restart failed: {err.message}"
                continue
            if not self.stop_requests:
                self.echo(f"ready again after {time.monotonic() - started:.1f} s")
            return

    def _read_drift(self) -> None:
        server, drift = self.server, self.drift
        if server is None or drift is None:
            return
        try:
            counts = served_exit_counts(server.metrics(timeout=2.0), self.info.name, len(drift.reference.counts))
        except (UserError, urllib.error.URLError, OSError):
            return  # no metrics right now (a restart, a slow scrape): the next read catches up
        drift.update(counts)

    # ------------------------------------------------------------------------------------------- drain

    def in_flight(self) -> tuple[int, int] | None:
        """(requests the gate models are running, requests queued for the entry models), from the metrics."""
        server = self.server
        if server is None:
            return None
        try:
            text = server.metrics(timeout=2.0)
        except (urllib.error.URLError, OSError):
            return None
        running = sum(v for labels, v in parse_metrics(text, "dgate_requests_in_flight")
                      if labels.get("model") in self.entries)
        queued = sum(v for labels, v in parse_metrics(text, "nv_inference_pending_request_count")
                     if labels.get("model") in self.entries)
        return int(running), int(queued)

    def drain(self) -> int:
        self.healthy = False
        server = self.server
        timeout = self.settings.drain_timeout
        if server is None or server.exited() is not None or not server.ready():
            self.echo(f"{self.signal_name}: stopping (the server was not serving)")
            self._stop()
            self.echo("stopped")
            return 0
        count = self.stop_requests
        before = self.in_flight()
        busy = f"the {_requests(sum(before))} in flight" if before is not None else "the requests in flight"
        self.echo(f"{self.signal_name}: draining. Readiness is false and new requests are refused; waiting up to "
                  f"{timeout:g} s for {busy} (a second signal stops at once).")
        started = time.monotonic()
        drained, died = False, None
        try:
            for model in self.entries:
                server.unload(model)
            while time.monotonic() - started < timeout and self.stop_requests == count:
                status = server.exited()
                if status is not None:
                    died = status
                    break
                states = server.model_states()
                if all(states.get(m) == "UNAVAILABLE" for m in self.entries):
                    drained = True
                    break
                time.sleep(0.05)
        except (urllib.error.URLError, OSError) as err:
            died = server.exited()
            if died is None:
                self.echo(f"the server stopped answering during the drain ({err})")
        seconds = time.monotonic() - started
        left = None if drained or died is not None else self.in_flight()
        self._stop()
        if died is not None:
            raise UserError(f"tritonserver {describe_exit(died)} during the drain; requests in flight were lost. "
                            f"The server log is kept at {self.log}; its last lines:", detail=server.log_tail())
        if drained:
            kept = f"; {self.restarts_total} restart(s), server log kept: {self.log}" if self.restarts_total else ""
            self.echo(f"stopped: drained in {seconds:.1f} s, every request in flight was answered{kept}")
            return 0
        why = "a second signal" if self.stop_requests != count else f"the drain timeout ({timeout:g} s)"
        counted = f" (the metrics counted {left[0]} running, {left[1]} queued)" if left is not None else ""
        self.echo(f"stopped after {why}, before the models had finished unloading: the requests still in flight "
                  f"were cut{counted}; their clients got an error, never a wrong answer. Server log: {self.log}")
        return 1

    def _stop(self) -> None:
        server = self.server
        if server is not None:
            server.stop(STOP_GRACE)  # Triton's own stop first; nothing is in flight any more

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.close(stop=False)
            self.server = None
        self.endpoint.close()
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)

    # ----------------------------------------------------------------------------------------- metrics

    def metric_lines(self) -> list[str]:
        lines = [_metric("dgate_serve_ready", "gauge", "1 while serve sees the server healthy, 0 while it starts, "
                         "restarts or drains", f" {int(self.healthy and not self.stop_requests)}"),
                 _metric("dgate_serve_restarts_total", "counter", "Restarts after a failure", f" {self.restarts_total}"),
                 _metric("dgate_serve_probe_failures_total", "counter", "Health probes that failed",
                         f" {self.probe_failures}")]
        if self.drift is not None:
            lines += self.drift.lines()
        return lines


class MetricsEndpoint:
    """serve's metrics endpoint: Triton's Prometheus text (when a server is up) plus the supervisor's lines."""

    def __init__(self, address: str, port: int, supervisor: Supervisor):
        owner = supervisor

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                text = ""
                server = owner.server
                if server is not None:
                    try:
                        text = server.metrics(timeout=5.0)
                    except (urllib.error.URLError, OSError):
                        text = ""
                body = (text.rstrip("\n") + "\n" + "\n".join(owner.metric_lines()) + "\n").lstrip("\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # no access log on the terminal
                pass

        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        self.address = (address, port)
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
