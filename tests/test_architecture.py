"""The shape of the code, measured (issue 23): import cycles, the CLI kept out of the library, short modules (400
lines; 300 in cli/) and functions (60 lines), and simple request validators.

Import cycles are found from the source (``ast``), every import counted, also those inside functions: a lazy
import still ties two modules together. Cycles known today are listed in ``KNOWN_CYCLES`` (printed by the test);
a new cycle, or a known one that grows, fails the test. Remove a cycle's entry when it is fixed.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "stepdiff"

# KNOWN CYCLES: none left (issue 23 took apart the engine's circle base <-> run <-> kinds <-> single_file, the
# limits <-> single_file edge, the callbacks <-> caching circle and the CLI <-> batch <-> studio one). A cycle found
# fails the test; should one ever have to be accepted for a while, list its modules here as a frozenset.
KNOWN_CYCLES: list[frozenset[str]] = []

# Modules issue 23's items 1 and 2 made or moved (the loader, the request, the three callers): in no cycle at all.
NO_CYCLES_IN = ("stepdiff.cli", "stepdiff.loading", "stepdiff.request", "stepdiff.validators", "stepdiff.batch", "stepdiff.studio.spec",
                "stepdiff.studio.server")


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _targets(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    """The project modules one import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in modules]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = [base] if base in modules else []
    found += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]  # from . import submodule
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[name].update(t for t in _targets(name, path, node, modules) if t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]


def test_no_import_cycles():
    found = cycles(import_graph())
    print("import cycles among src/stepdiff modules:", [sorted(c) for c in found] or "none")
    print("known (being fixed elsewhere):", [sorted(c) for c in KNOWN_CYCLES])
    new = [sorted(c) for c in found if not any(c <= known for known in KNOWN_CYCLES)]
    assert new == [], f"new import cycles: {new}"
    touched = [sorted(c) for c in found if any(m == p or m.startswith(p + ".") for m in c for p in NO_CYCLES_IN)]
    assert touched == [], f"cycles through the loader, the request or the callers: {touched}"


def test_the_library_does_not_import_the_cli():
    graph = import_graph()
    users = sorted(name for name, targets in graph.items()
                   if not (name == "stepdiff.cli" or name.startswith("stepdiff.cli."))
                   and name != "stepdiff.__main__"
                   and any(t == "stepdiff.cli" or t.startswith("stepdiff.cli.") for t in targets))
    assert users == [], f"modules outside stepdiff/cli/ that import it: {users}"


def test_cli_modules_are_short():
    long = {p.name: n for p in (PACKAGE / "cli").glob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}, f"cli/ modules over 300 lines: {long}"


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # end_lineno - lineno + 1 of a def: its signature, docstring and body

# STILL LONG: nothing today. Anything over a limit fails; should a long module or function ever have to be accepted
# for a while, name it here (a module by its path under src/stepdiff, a function as path:Qualified.name) with why.
STILL_LONG: dict[str, str] = {}


def _module_lengths() -> dict[str, int]:
    return {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in sorted(PACKAGE.rglob("*.py"))}


def _function_lengths() -> dict[str, int]:
    """``path:Qualified.name`` -> lines of every function and method (nested ones too) under src/stepdiff."""
    found: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str, path: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    found[f"{path}:{name}"] = child.end_lineno - child.lineno + 1
                walk(child, name + ".", path)
            else:
                walk(child, prefix, path)

    for p in sorted(PACKAGE.rglob("*.py")):
        walk(ast.parse(p.read_text(), str(p)), "", p.relative_to(PACKAGE).as_posix())
    return found


def _over(lengths: dict[str, int], limit: int, functions: bool) -> dict[str, int]:
    """What is over ``limit`` and not in STILL_LONG."""
    allowed = {name for name in STILL_LONG if (":" in name) == functions}
    long = {name: n for name, n in lengths.items() if n > limit}
    short_now = sorted(name for name in allowed if lengths.get(name, 0) <= limit)
    assert short_now == [], f"STILL_LONG entries now within {limit} lines (remove them): {short_now}"
    return {name: n for name, n in long.items() if name not in allowed}


def test_modules_are_short():
    long = _over(_module_lengths(), MAX_MODULE_LINES, functions=False)
    assert long == {}, f"modules under src/stepdiff over {MAX_MODULE_LINES} lines: {long}"


