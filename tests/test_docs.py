"""Every ```python block in README.md and docs/*.md runs, in order, one namespace per page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dymu_lightning.backbones import registry

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
# Pages whose examples need the real offline weights (slow; `make assets` provides them).
NEEDS_ASSETS = {"assets.md", "calibration.md", "finetune.md", "inference.md", "quickstart.md"}


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


def page_params() -> list:
    return [
        pytest.param(page, id=page.name, marks=[pytest.mark.slow] if page.name in NEEDS_ASSETS else [])
        for page in PAGES
        if python_blocks(page)
    ]


@pytest.mark.parametrize("page", page_params())
def test_docs_code_runs(page, monkeypatch):
    # Examples may register backbones; keep them out of the session's registry.
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(python_blocks(page), start=1):
        code = compile(block, f"{page.name}[block {number}]", "exec")
        exec(code, namespace)


def test_every_doc_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}  # the site's home: README.md itself
    assert pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"


def test_the_slurm_template_in_the_docs_is_the_tested_file():
    """docs/calibration.md shows scripts/slurm/calibrate.sbatch verbatim (tests/test_slurm.py submits it)."""
    template = (ROOT / "scripts" / "slurm" / "calibrate.sbatch").read_text()
    assert f"```bash\n{template}```" in (ROOT / "docs" / "calibration.md").read_text()
