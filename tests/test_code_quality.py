"""ruff and mypy are part of the test command, so CI holds the style rules too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_check_is_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean_on_server_and_client() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def _imports_of(path: Path, package: str) -> set[str]:
    """Every module of `package` that `path` imports, wherever the import sits
    (module level, inside a function, under TYPE_CHECKING): a lazy import
    hides a cycle from Python, not from a reader."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == package:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == package)
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """The strongly connected groups (more than one module) of `root`'s import graph."""
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {
        name: sorted(m for m in _imports_of(path, root.name) if m in modules and m != name)
        for name, path in modules.items()
    }
    # Tarjan's algorithm, iteratively (no recursion limit to worry about).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            step = next(edges, None)
            if step is not None:
                if step not in index:
                    index[step] = low[step] = len(index)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(graph[step])))
                elif step in on_stack:
                    low[node] = min(low[node], index[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_server_package_has_no_import_cycles() -> None:
    assert import_cycles(ROOT / "server" / "tokenwire_server") == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    (package / "d.py").write_text("import pkg.a\n")
    assert import_cycles(package) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


#: A module longer than this states why it is one module (issue 20).
MODULE_LINES = 300


def long_modules_without_a_reason(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") <= MODULE_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(text)) or ""
        if "Why one module:" not in docstring:
            found.append(f"{path.relative_to(root)} ({text.count(chr(10))} lines)")
    return found


def test_long_server_modules_say_why_they_are_one_module() -> None:
    assert long_modules_without_a_reason(ROOT / "server" / "tokenwire_server") == []


def test_the_length_check_finds_a_long_module(tmp_path: Path) -> None:
    (tmp_path / "long.py").write_text('"""Long."""\n' + "x = 1\n" * 400)
    (tmp_path / "reasoned.py").write_text(
        '"""Long.\n\nWhy one module: a table.\n"""\n' + "x = 1\n" * 400
    )
    assert long_modules_without_a_reason(tmp_path) == ["long.py (401 lines)"]


def test_call_state_travels_in_one_typed_object_not_context_variables() -> None:
    """Issue 20: the chain hands a `Call` inward; no layer reads a context
    variable another layer wrote (OpenTelemetry's own context is the span's)."""
    server = ROOT / "server" / "tokenwire_server"
    found = [
        str(path.relative_to(server))
        for path in server.rglob("*.py")
        if "ContextVar(" in path.read_text() or "import contextvars" in path.read_text()
    ]
    assert found == []
