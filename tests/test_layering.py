"""The package's layers (docs/development.md): a module imports only from its own layer or lower ones.

Read from the source with ``ast``, lazy imports inside functions included, so a violation fails here
before it shows up as a tangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed package name -> folder in the repository (see [tool.setuptools.package-dir])
FOLDERS = {"dymu_lightning": ROOT / "dymu_lightning", "dymu_lightning.backbones": ROOT / "backbones"}

# module prefix -> layer; the longest matching prefix decides. Lower layers never import higher ones.
LAYERS: dict[str, int] = {
    "dymu_lightning.core": 0,
    "dymu_lightning.core.rotary_units": 0,  # DToMe in rotary towers that fold cells (Qwen-VL)
    "dymu_lightning.files": 0,
    "dymu_lightning.plots": 0,
    "dymu_lightning.assets.paths": 0,
    "dymu_lightning.recipes": 0,
    "dymu_lightning.config": 1,
    "dymu_lightning.data": 1,
    "dymu_lightning.backbones": 2,
    "dymu_lightning.backbones.hf_qwen_vl": 2,
    "dymu_lightning.backbones.hf_qwen_vl_lm": 2,
    "dymu_lightning.loading": 3,
    "dymu_lightning.testing": 3,
    "dymu_lightning.demo": 3,
    "dymu_lightning.merges": 3,
    "dymu_lightning.lit": 4,  # task runners: calibration ...
    "dymu_lightning.eval": 4,  # ... evaluation, which do not import each other ...
    "dymu_lightning.finetune": 4,  # ... and fine-tuning
    "dymu_lightning.finetune.study": 5,
    "dymu_lightning.vlm": 4,  # ... and the small LLaVA as a VLM (alignment, class-name scoring)
    "dymu_lightning.vlm.study": 5,
    "dymu_lightning.eval.studies": 5,  # studies that run several tasks, and the asset tools
    "dymu_lightning.assets": 5,
    "dymu_lightning.cli": 6,
    "dymu_lightning.__main__": 6,
}
# Same-layer packages that must stay independent of each other.
APART = [("dymu_lightning.lit", "dymu_lightning.eval"), ("dymu_lightning.eval", "dymu_lightning.lit")]
# core/ is pure torch: none of the host frameworks or the training stack.
CORE_FORBIDDEN = ("lightning", "timm", "transformers", "omegaconf", "webdataset", "torchmetrics", "PIL")


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found.setdefault(name, path)
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            # `from dymu_lightning import assets` imports a module, not a name
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return names


def layer(module: str) -> int | None:
    if module == "dymu_lightning":  # the package's face: it imports nothing
        return 0
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_has_a_layer(module):
    assert layer(module) is not None, f"{module}: add it to LAYERS here and to docs/development.md"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = layer(module)
    upward = []
    for imported in _imports(module, MODULES[module]):
        if not imported.startswith("dymu_lightning"):
            continue
        theirs = layer(imported)
        if theirs is not None and theirs > own:
            upward.append(f"{imported} (layer {theirs})")
        for a, b in APART:
            if _inside(module, a) and _inside(imported, b) and layer(module) == layer(imported):
                upward.append(f"{imported} (same layer as {a}, kept apart)")
    assert not upward, f"{module} (layer {own}) imports upward: {', '.join(sorted(upward))}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _inside(m, "dymu_lightning.core")))
def test_core_is_pure_torch(module):
    found = {i.split(".")[0] for i in _imports(module, MODULES[module])} & set(CORE_FORBIDDEN)
    assert not found, f"{module} imports {sorted(found)}; core/ is pure torch"


def test_runtime_code_never_imports_the_asset_fetchers():
    """Fetching shells out to pip and apt-get: only the tools (layer 5 and up) may import it."""
    fetchers = ("dymu_lightning.assets.fetch", "dymu_lightning.assets.small_llava")
    offenders = [
        module
        for module in MODULES
        if layer(module) < 5 and any(_inside(i, f) for i in _imports(module, MODULES[module]) for f in fetchers)
    ]
    assert not offenders


def test_an_upward_import_is_caught(tmp_path):
    """The check itself: a core module that imports the CLI is reported."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from dymu_lightning.cli import main\n")
    imported = _imports("dymu_lightning.core.bad", path)
    assert "dymu_lightning.cli" in imported and layer("dymu_lightning.cli") > layer("dymu_lightning.core.bad")
