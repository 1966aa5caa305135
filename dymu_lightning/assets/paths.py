"""Where the offline assets live, for the code that reads them.

Everything sits under :func:`cache_dir`. Nothing here downloads or builds anything: a missing asset
is a :class:`MissingAssetError` that names the command which fetches it, so runtime code never shells
out to a package manager behind the user's back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

FETCH_COMMAND = "python -m dymu_lightning assets"

# The wheels also carry .tif and .gif test files (multi-page, animated); the photo sets are their PNG and
# JPEG files only, which is what every recorded result was measured on.
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg")

PhotoSet = Literal["skimage", "mvtb"]
PHOTO_SETS: tuple[str, ...] = ("skimage", "mvtb")


class MissingAssetError(FileNotFoundError):
    """An asset that ``python -m dymu_lightning assets`` (``make assets``) has not fetched yet."""


def cache_dir() -> Path:
    """Root of every asset: ``$DYMU_CACHE`` if set, else ``~/.cache/dymu_lightning``."""
    env = os.environ.get("DYMU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dymu_lightning"


def dinov2_small_dir() -> Path:
    """The ``save_pretrained`` directory of the offline DINOv2 ViT-S/14 (may not exist yet)."""
    return cache_dir() / "dinov2-vits14"


def smollm2_dir() -> Path:
    """The ``save_pretrained`` directory of SmolLM2-135M-Instruct in float32 (may not exist yet)."""
    return cache_dir() / "smollm2-135m"


def small_llava_dir() -> Path:
    """The ``save_pretrained`` directory of the small LLaVA (may not exist yet)."""
    return cache_dir() / "llava-dinov2s-smollm2"


def small_onevision_dir() -> Path:
    """The ``save_pretrained`` directory of the small LLaVA-OneVision (may not exist yet)."""
    return cache_dir() / "onevision-dinov2s-smollm2"


def small_llava_tower_dir() -> Path:
    """Its vision tower alone, with the LLaVA's 336 px preprocessing: what calibration loads
    (``recipes/small_llava_calib.yaml``)."""
    return small_llava_dir() / "vision_tower"


def photos_dir(name: PhotoSet) -> Path:
    """The folder of one bundled photo set (may not exist yet)."""
    if name not in PHOTO_SETS:
        raise ValueError(f"unknown photo set {name!r}; expected one of {PHOTO_SETS}")
    return cache_dir() / "images" / name


def fashion_mnist_idx_dir() -> Path:
    """The folder of Fashion-MNIST's four gzipped IDX files (may not exist yet)."""
    return cache_dir() / "fashion-mnist"


def list_photos(directory: Path) -> dict[str, Path]:
    """``{stem: path}`` of the photos in ``directory``, sorted by file name."""
    return {p.stem: p for p in sorted(directory.iterdir()) if p.suffix.lower() in PHOTO_SUFFIXES}


def photos(name: PhotoSet = "skimage") -> dict[str, Path]:
    """``{name: path}`` of a fetched photo set, e.g. ``photos()["chelsea"]``."""
    return list_photos(require(photos_dir(name), f"the {name} photos"))


def require(path: Path, what: str) -> Path:
    """``path`` if it exists, else a :class:`MissingAssetError` naming the fetch command."""
    if not path.exists():
        raise MissingAssetError(
            f"{what}: nothing at {path}. Fetch the offline assets once with `{FETCH_COMMAND}` (or `make assets`)."
        )
    return path
