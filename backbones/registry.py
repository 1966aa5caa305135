"""Backbone adapters by stable name.

Three sources fill the registry, in this order:
1. our built-in adapters, listed below by import path and imported only when first asked for (so a
   timm user never imports transformers);
2. third-party packages, through the entry-point group ``dymu_lightning.backbones``; each entry
   point names a :class:`Backbone` subclass or a zero-argument factory returning an instance;
3. :func:`register_backbone`, as a decorator in user code. A registration made in this process wins
   over a third-party entry point of the same name, whichever comes first. From the command line,
   a recipe's ``plugins`` key names the modules to import (with their registrations) before the
   backbone is looked up; see :func:`import_plugins`.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import entry_points

from torch import nn

from dymu_lightning.backbones.base import Backbone

ENTRY_POINT_GROUP = "dymu_lightning.backbones"

BackboneFactory = Callable[[], Backbone]

_BUILTIN: dict[str, str] = {
    "timm_vit": "dymu_lightning.backbones.timm_vit:TimmViT",
    "hf_clip": "dymu_lightning.backbones.hf_vit:HFCLIPVision",
    "hf_siglip": "dymu_lightning.backbones.hf_vit:HFSiglipVision",
    "hf_dinov2": "dymu_lightning.backbones.hf_vit:HFDinov2",
    "dinov2_vits14_offline": "dymu_lightning.backbones.hf_vit:OfflineDinov2Small",
    "hf_qwen2_vl": "dymu_lightning.backbones.hf_qwen_vl:HFQwen2VLVision",
    "hf_qwen2_5_vl": "dymu_lightning.backbones.hf_qwen_vl:HFQwen25VLVision",
    "hf_qwen3_vl": "dymu_lightning.backbones.hf_qwen3_vl:HFQwen3VLVision",
}


class UnknownBackboneError(KeyError):
    """No backbone of that name; the message lists close matches and every registered name."""

    def __str__(self) -> str:
        # KeyError would print the repr of its argument, quotes and escapes included.
        return str(self.args[0])


class BackboneImportError(ValueError):
    """A registered backbone (an entry point, usually) whose module or attribute cannot be imported."""


_registry: dict[str, BackboneFactory | str] = dict(_BUILTIN)
_in_process: set[str] = set()  # names registered by register_backbone: entry points do not replace them
_entry_points_loaded = False


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register a :class:`Backbone` subclass (or zero-argument factory) under ``name``.

    Registering a name twice replaces the first entry and warns.
    """

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        _add(name, factory, origin="register_backbone")
        return factory

    return decorator


def get_backbone(name: str) -> Backbone:
    """A fresh adapter instance for ``name``; a KeyError with close matches if there is none."""
    _load_entry_points()
    if name not in _registry:
        close = difflib.get_close_matches(name, _registry, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownBackboneError(f"unknown backbone {name!r}.{hint} Registered: {', '.join(sorted(_registry))}")
    factory = _registry[name]
    if isinstance(factory, str):
        try:
            factory = _import(factory)
        except Exception as error:  # a broken plugin: any error its import raises
            raise BackboneImportError(
                f"backbone {name!r} is registered to {factory}, which cannot be imported "
                f"({type(error).__name__}: {error}); fix or uninstall the package that provides it"
            ) from error
    backbone = factory()
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone {name!r} is registered to {factory!r}, which did not return a Backbone")
    backbone.name = name
    return backbone


def find_backbone(model: nn.Module) -> Backbone:
    """The first registered adapter (built-ins first, in registration order) whose
    :meth:`~Backbone.handles` claims ``model``; a TypeError naming the model's class if none does."""
    _load_entry_points()
    for name in list(_registry):
        backbone = get_backbone(name)
        if backbone.handles(model):
            return backbone
    raise TypeError(
        f"no registered backbone adapts a {type(model).__name__}; register one whose handles() accepts it "
        "(docs/backbones.md)"
    )


def list_backbones() -> list[str]:
    """Every registered name, sorted."""
    _load_entry_points()
    return sorted(_registry)


def import_plugins(modules: list[str], where: str = "plugins") -> None:
    """Import each module of ``modules`` (dotted names, importable from ``sys.path`` or the current
    folder), so that its :func:`register_backbone` calls run; a ValueError naming the module if one
    cannot be imported. The current folder is searched too, as ``python -m`` would (the ``dymu``
    script does not put it on ``sys.path``)."""
    if modules and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:
            raise ValueError(f"{where}: cannot import {module!r} ({type(error).__name__}: {error})") from error


def _add(name: str, factory: BackboneFactory | str, origin: str) -> None:
    if origin == "register_backbone":
        _in_process.add(name)
    elif name in _in_process:
        return  # an entry point never replaces what this process registered
    if name in _registry:
        warnings.warn(
            f"backbone {name!r} is registered twice; the entry from {origin} replaces the earlier one",
            stacklevel=3,
        )
    _registry[name] = factory


def _import(path: str) -> BackboneFactory:
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        _add(point.name, point.value, origin=f"entry point {point.value}")
