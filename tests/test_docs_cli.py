"""Every command of ours in a ```bash block of README.md and docs/*.md runs, one test per command.

Ours: `python -m dymu_lightning...` (also as `.venv/bin/python`, after `torchrun`, or after `&&`) and
the `dymu` script; `make`, `sbatch`, benchmark scripts and the like are not collected. Each page runs
its commands in order in one temporary working directory (a command may use what an earlier one on
the page wrote), with `DYMU_CACHE` at the real cache. HTML comments right before a block mark some of
its commands (docs/development.md#testing-the-commands-in-the-docs):

    <!-- docs-test: skip "/data/" (needs your own images) -->   commands containing the text: not run
    <!-- docs-test: slow (a calibration on real weights) -->    the whole block: @pytest.mark.slow
    <!-- docs-test: file configs/lab_vit.yaml -->              (before any block) written there first

The first marker that matches a command applies. A skip needs a reason; a marker that matches no
command fails, and so does an unmarked command that does not run. A block that starts with `#!` is a
script file, not commands to type, and is not collected.

Besides exit status 0, a command must leave what the docs say: a run its `thresholds.json` (or the
eval's `metrics.json`) in its `out_dir`, `shards` its `index.json`, `assets` the weights and photos in
`DYMU_CACHE`, `ls`/`show`/`check` their listing, resolved config or `PATH: ok`, any text after
`# prints:` in its comment, and the file its comment says it `writes`.
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
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CACHE = Path(os.environ.get("DYMU_CACHE", Path.home() / ".cache" / "dymu_lightning"))
TIMEOUT_S = 1800

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!--\s*docs-test:(?P<body>.*?)-->", re.DOTALL)
MARKER_BODY = re.compile(
    r'^(?P<kind>skip|slow)(?:\s+"(?P<text>[^"]+)")?(?:\s+\((?P<reason>[^)]*)\))?$|^(?P<file>file)\s+(?P<path>\S+)$'
)
# A command of ours: `-m dymu_lightning` (python, .venv/bin/python, torchrun) or the `dymu` script.
OURS = re.compile(r"(?:^|\s)-m\s+dymu_lightning\b|(?:^|[\s;&|(])dymu(?:\s|$)")
PRINTS = re.compile(r"#\s*prints:\s*(?P<text>.+?)\s*$")
WRITES = re.compile(r"#.*\bwrites:?\s+(?P<path>[\w./$-]+)")


@dataclass
class Marker:
    kind: str  # skip | slow | file
    text: str | None  # skip/slow: the block's commands that contain it (None: all); file: the path
    reason: str
    line: int
    used: bool = field(default=False, compare=False)


@dataclass
class Command:
    page: Path
    line: int  # 1-based line of the command in the page
    text: str  # backslash continuations joined; a trailing comment stays (bash drops it)
    marker: Marker | None

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"


@dataclass
class Page:
    commands: list[Command]
    markers: list[Marker]
    files: dict[str, str]  # path -> content, from `file` markers


def _markers_before(text: str, fence_start: int) -> list[Marker]:
    """The docs-test comments between the fence and the text before them (blank lines allowed)."""
    head, markers = text[:fence_start], []
    while (stripped := head.rstrip()).endswith("-->"):
        start = stripped.rfind("<!--")
        match = MARKER.fullmatch(stripped[start:]) if start >= 0 else None
        if match is None:
            break
        line = stripped.count("\n", 0, start) + 1
        body = MARKER_BODY.match(match["body"].strip())
        if body is None:
            raise ValueError(f"line {line}: unreadable marker {match[0]!r}")
        if body["file"]:
            markers.insert(0, Marker("file", body["path"], "", line))
        elif body["kind"] == "skip" and not body["reason"]:
            raise ValueError(f"line {line}: a skip needs a reason in parentheses: {match[0]!r}")
        else:
            markers.insert(0, Marker(body["kind"], body["text"], body["reason"] or "", line))
        head = stripped[:start]
    return markers


def _logical_lines(block: str, first_line: int) -> list[tuple[int, str]]:
    """(line number, command) with backslash continuations joined; comment lines dropped."""
    lines, start, parts = [], None, []
    for offset, raw in enumerate(block.splitlines()):
        start = first_line + offset if start is None else start
        line = raw.strip()
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        lines.append((start, " ".join([*parts, line]).strip()))
        start, parts = None, []
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def read_page(path: Path) -> Page:
    text = path.read_text()
    page = Page([], [], {})
    for fence in FENCE.finditer(text):
        markers = _markers_before(text, fence.start())
        page.markers += markers
        for marker in (m for m in markers if m.kind == "file"):
            page.files[marker.text] = fence[2]
            marker.used = True
        markers = [m for m in markers if m.kind != "file"]
        if fence[1] != "bash" or fence[2].startswith("#!"):
            if markers:
                raise ValueError(f"{path.name}:{markers[0].line}: a skip/slow marker before a block of no commands")
            continue
        first_line = text.count("\n", 0, fence.start(2)) + 1
        for line, command in _logical_lines(fence[2], first_line):
            if not OURS.search(shlex.join(shlex.split(command, comments=True))):
                continue
            marker = next((m for m in markers if m.text is None or m.text in command), None)
            if marker is not None:
                marker.used = True
            page.commands.append(Command(path, line, command, marker))
    return page


PAGE_DATA = {path: read_page(path) for path in PAGES}


def command_params() -> list:
    params = []
    for page in PAGE_DATA.values():
        for command in page.commands:
            kind = command.marker.kind if command.marker else None
            marks = {
                "slow": [pytest.mark.slow],
                "skip": [pytest.mark.skip(reason=f"docs-test: {command.marker.reason}" if command.marker else "")],
            }.get(kind, [])
            params.append(pytest.param(command, id=command.id, marks=marks))
    return params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working directory per page, made on first use, with the page's `file` blocks in it."""
    made: dict[Path, Path] = {}

    def get(page: Path) -> Path:
        if page not in made:
            folder = made[page] = tmp_path_factory.mktemp(page.stem)
            for name, content in PAGE_DATA[page].files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_text(content)
            # `.venv/bin/python ...` in the docs means this interpreter.
            if sys.prefix != sys.base_prefix:
                (folder / ".venv").symlink_to(sys.prefix, target_is_directory=True)
            else:
                (folder / ".venv" / "bin").mkdir(parents=True)
                (folder / ".venv" / "bin" / "python").symlink_to(sys.executable)
        return made[page]

    return get


