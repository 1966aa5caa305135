"""mkdocs hooks (mkdocs.yml `hooks:`): README.md as the home page, and links that leave docs/.

The pages are written to be read on a repository host too, so their links are relative to the file
they are in: README.md links to `docs/quickstart.md`, a page may link to `../benchmarks/x.py`. Here:

- mkdocstrings reads the package from `build/api_src/`, a tree of links laid out as it installs
  (`backbones/` becomes `dymu_lightning/backbones/`, see `[tool.setuptools.package-dir]`).
- `docs/index.md` is replaced by README.md, whose links are rewritten relative to docs/.
- A link to a file of the repository outside docs/ is rewritten to a copy of that file under
  `repository/` in the site (a Markdown file is copied as `.md.txt`, shown as text); README.md itself
  maps to the home page.

Links to files that do not exist are left alone, so the strict build still reports them.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import tomllib
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

HOME = "index.md"
COPIES = "repository"
# An inline link or image target: ](target) or ](target "title"); URLs and bare anchors are not paths.
LINK = re.compile(r"\]\((?P<target>[^)\s#]*)(?P<anchor>#[^)\s]*)?(?P<title>\s+\"[^\"]*\")?\)")
URL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


@event_priority(100)  # before mkdocstrings sets up its search paths
def on_config(config):
    """Lay out `build/api_src/` as the package installs, for mkdocstrings (its `paths` in mkdocs.yml)."""
    root = _root(config)
    setuptools = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    top = "dymu_lightning"
    links = {entry.name: entry for entry in (root / package_dir[top]).iterdir() if entry.name != "__pycache__"}
    for name, where in package_dir.items():
        if name.startswith(f"{top}.") and name.count(".") == 1:
            links[name.split(".")[1]] = root / where
    _sync_links(root / "build" / "api_src" / top, links)
    return config


def _sync_links(folder: Path, links: dict[str, Path]) -> None:
    """Make `folder` hold exactly the symlinks `links` (name -> target); safe when two builds race."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        if entry.name not in links or not entry.is_symlink() or entry.readlink() != links[entry.name]:
            entry.unlink(missing_ok=True)
    for name, target in links.items():
        with contextlib.suppress(FileExistsError):
            (folder / name).symlink_to(target)


def _source(page, config) -> Path:
    """The file the page's text comes from, which its relative links are relative to."""
    if page.file.src_uri == HOME:
        return _root(config) / "README.md"
    return Path(page.file.abs_src_path).resolve()


def on_page_read_source(page, config) -> str | None:
    if page.file.src_uri == HOME:
        return (_root(config) / "README.md").read_text(encoding="utf-8")
    return None


def on_page_markdown(markdown: str, page, config, files: Files) -> str:
    root, docs = _root(config), Path(config.docs_dir).resolve()
    source = _source(page, config)
    page_dir = (docs / page.file.src_uri).parent

    def rewrite(match: re.Match) -> str:
        target = match["target"]
        if not target or URL.match(target) or target.startswith("/"):
            return match[0]
        path = (source.parent / target).resolve()
        if not path.is_file() or not path.is_relative_to(root):
            return match[0]  # broken: the strict build reports it
        if path == root / "README.md":
            path = docs / HOME
        elif not path.is_relative_to(docs):
            path = docs / _copy(path.relative_to(root), path, config, files)
        new = Path(os.path.relpath(path, page_dir)).as_posix()
        return f"]({new}{match['anchor'] or ''}{match['title'] or ''})"

    return LINK.sub(rewrite, markdown)


def _copy(relative: Path, path: Path, config, files: Files) -> str:
    """Add the repository file `relative` to the site (once) and return its path in docs/ terms."""
    uri = f"{COPIES}/{relative.as_posix()}"
    if uri.endswith((".md", ".markdown")):
        uri += ".txt"  # a static file, not a page outside the nav
    if files.get_file_from_path(uri) is None:
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return uri
