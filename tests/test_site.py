"""The docs site builds strictly: every link, anchor and API reference resolves (what `make docs` runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_PAGES = sorted(p.stem for p in (ROOT / "docs" / "api").glob("*.md") if p.name != "index.md")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)]
    return subprocess.run(command, cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    build = mkdocs_build(ROOT / "mkdocs.yml", site)
    # A page with a broken link or anchor, or a `::: module` that no longer exists, ends up here.
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-6000:]}"
    return site


def test_every_page_is_built(site):
    """(A page missing from the nav fails the strict build: `validation.omitted_files: warn`.)"""
    for page in (ROOT / "docs").rglob("*.md"):
        stem = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / (stem.parent if stem.name == "index" else stem) / "index.html"
        assert built.is_file(), page


def test_the_home_page_is_the_readme_with_its_links_made_relative(site):
    home = (site / "index.html").read_text()
    assert "DyMU for vision-language models, as a library" in home
    assert 'href="quickstart/"' in home and 'href="docs/' not in home


@pytest.mark.parametrize("page", API_PAGES)
def test_api_pages_document_objects(site, page):
    """Each `::: package` renders members: a package emptied by a move (a re-export without `__all__`) fails."""
    html = (site / "api" / page / "index.html").read_text()
    kinds = re.findall(r'class="doc doc-object doc-(\w+)', html)
    assert kinds.count("module") >= 1
    assert {"class", "function"} & set(kinds), (
        f"docs/api/{page}.md documents no classes or functions: did a module move and leave a "
        "re-export without `__all__`? Add `__all__` there, or point the page at the new module."
    )


@pytest.fixture
def tiny_project(tmp_path) -> Path:
    """A site with docs/hooks.py and one page, in a repository-like folder."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "hooks.py").write_text((ROOT / "docs" / "hooks.py").read_text())
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"dymu_lightning" = "dymu_lightning"\n')
    (tmp_path / "dymu_lightning").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "speed.py").write_text("print('fast')\n")
    (tmp_path / "README.md").write_text("# Home\n\nSee [the page](docs/page.md#a-section).\n")
    (tmp_path / "docs" / "index.md").write_text("replaced by README.md\n")
    config = "site_name: t\nstrict: true\nexclude_docs: hooks.py\nhooks: [docs/hooks.py]\n"
    config += "validation: {unrecognized_links: warn, anchors: warn}\nnav: [index.md, page.md]\n"
    (tmp_path / "mkdocs.yml").write_text(config)
    return tmp_path


def test_links_to_repository_files_outside_docs_become_copies(tiny_project):
    page = "# Page\n\n## A section\n\n[the script](../benchmarks/speed.py), [home](../README.md)\n"
    (tiny_project / "docs" / "page.md").write_text(page)
    build = mkdocs_build(tiny_project / "mkdocs.yml", tiny_project / "site")
    assert build.returncode == 0, build.stderr
    html = (tiny_project / "site" / "page" / "index.html").read_text()
    assert 'href="../repository/benchmarks/speed.py"' in html and 'href="../"' in html
    assert (tiny_project / "site" / "repository" / "benchmarks" / "speed.py").read_text() == "print('fast')\n"
    assert 'href="page/#a-section"' in (tiny_project / "site" / "index.html").read_text()


@pytest.mark.parametrize("link", ["../benchmarks/missing.py", "page.md#no-such-section"])
def test_broken_links_fail_the_build(tiny_project, link):
    (tiny_project / "docs" / "page.md").write_text(f"# Page\n\n[broken]({link})\n")
    build = mkdocs_build(tiny_project / "mkdocs.yml", tiny_project / "site")
    assert build.returncode != 0
    assert link.split("#")[-1] in build.stderr
