"""Type-check the TensorRT backend against TensorRT's API with mypy, on machines where TensorRT cannot run.

    .venv/bin/python scripts/typecheck_tensorrt.py      # exit status 0: clean

A developer tool (it needs mypy and tensorrt-stubs, the dev extra), kept out of the installed package.

Plain `mypy dgate_export/backends/tensorrt` does not check TensorRT calls: the `tensorrt-stubs`
package (10.13) installs its .pyi files as `tensorrt/` and `tensorrt_bindings/` without a py.typed
marker, so mypy skips them and (with ignore_missing_imports) treats tensorrt as Any. Five of its
signatures are also not valid Python (a parameter named `in`, a required parameter after defaults).

So this script copies the installed stubs into .mypy_cache/dgate-tensorrt-stubs/, repairs those
signatures, points MYPYPATH at the copy and runs mypy on the backend's package. It first checks a probe that
calls an API TensorRT 10 removed (`Builder.build_engine`): if mypy accepted it, the stubs would not be
in effect and a clean result would mean nothing, so that counts as a failure.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "dgate_export" / "backends" / "tensorrt"
STUB_DIR = REPO_ROOT / ".mypy_cache" / "dgate-tensorrt-stubs"

_PROBE = """\
import tensorrt as trt

def probe(logger: trt.ILogger) -> None:
    builder = trt.Builder(logger)
    builder.build_engine(builder.create_network(0), builder.create_builder_config())
"""


def _repair(text: str) -> str:
    # `in` is a keyword: rename the plugin methods' parameter.
    text = re.sub(r"([(,]\s*)in(\s*:)", r"\1in_\2", text)
    # A required parameter after defaulted ones (add_scale_nd's channel_axis): give it a default.
    fixed = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("def ") and "=" in line:
            line = re.sub(r"(= [^,()]+, )(\w+: [\w\[\], .]+?)(\) ->)", r"\1\2 = ...\3", line)
        fixed.append(line)
    return "".join(fixed)


def prepare_stubs(target: Path = STUB_DIR) -> Path:
    """Copy and repair the installed tensorrt-stubs into `target`; return it."""
    try:
        files = metadata.files("tensorrt-stubs") or []
    except metadata.PackageNotFoundError as err:
        raise SystemExit("tensorrt-stubs is not installed: pip install tensorrt-stubs (see pyproject dev extra)") from err
    stubs = [f for f in files if str(f).endswith(".pyi")]
    if not stubs:
        raise SystemExit("tensorrt-stubs has no .pyi files: its layout changed; update scripts/typecheck_tensorrt.py")
    for rel in stubs:
        text = _repair(Path(str(rel.locate())).read_text(encoding="utf-8"))
        compile(text, str(rel), "exec")  # still invalid: the stubs changed; fail loudly here
        out = target / str(rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not out.is_file() or out.read_text(encoding="utf-8") != text:
            out.write_text(text, encoding="utf-8")
    return target


def _mypy(args: list[str], stubs: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO_ROOT / "pyproject.toml"),
                           *args], check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True)


def typecheck(paths: list[str] | None = None) -> tuple[int, str]:
    """(exit status, mypy's report) for `paths` (default: the TensorRT backend's package)."""
    stubs = prepare_stubs()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "trt_probe.py"
        probe.write_text(_PROBE, encoding="utf-8")
        seen = _mypy([str(probe)], stubs)
    if "build_engine" not in seen.stdout:
        return 2, ("mypy accepted a call to Builder.build_engine (removed in TensorRT 10): the TensorRT stubs "
                   "are not in effect, so a clean run would prove nothing.\n" + seen.stdout + seen.stderr)
    result = _mypy(paths or [str(PACKAGE_DIR.relative_to(REPO_ROOT))], stubs)
    return result.returncode, result.stdout + result.stderr


def main() -> int:
    status, report = typecheck(sys.argv[1:] or None)
    print(report, end="")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
