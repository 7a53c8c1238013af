"""The package's layout rules, read from every file's imports (one test instead of a check per module).

1. The runtime side (everything outside `dgate_export/compile/`) imports no compile-extra package
   (torch, torchvision, onnx, onnxscript) and nothing from `compile/` at module level: `pip install
   dgate-export` runs it. Only the CLI may import `compile/`, inside its commands. The old import
   paths (`dgate_export.zoo`, `build`, `gated`, `checkpoint`) are the one exception: thin aliases.
2. TensorRT and cuda-python are imported at module level only inside the TensorRT backend's own
   modules (its `__init__` and `common` stay importable without them).
3. Inside `compile/`, torch is imported at the top of files, never defensively inside functions.
4. No import cycle between the package's modules (module- and function-level imports alike; imports
   under `if TYPE_CHECKING:` do not run and do not count).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dgate_export"
COMPILE_EXTRA = {"torch", "torchvision", "onnx", "onnxscript"}
TENSORRT_EXTRA = {"tensorrt", "cuda"}
ALIASES = {"dgate_export.zoo", "dgate_export.build", "dgate_export.gated", "dgate_export.checkpoint"}
# Run inside Triton's Python backend (the server provides triton_python_backend_utils), not imported here.
TRITON_MODELS = {"dgate_export.serving.model_gate", "dgate_export.serving.model_segment"}
TENSORRT_MODULES = "dgate_export.backends.tensorrt."
TENSORRT_LIGHT = {"dgate_export.backends.tensorrt", "dgate_export.backends.tensorrt.common"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module (dotted)
    target: str  # what it imports (dotted; a package's submodule where `from . import x` names one)
    top: bool  # at module level (not inside a function)
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in `path` that runs (TYPE_CHECKING blocks skipped), resolved to dotted names."""
    name = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def resolve(level: int, module: str | None) -> str:
        if level == 0:
            return module or ""
        base = name.split(".") if is_package else name.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(name, a.name, top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = resolve(child.level, child.module)
                for alias in child.names:
                    sub = f"{target}.{alias.name}"
                    # `from . import x`: x is a submodule when a file or package of that name exists
                    as_module = _module_path(sub, root)
                    found.append(Import(name, sub if as_module else target, top, child.lineno))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                visit(child, False)
            else:
                visit(child, top)

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def _module_path(dotted: str, root: Path) -> Path | None:
    if not dotted.startswith(root.name + "."):
        return None
    rel = Path(*dotted.split(".")[1:])
    for candidate in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def violations(root: Path = PACKAGE) -> list[str]:
    """Every breach of the layout rules (module docstring) in the package at `root`."""
    compile_pkg = f"{root.name}.compile"
    problems = []
    edges: dict[str, set[str]] = {}
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    for mod, path in modules.items():
        rel = path.relative_to(root.parent)
        in_compile = mod == compile_pkg or mod.startswith(compile_pkg + ".")
        for imp in imports_of(path, root):
            top_pkg = imp.target.split(".")[0]
            where = f"{rel}:{imp.line}"
            if imp.target.startswith(root.name + "."):
                target = imp.target
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]  # `from .x import name` -> module x
                if mod not in ALIASES:
                    edges.setdefault(mod, set()).add(target)
            if in_compile:
                if top_pkg == "torch" and not imp.top:
                    problems.append(f"{where}: torch imported inside a function in compile/ (import it at the top)")
                continue
            if mod in ALIASES:
                continue
            if top_pkg in COMPILE_EXTRA and imp.top:
                problems.append(f"{where}: {imp.target} imported at module level outside compile/ "
                                "(the plain install has no torch or onnx)")
            if imp.target == compile_pkg or imp.target.startswith(compile_pkg + "."):
                if imp.top:
                    problems.append(f"{where}: {imp.target} imported at module level outside compile/")
                elif mod != f"{root.name}.cli":
                    problems.append(f"{where}: {imp.target} imported by the runtime side (only the CLI may, "
                                    "inside its commands)")
            if top_pkg in TENSORRT_EXTRA and imp.top and (
                    not mod.startswith(TENSORRT_MODULES.replace("dgate_export", root.name)) or mod in TENSORRT_LIGHT):
                problems.append(f"{where}: {imp.target} imported at module level outside the TensorRT backend's "
                                "own modules")
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other (a package importing its
    own submodule and back counts too)."""
    found, state, stack = [], {}, []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            walk(node)
    return found


def test_the_package_keeps_the_layout_rules():
    assert violations() == []


def test_planted_violations_are_caught(tmp_path):
    root = tmp_path / "dgate_export"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert violations(root) == []
    manifest = root / "manifest.py"
    manifest.write_text("import torch\n" + manifest.read_text())
    runtime = root / "runtime.py"
    runtime.write_text(runtime.read_text() + "\n\ndef _planted():\n    from .compile import build\n")
    build = root / "compile" / "build.py"
    build.write_text(build.read_text() + "\n\ndef _planted():\n    import torch\n")
    quantize = root / "compile" / "quantize.py"
    quantize.write_text(quantize.read_text() + "\n\ndef _planted():\n    from .build import build_bundle\n")
    found = "\n".join(violations(root))
    assert "dgate_export/manifest.py:1: torch imported at module level outside compile/" in found
    assert "dgate_export/runtime.py" in found and "only the CLI may" in found
    assert "dgate_export/compile/build.py" in found and "inside a function in compile/" in found
    assert "import cycle:" in found and "dgate_export.compile.quantize" in found


def test_the_runtime_side_imports_without_the_extras():
    """Every runtime-side module imports with torch, onnx, matplotlib, TensorRT and Ray made unimportable."""
    runtime_side = sorted(
        module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py")
        if "compile" not in p.relative_to(PACKAGE).parts
        and module_name(p, PACKAGE) not in ALIASES | TRITON_MODELS
        and not (module_name(p, PACKAGE).startswith(TENSORRT_MODULES)
                 and module_name(p, PACKAGE) not in TENSORRT_LIGHT))
    blocked = sorted(COMPILE_EXTRA | TENSORRT_EXTRA | {"matplotlib", "ray", "pyarrow"})
    code = ("import importlib, sys\n"
            f"for name in {blocked!r}:\n    sys.modules[name] = None\n"
            f"for name in {runtime_side!r}:\n    importlib.import_module(name)\n"
            "print('imported', len(" + repr(runtime_side) + "))\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=120, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr
    assert f"imported {len(runtime_side)}" in out.stdout
    assert "dgate_export.runtime" in runtime_side and "dgate_export.cli" in runtime_side