def test_functions_are_short():
    long = _over(_function_lengths(), MAX_FUNCTION_LINES, functions=True)
    assert long == {}, f"functions under src/stepdiff over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_length_checks_find_long_code(tmp_path, monkeypatch):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 70 + "\n" * 400)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    assert _module_lengths() == {"long.py": 471}
    assert _function_lengths() == {"long.py:f": 71}
    assert _over(_module_lengths(), MAX_MODULE_LINES, functions=False) == {"long.py": 471}
    assert _over(_function_lengths(), MAX_FUNCTION_LINES, functions=True) == {"long.py:f": 71}


# The validators of a request: every field checker in request.py, and each caller's one function that checks what
# it reads (CLI generate's flags, a batch row, a studio job).
VALIDATORS = {
    "src/stepdiff/request.py": None,  # every function
    "src/stepdiff/validators.py": None,
    "src/stepdiff/cli/generate_checks.py": {"_check_generate"},
    "src/stepdiff/batch/rows.py": {"_row"},
    "src/stepdiff/studio/spec.py": {"parse_job"},
}


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_request_validators_are_simple():
    """ruff's C901 (McCabe complexity) at most 10 for each request validator."""
    root = SRC.parent
    done = subprocess.run(
        ["ruff", "check", "--isolated", "--select", "C901", "--config", "lint.mccabe.max-complexity=10",
         "--output-format", "json", *VALIDATORS], cwd=root, capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    complex_ = []
    for problem in json.loads(done.stdout or "[]"):
        path = Path(problem["filename"]).resolve().relative_to(root).as_posix()
        function = problem["message"].split("`")[1]
        if VALIDATORS[path] is None or function in VALIDATORS[path]:
            complex_.append(f"{path}: {problem['message']}")
    assert complex_ == [], complex_


if __name__ == "__main__":  # python tests/test_architecture.py: the graph's cycles
    print([sorted(c) for c in cycles(import_graph())])
    sys.exit(0)


def test_per_call_data_is_typed():
    """No per-call data under string keys: the kind's inputs are ``CallInputs`` fields, what a run keeps for its
    steps is ``RunExtras`` fields, and nothing is smuggled through the call's arguments under a private key."""
    import re

    patterns = {
        "kind[...]": re.compile(r"\bkind\[\s*['\"]"),
        "kind.get(...)": re.compile(r"\bkind\.get\("),
        "run.extras[...]": re.compile(r"\.extras\[\s*['\"]"),
        "args['_...']": re.compile(r"\bargs(?:\[|\.pop\(|\.get\()\s*['\"]_"),
    }
    found = [f"{p.relative_to(SRC.parent)}:{n}: {name}" for p in (PACKAGE / "pipelines").glob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1) for name, rx in patterns.items() if rx.search(line)]
    assert found == [], found


def test_the_run_uses_only_the_pipelines_public_interface():
    """``Run`` (pipelines/run.py) calls no private member of its pipeline."""
    import re

    text = (PACKAGE / "pipelines" / "run.py").read_text()
    private = sorted(set(re.findall(r"\b(?:pipe|pipeline|self\.pipeline)\._(?!_)\w+", text)))
    # the classic private spellings a callback may use are documented, never called, by the run
    assert [p for p in private if not p.endswith(("_interrupt", "_guidance_scale"))] == [], private


MAX_PROJECT_CLASSES_IN_MRO = 5


def test_public_pipelines_have_short_mros():
    """Kinds (image-to-image, inpainting) and features (ControlNet, IP-Adapter) are objects a pipeline holds, not
    mixins: no public pipeline class has more than 5 project classes in its MRO (there were up to 10)."""
    import inspect

    import stepdiff
    from stepdiff.pipelines.base import StepDiffPipeline

    counts = {name: sum(k.__module__.startswith("stepdiff") for k in cls.__mro__)
              for name in dir(stepdiff) if inspect.isclass(cls := getattr(stepdiff, name)) and issubclass(cls, StepDiffPipeline)}
    assert len(counts) >= 18, counts
    print("project classes in each public pipeline's MRO:", counts)
    assert {n: c for n, c in counts.items() if c > MAX_PROJECT_CLASSES_IN_MRO} == {}
