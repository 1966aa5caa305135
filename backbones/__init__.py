"""Vision backbone adapters, by registry name. See docs/backbones.md."""

from dymu_lightning.backbones.base import Backbone, PatchState, TinyConfig, is_patched
from dymu_lightning.backbones.registry import (
    ENTRY_POINT_GROUP,
    find_backbone,
    get_backbone,
    list_backbones,
    register_backbone,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backbone",
    "PatchState",
    "TinyConfig",
    "find_backbone",
    "get_backbone",
    "is_patched",
    "list_backbones",
    "register_backbone",
]
