"""The README and the MkDocs site (docs/): every fenced code block runs as written, the site builds with --strict, the
README stays a front door.

How a block is run, from the markdown alone:

- ```python / ```py: executed in this process, in a fresh namespace, with a fresh temporary folder as the current
  folder; a traceback names the markdown file and its line.
- ```bash / ```sh: each command line (``\\`` continues a line, ``#`` starts a comment, `` && `` chains) runs in the
  same temporary folder: ``stepdiff ...`` through ``stepdiff.cli.main`` and ``python -m stepdiff.examples ...``
  through ``stepdiff.examples.main`` in this process (the same code as the console script, without a fresh
  interpreter's import time per line), anything else under bash. A command that exits non-zero fails the block.
- HTML comments right above a fence steer it (invisible in the rendered page):
  ``<!-- skip: REASON -->`` (a real model, a GPU, a cluster, an install, a server that keeps running: reported as
  skipped with the reason), ``<!-- file: NAME -->`` (the block is a file's content: written as NAME for the blocks
  that continue it), ``<!-- continue -->`` (runs after the blocks before it in the same file, in their folder and
  namespace, as a reader following the page would; skipped blocks in between are passed over).

Any other block (no language, ```text, ...) must say why it is not run: the suite fails on a block it cannot run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250

PYTHON = ("python", "py")
SHELL = ("bash", "sh", "shell")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>skip|file|continue)\b\s*(?::\s*(?P<arg>.*?))?\s*-->\s*$")
SHELL_OPERATORS = {"|", "||", ";", ">", ">>", "<", "<<", "&", "2>", "2>&1"}


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first code line
    lang: str
    code: str
    skip: str | None = None
    file: str | None = None
    continues: bool = False

    @property
    def where(self) -> str:
        try:
            name = self.path.relative_to(ROOT)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"

    def problem(self) -> str | None:
        """Why this block cannot be run as it stands (None: it can)."""
        if self.skip is not None:
            return None if self.skip.strip() else f"{self.where}: <!-- skip: ... --> needs a reason"
        if self.file is not None:
            return None if self.file.strip() and "/" not in self.file else f"{self.where}: bad file name {self.file!r}"
        if self.lang in PYTHON + SHELL:
            return None
        return (f"{self.where}: a ```{self.lang or '(no language)'} block is neither run nor marked: make it python or "
                f"bash, or put <!-- skip: REASON --> or <!-- file: NAME --> right above it")


def parse(path: Path, text: str | None = None) -> list[Block]:
    lines = (path.read_text() if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m["indent"]), m["fence"], m["info"].lower()
        markers = {}
        j = i - 1
        while j >= 0 and (mk := MARKER.match(lines[j])):
            markers.setdefault(mk["kind"], mk["arg"] or "")
            j -= 1
        end = i + 1
        while end < len(lines) and not re.match(rf"^ {{0,{indent + 3}}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise ValueError(f"{path}:{i + 1}: the code block is never closed")
        body = [line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[i + 1:end]]
        blocks.append(Block(path, i + 2, lang, "\n".join(body) + "\n", skip=markers.get("skip"),
                            file=markers.get("file"), continues="continue" in markers))
        i = end + 1
    return blocks


@dataclass
class Chain:
    """A block and the blocks that continue it: run in one folder and one namespace."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def where(self) -> str:
        return self.blocks[0].where


def chains(blocks: list[Block]) -> list[Chain]:
    out: list[Chain] = []
    for block in blocks:
        runs = [c for c in out if c.blocks[0].path == block.path and c.blocks[0].skip is None]
        if block.continues and block.skip is None:
            if not runs:
                raise ValueError(f"{block.where}: <!-- continue --> needs a block before it in the same file that runs")
            runs[-1].blocks.append(block)
        else:
            out.append(Chain([block]))
    return out


def shell_commands(code: str) -> list[list[str] | str]:
    """The block's commands: a token list for each command stepdiff runs in-process, a string for bash."""
    commands: list[list[str] | str] = []
    for logical in re.sub(r"\\\n", " ", code).splitlines():
        tokens = shlex.split(logical, comments=True)
        if not tokens:
            continue
        if SHELL_OPERATORS & set(tokens) or any(t.startswith(("$", "`")) for t in tokens):
            commands.append(logical)
            continue
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token == "&&":
                if segment:
                    commands.append(segment)
                segment = []
            else:
                segment.append(token)
    return commands


def run_command(command: list[str] | str, where: str) -> None:
    words = command.split() if isinstance(command, str) else command
    if {"pip", "pip3", "apt-get", "apt", "sudo"} & set(words[:3]):  # never change the machine from a test
        raise AssertionError(f"{where}: `{' '.join(words)}` installs packages: put <!-- skip: REASON --> above the block")
    if isinstance(command, list) and command[0] == "stepdiff":
        from stepdiff.cli import main

        code = main(command[1:])
    elif isinstance(command, list) and command[:3] == ["python", "-m", "stepdiff.examples"]:
        from stepdiff.examples import main

        code = main(command[3:])
    else:
        line = command if isinstance(command, str) else shlex.join(command)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        code = subprocess.run(["bash", "-ec", line], env=env, timeout=300).returncode
    shown = command if isinstance(command, str) else shlex.join(command)
    assert code == 0, f"{where}: `{shown}` exited {code}"


def run_chain(chain: Chain, folder: Path) -> None:
    """Run a chain's blocks in ``folder`` (made the current folder for the run)."""
    namespace: dict = {"__name__": "__main__"}
    before = Path.cwd()
    os.chdir(folder)
    try:
        for block in chain.blocks:
            if block.file is not None:
                (folder / block.file).write_text(block.code)
            elif block.lang in PYTHON:
                source = "\n" * (block.line - 1) + block.code  # line numbers in tracebacks are the markdown's own
                exec(compile(source, str(block.path), "exec"), namespace)
            elif block.lang in SHELL:
                for command in shell_commands(block.code):
                    run_command(command, block.where)
            else:
                raise AssertionError(block.problem())
    finally:
        os.chdir(before)


