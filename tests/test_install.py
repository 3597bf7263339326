"""One install: the base install (pyproject.toml's dependencies) runs every command but `batch --ray`; Ray stays an
extra whose absence is one line saying how to install it."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import stepdiff
from stepdiff.cli import STUDIO_REQUIREMENTS

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
STUDIO = Path(stepdiff.__file__).parent / "studio"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _base() -> dict[str, Requirement]:
    return {_norm(r.name): r for r in map(Requirement, _project()["dependencies"])}


def _third_party_imports(folder: Path, only: str = "*.py", skip: tuple[str, ...] = ()) -> set[str]:
    """Top-level module names the files in ``folder`` import, less the standard library and stepdiff itself."""
    names = set()
    for path in folder.glob(only):
        if path.name in skip:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("stepdiff", "__future__")}


def test_the_base_install_has_what_serve_imports():
    base = _base()
    # studio/ray_workers.py runs only with serve --ray and imports Ray when it starts: the ray extra (checked below)
    imported = _third_party_imports(STUDIO, skip=("ray_workers.py",))
    assert {"starlette", "uvicorn"} <= imported  # the scan sees the studio's imports (websockets is uvicorn's)
    dists = packages_distributions()  # module -> the distributions that install it (PIL -> Pillow)
    for module in imported | {"websockets"}:
        names = {_norm(d) for d in dists.get(module, [module])}
        assert names & set(base), f"stepdiff serve imports {module} ({names}), which the base install does not declare"
    # The CLI's one-line hint for a broken environment names the same requirements as pyproject.toml
    for module, wanted in STUDIO_REQUIREMENTS.items():
        assert str(base[_norm(module)]) == wanted


def test_old_install_lines_still_resolve_and_ray_stays_an_extra():
    extras = _project()["optional-dependencies"]
    ray_extra = {Requirement(r).name for r in extras["ray"]}
    assert _third_party_imports(STUDIO, only="ray_workers.py") - set(_base()) <= ray_extra  # serve --ray's imports
    assert extras["studio"] == []  # `pip install "stepdiff[studio]"` still names an extra, which adds nothing
    assert "ray" not in _base() and any(Requirement(r).name == "ray" for r in extras["ray"])
    assert not any("studio" in r for r in extras["test"])


def test_serve_help_works(run_cli):
    code, out, err = run_cli("serve", "--help")
    assert code == 0, err
    assert "--port" in out and "studio extra" not in out


def test_serve_without_its_modules_says_what_to_install_before_loading(run_cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError

    def no_loading(*a, **k):
        raise AssertionError("the model must not load when serve cannot run")

    monkeypatch.setattr("stepdiff.studio.server.load_studio", no_loading)
    code, out, err = run_cli("serve", "--data", tmp_path / "studio", "--port", "0")
    assert code == 2
    assert err.count("\n") == 1 and "serve needs uvicorn" in err
    assert "pip install 'starlette>=0.40' 'uvicorn>=0.30' 'websockets>=12'" in err


@pytest.mark.parametrize("flags", [["--ray"], ["--ray-address", "auto"]])
def test_batch_ray_without_ray_is_one_line_saying_how_to_install_it(run_cli, tmp_path, sd_folder, monkeypatch, flags):
    monkeypatch.setitem(sys.modules, "ray", None)
    (tmp_path / "p.txt").write_text("a\n")
    code, out, err = run_cli("batch", tmp_path / "p.txt", "--out", tmp_path / "out", "--model", sd_folder, *flags)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("stepdiff: error: --ray needs Ray")
    assert "pip install 'stepdiff[ray]'" in err