def expected(command: Command, cwd: Path) -> tuple[list[Path], list[str]]:
    """The files a command must leave and the texts its output must contain, as the docs describe them.

    Runs in ``cwd`` with the test's ``DYMU_CACHE``: a run's ``out_dir`` comes from its resolved recipe.
    """
    words = [os.path.expandvars(w) for w in shlex.split(command.text, comments=True)]
    if "-m" in words:
        module, args = words[words.index("-m") + 1], words[words.index("-m") + 2 :]
    else:
        module, args = "dymu_lightning", words[words.index("dymu") + 1 :]
    texts = [m["text"]] if (m := PRINTS.search(command.text)) else []
    files = [cwd / os.path.expandvars(m["path"])] if (m := WRITES.search(command.text)) else []
    if module == "dymu_lightning.eval.next_token":
        out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), "runs/next_token")
        out = args[args.index("--out") + 1] if "--out" in args else out
        return [*files, cwd / out / "metrics.json"], texts
    if module != "dymu_lightning":
        return files, texts
    sub = args[0] if args and "=" not in args[0] else "run"  # `recipe=... key=value`: run the recipe
    if sub == "assets":  # docs/assets.md: what lands in $DYMU_CACHE
        return [*files, CACHE / "dinov2-vits14" / "config.json", CACHE / "images" / "skimage" / "astronaut.png"], texts
    if sub == "ls":
        return files, [*texts, "recipes:", "backbones:"]
    if sub == "show":
        return files, [*texts, "task:", "out_dir:"]
    if sub == "check" and "--help" not in args:
        return files, [*texts, ": ok"]
    if sub == "shards":
        return [*files, cwd / args[2] / "index.json"], texts
    if sub != "run":
        return files, texts
    from dymu_lightning.config.recipes import load_recipe

    recipe = next(a.split("=", 1)[1] for a in args if a.startswith("recipe="))
    config = load_recipe(recipe, [a for a in args if not a.startswith("recipe=")]).config
    written = "metrics.json" if config.task == "eval_encoder" else "thresholds.json"
    return [*files, cwd / config.out_dir / written], texts


@pytest.mark.parametrize("command", command_params())
def test_docs_command_runs(command, workdir, monkeypatch):
    cwd = workdir(command.page)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DYMU_CACHE", str(CACHE))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-c", command.text], capture_output=True, text=True, timeout=TIMEOUT_S)
    hint = (
        f"`{command.text}` ({command.id}) exited with {done.returncode}. If it cannot run in a test, mark it "
        f'before its block: <!-- docs-test: skip "TEXT" (why) --> (docs/development.md).\n'
        f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    )
    assert done.returncode == 0, hint
    files, texts = expected(command, cwd)
    for path in files:
        assert path.is_file(), f"{command.id}: {path} was not written\n{done.stdout[-3000:]}"
    for text in texts:
        assert text in done.stdout, f"{command.id}: {text!r} not in the output:\n{done.stdout[-3000:]}"


def test_every_marker_applies_to_a_command():
    unused = [f"{path.name}:{m.line}" for path, page in PAGE_DATA.items() for m in page.markers if not m.used]
    assert unused == [], f"docs-test markers that match no command of their block: {unused}"


def test_markers_and_commands_are_read_as_documented(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n"
        "<!-- docs-test: file configs/x.yaml -->\n```yaml\ntask: calibrate\n```\n\n"
        '<!-- docs-test: skip "/data/" (needs data) -->\n\n<!-- docs-test: slow -->\n'
        "```bash\n"
        "python -m dymu_lightning ls   # a comment\n"
        "# a comment line\n"
        "python -m dymu_lightning shards /data/a \\\n    /data/b\n"
        "make run\n"
        "DYMU_CACHE=/x .venv/bin/python -m dymu_lightning show recipe=quickstart\n"
        "```\n\n"
        '```bash\n#!/bin/bash\nsrun python -m dymu_lightning "$@"\n```\n'
    )
    read = read_page(page)
    assert [(c.line, c.text, c.marker.kind) for c in read.commands] == [
        (12, "python -m dymu_lightning ls   # a comment", "slow"),
        (14, "python -m dymu_lightning shards /data/a /data/b", "skip"),
        (17, "DYMU_CACHE=/x .venv/bin/python -m dymu_lightning show recipe=quickstart", "slow"),
    ]
    assert read.files == {"configs/x.yaml": "task: calibrate\n"}
    assert all(m.used for m in read.markers)

    page.write_text('<!-- docs-test: skip "/data/" -->\n```bash\npython -m dymu_lightning ls /data/\n```\n')
    with pytest.raises(ValueError, match="a skip needs a reason"):
        read_page(page)
    page.write_text('<!-- docs-test: slow "nothing" (x) -->\n```bash\npython -m dymu_lightning ls\n```\n')
    assert [m.used for m in read_page(page).markers] == [False]
