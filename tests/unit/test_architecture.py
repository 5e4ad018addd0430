"""The layers stay visible: no import cycles, server/ never imports workers/, one composition root.

Every import counts, at module top or inside a function. Layers, bottom to top:
mp4totext (config, contracts, events, client, user CLI) < storage, observability < core
< server | workers < launch (the only package that imports both server and workers).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("mp4totext", "core", "server", "workers", "storage", "observability", "launch")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("mp4totext", "v1"):  # generated stubs
                continue
            name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            mods[name] = path
    return mods


MODULES = _modules()


def _imports(path: pathlib.Path) -> set[str]:
    """First-party modules ``path`` imports (a ``from a import b`` of a module b counts as a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES}


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _package(module: str) -> str:
    return module.split(".")[0]


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert _cycles() == []


@pytest.mark.parametrize("package, forbidden", [
    ("server", {"workers", "launch"}),
    ("workers", {"server", "launch"}),
    ("core", {"server", "workers", "launch"}),
    ("storage", {"core", "server", "workers", "launch", "observability"}),
    ("observability", {"storage", "core", "server", "workers", "launch"}),  # reads no tables
    ("mp4totext", {"core", "server", "workers", "launch", "storage", "observability"}),
])
def test_layers(package: str, forbidden: set[str]) -> None:
    bad = {(m, d) for m, deps in GRAPH.items() if _package(m) == package for d in deps if _package(d) in forbidden}
    assert bad == set()


def test_only_the_composition_root_imports_server_and_workers_together() -> None:
    both = {m for m, deps in GRAPH.items() if {"server", "workers"} <= {_package(d) for d in deps}}
    assert both and all(_package(m) == "launch" for m in both)


def test_the_client_library_and_user_cli_import_no_service_code() -> None:
    for module in ("mp4totext.client", "mp4totext.cli"):
        assert {_package(d) for d in GRAPH[module]} <= {"mp4totext"}, module


def test_module_and_function_sizes() -> None:
    too_long = []
    for name, path in MODULES.items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append((name, len(source.splitlines())))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append((f"{name}.{node.name}", lines))
    assert too_long == []


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_every_package_goes_into_the_images(dockerfile: str) -> None:
    copied = {line.split()[1] for line in (ROOT / dockerfile).read_text().splitlines() if line.startswith("COPY ")}
    assert set(PACKAGES) <= copied


@pytest.mark.parametrize("module", ["launch.cli", "server.app", "mp4totext.cli"])
def test_the_api_server_and_the_command_line_load_no_worker_code(module: str) -> None:
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'workers', 'faster_whisper', 'ctranslate2', 'av', 'torch', 'pyannote'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