ALL_BLOCKS = [block for path in markdown_files() for block in parse(path)]
ALL_CHAINS = chains(ALL_BLOCKS)


@pytest.mark.parametrize("chain", ALL_CHAINS, ids=[c.where for c in ALL_CHAINS])
def test_code_block_runs_as_written(chain, tmp_path):
    first = chain.blocks[0]
    if first.skip is not None:
        pytest.skip(f"{first.where}: {first.skip}")
    if any(b.problem() for b in chain.blocks):
        pytest.fail("; ".join(b.problem() for b in chain.blocks if b.problem()))
    run_chain(chain, tmp_path)


def test_every_code_block_runs_or_says_why():
    assert len(ALL_BLOCKS) > 20 and {b.path for b in ALL_BLOCKS} >= {README}
    problems = [b.problem() for b in ALL_BLOCKS if b.problem()]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ the runner can fail


def test_a_broken_example_fails(tmp_path):
    page = tmp_path / "page.md"
    text = """# A page

<!-- file: prompts.txt -->
```text
a red circle on a blue background
```

```python
import pathlib
assert pathlib.Path("prompts.txt").exists() is False  # a fresh folder: the file block above is not part of it
```

```python
x = 1
```

<!-- continue -->
```python
assert x == 1
y = 1 / 0
```

```bash
stepdiff generate "a red circle on a blue background" --steps 0
```

```bash
python -m stepdiff.examples && test -f red-circle.png && false
```

```
a diagram
```

<!-- skip: needs a GPU -->
```python
import torch; torch.ones(1, device="cuda")
```
"""
    page.write_text(text)
    blocks = parse(page)
    assert [b.lang for b in blocks] == ["text", "python", "python", "python", "bash", "bash", "", "python"]
    assert blocks[0].file == "prompts.txt" and blocks[7].skip == "needs a GPU" and blocks[3].continues
    assert blocks[1].line == 9  # the first code line
    assert [b.problem() is None for b in blocks] == [True] * 6 + [False, True]
    found = chains(blocks)
    assert [len(c.blocks) for c in found] == [1, 1, 2, 1, 1, 1, 1]
    for name in "abcde":
        (tmp_path / name).mkdir()
    run_chain(found[0], tmp_path / "a")
    assert (tmp_path / "a" / "prompts.txt").read_text() == "a red circle on a blue background\n"
    run_chain(found[1], tmp_path / "b")  # passes
    with pytest.raises(ZeroDivisionError) as caught:
        run_chain(found[2], tmp_path / "c")
    assert caught.traceback[-1].path == page and caught.traceback[-1].lineno + 1 == 20  # the markdown's line
    with pytest.raises(AssertionError, match="exited 2"):
        run_chain(found[3], tmp_path / "d")
    with pytest.raises(AssertionError, match="exited 1"):
        run_chain(found[4], tmp_path / "e")
    assert (tmp_path / "e" / "red-circle.png").exists()  # the in-process part ran before bash's `false`
    with pytest.raises(ValueError, match="continue"):
        chains(parse(page, "<!-- continue -->\n```python\npass\n```\n"))


def test_shell_lines_split_as_a_shell_would():
    code = 'stepdiff generate "a red circle" \\\n  --steps 4   # a comment\n\n# only a comment\nstepdiff a && stepdiff b\nls | wc -l\n'
    assert shell_commands(code) == [["stepdiff", "generate", "a red circle", "--steps", "4"], ["stepdiff", "a"],
                                    ["stepdiff", "b"], "ls | wc -l"]


# ------------------------------------------------------------------------------------------ the README, the site


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    ci = (ROOT / ".ci" / "run").read_text()
    # the quick start's two commands: the second is what .ci/run runs (its pip install and pytest, quieter there)
    assert 'pip install torch==2.13.0 -e . && stepdiff generate "' in text
    test_command = 'apt-get update && apt-get install -y chromium && pip install torch==2.13.0 -e ".[test]" && python -m pytest'
    assert test_command in text
    assert 'pip install -q torch==2.13.0 -e ".[test]"' in ci and "\npython -m pytest\n" in ci
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):  # relative links point at files that exist
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_measured_page_is_what_its_sources_give(tmp_path):
    """docs/measured.md's tables are generated (python -m tools.measured_table) from docs/measured.json and the results
    files; a figure edited by hand on the page, or a results file updated without re-running the script, fails."""
    from tools import measured_table

    page = (ROOT / "docs" / "measured.md").read_text()
    assert measured_table.page_region(page) == measured_table.generated()
    assert measured_table.main(["--check"]) == 0
    # the check can fail: a figure changed in a copy of the sources
    for name in ("measured.json", "fast.json"):
        (tmp_path / name).write_text((ROOT / "docs" / name).read_text())
    (tmp_path / "fast.json").write_text((tmp_path / "fast.json").read_text().replace('"time_ratio": 2.93', '"time_ratio": 9.93'))
    assert measured_table.generated(tmp_path) != measured_table.generated()
    assert "9.93x" in measured_table.generated(tmp_path)
    # every figure of the main table comes with the command that measures it
    for line in measured_table.main_table(*measured_table.sources()).splitlines()[2:]:
        assert line.rstrip(" |").rsplit("|", 1)[-1].strip().startswith("`"), line


def test_docs_build_with_strict(tmp_path):
    """CI builds the site: `mkdocs build --strict` turns every warning (a broken link or anchor, a page missing from
    the nav) into a failure."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "measured" / "index.html").exists()
