"""The fault suite of `dgate-export serve`: a real tritonserver under load, broken on purpose.

Every scenario runs `serve` on the tiny bundle (127.0.0.1 only) with a closed-loop load
(tests/triton_load.py, 8 threads, every answer compared with GatedRuntime.run's) and checks: no
request answered wrongly, readiness false while broken, recovery or a non-zero exit with the cause,
and no shared-memory region of the server left behind. The processes ended are only the ones the
test started: `serve` (its own session) and the tritonserver it started (that server's own process
group, found as serve's child). Bounded: every wait has a deadline; the four tests took 1.5 minutes here
(load average 7-10 on the shared 2-core machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from serve_process import ROOT, Serve, end, readiness, regions, start_serve, stub_of
from tiny_bundle import SHAPE, make_tiny_bundle

from dgate_export.errors import UserError
from dgate_export.runtime import GatedRuntime
from dgate_export.serving import find_server
from dgate_export.serving.server import free_port

LOAD = Path(__file__).resolve().parent / "triton_load.py"
NORM = {"scale": 1 / 255, "mean": [0.5], "std": [0.25]}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    try:
        install = find_server()
    except UserError as err:
        pytest.skip(f"no Triton server installed here: {err}")
    root = tmp_path_factory.mktemp("faults")
    bundle, _ = make_tiny_bundle(root / "tiny", max_batch=16, normalization=NORM)
    rt = GatedRuntime.load(bundle)
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(24):  # 1-6 rows each, exits of every kind
        x = rng.standard_normal((int(rng.integers(1, 7)), *SHAPE)).astype(np.float32)
        res = rt.run(x)
        cases.update({f"x_{i}": x, f"exits_{i}": res.exits, f"predictions_{i}": res.predictions,
                      f"logits_{i}": res.logits})
    rt.close()
    np.savez(root / "cases.npz", **cases)
    return bundle, root, str(install.python or sys.executable)


@dataclass
class Load:
    proc: subprocess.Popen
    stop: Path
    out: Path

    def finish(self) -> dict:
        self.stop.touch()
        self.proc.wait(120)
        return json.loads(self.out.read_text())


def start_load(setup, serve: Serve, tmp_path: Path, name: str, seconds: float = 150) -> Load:
    _, root, python = setup
    job = {"url": f"127.0.0.1:{serve.http}", "model": "tiny", "threads": 8, "seconds": seconds,
           "stop": str(tmp_path / f"{name}.stop"), "cases": str(root / "cases.npz"),
           "out": str(tmp_path / f"{name}.json")}
    (tmp_path / f"{name}.job").write_text(json.dumps(job))
    proc = subprocess.Popen([python, str(LOAD), str(tmp_path / f"{name}.job")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    return Load(proc, tmp_path / f"{name}.stop", tmp_path / f"{name}.json")


def interrupt(serve: Serve, load: Load) -> tuple[float, dict]:
    """SIGINT to serve under load; (when it was sent, the load's report once serve has ended)."""
    sent = time.time()
    serve.proc.send_signal(signal.SIGINT)
    serve.proc.wait(120)
    return sent, load.finish()


def test_kills_under_load_are_recovered_and_sigint_drains(setup, tmp_path):
    """kill -9 of a segment's stub, of the gate model's stub and of tritonserver, under load, then SIGINT:
    each failure makes readiness false and is recovered, the old server's shared memory goes, no
    answer is ever wrong, and the drain answers every request in flight before serve exits 0."""
    serve = start_serve(setup[0], tmp_path)
    try:
        serve.wait_line("ready:", timeout=180)
        load = start_load(setup, serve, tmp_path, "kills")
        time.sleep(3)
        for what in ("tiny_seg1", "tiny", "tritonserver"):
            server = serve.server_pid()
            assert server is not None
            _, prefix = stub_of(server, "tiny_seg0")
            assert regions(prefix), "the server's regions carry its own prefix"
            victim = server if what == "tritonserver" else stub_of(server, what)[0]
            killed = time.time()
            os.kill(victim, signal.SIGKILL)
            seen = serve.wait_line("unhealthy:", after=killed, timeout=60)
            back = serve.wait_line("ready again", after=killed, timeout=120)
            line = next(text for t, text in serve.lines if t == seen)
            cause = ("tritonserver was killed by signal 9 (SIGKILL)" if what == "tritonserver" else
                     f"model {what} (pid {victim}) was killed by signal 9 (SIGKILL)")
            assert cause in line, line
            assert any(killed < t < back and status != 200 for t, status in serve.ready), \
                f"readiness stayed true after {what} died"
            assert regions(prefix) == [], f"the killed server's shared memory is left: {regions(prefix)}"
            assert readiness(serve.http) == 200
            time.sleep(2)  # the load runs on the new server
        sigint, report = interrupt(serve, load)
    finally:
        left = end(serve)
    text = serve.text()
    assert serve.proc.returncode == 0, text
    assert "draining" in text and "stopped: drained" in text and "3 restart(s), server log kept" in text
    events = report["events"]
    assert not [e for e in events if e[2] == "wrong"], "a request was answered wrongly"
    # between the kills: errors of a server that is gone (refused, cut) or not yet noticed gone (500)
    allowed = ("ok", "refused", "cut", "http:500", "http:404")
    assert all(e[2].startswith(allowed) for e in events), {e[2] for e in events}
    # the drain: a request running when SIGINT came was answered, none was cut
    overlapping = [e for e in events if e[0] < sigint < e[1]]
    assert [e for e in overlapping if e[2] != "ok" and not e[2].startswith("http:404")] == [], overlapping
    assert any(sigint < t and status != 200 for t, status in serve.ready)  # readiness false during the drain
    assert sum(e[2] == "ok" for e in events) > 50
    assert left == []
    assert serve.server_pid() is None
    log = tmp_path / f"dgate-serve-{serve.proc.pid}.log"
    assert log.is_file() and "Started HTTPService" in log.read_text()  # restarts: the log is kept


def test_drain_timeout_cuts_and_says_so(setup, tmp_path):
    """A drain that cannot finish in --drain-timeout cuts what is in flight and exits 1, saying so."""
    serve = start_serve(setup[0], tmp_path, "--drain-timeout", "0.2", "--instances", "1")
    try:
        serve.wait_line("ready:", timeout=180)
        load = start_load(setup, serve, tmp_path, "cut")
        time.sleep(3)
        _, report = interrupt(serve, load)
    finally:
        left = end(serve)
    text = serve.text()
    assert serve.proc.returncode == 1, text
    assert "drain timeout (0.2 s)" in text and "were cut" in text
    assert not [e for e in report["events"] if e[2] == "wrong"]
    assert left == []
    assert (tmp_path / f"dgate-serve-{serve.proc.pid}.log").is_file()  # kept: the stop was not clean


def test_out_of_restarts_exits_2_with_the_cause(setup, tmp_path):
    """--max-restarts 0: the first failure ends serve with status 2, the cause (the signal), the log file
    (kept) and the log's last lines verbatim; nothing is left behind."""
    serve = start_serve(setup[0], tmp_path, "--max-restarts", "0")
    try:
        serve.wait_line("ready:", timeout=180)
        server = serve.server_pid()
        os.kill(stub_of(server, "tiny_seg2")[0], signal.SIGKILL)
        serve.proc.wait(60)
    finally:
        left = end(serve)
    text = serve.text()
    assert serve.proc.returncode == 2, text
    log = tmp_path / f"dgate-serve-{serve.proc.pid}.log"
    assert "model tiny_seg2" in text and "killed by signal 9 (SIGKILL)" in text and str(log) in text
    assert log.is_file()
    tail = log.read_text().splitlines()[-3:]
    assert all(line in text.splitlines() for line in tail if line.strip())  # verbatim, not re-flowed
    assert left == [] and serve.server_pid() is None


def test_a_taken_port_is_refused_before_anything_starts(setup, tmp_path):
    bundle, _, _ = setup
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
        for flag in ("--port", "--grpc-port", "--metrics-port"):
            ports = {"--port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port(), flag: port}
            proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", str(bundle),
                                   *[str(a) for kv in ports.items() for a in kv]],
                                  capture_output=True, text=True, timeout=120, env=env, check=False)
            out = " ".join(proc.stdout.split() + proc.stderr.split())
            assert proc.returncode == 2, out
            assert f"Port {port} on 127.0.0.1 ({flag}) is in use" in out and "ready:" not in out
            assert "Traceback" not in out
    assert list(tmp_path.glob("dgate-*")) == []  # no log, no repository: nothing was started
