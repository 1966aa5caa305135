"""Finding, loading and validating recipes.

A recipe is a YAML file: one of ours (``recipes/NAME.yaml``, installed as ``dymu_lightning.recipes``)
or any path. It is merged onto the typed schema of its ``task``, then ``key=value`` overrides are
merged on top. Every error names the recipe file, the full key and, for unknown keys, the closest
valid key.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from dymu_lightning.config.schema import SCHEMAS


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message says which key, in which file, and why."""


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the typed config, the file it came from and the overrides applied."""

    config: DictConfig
    path: Path
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.path.stem

    def to_object(self) -> Any:
        """The config as schema dataclass instances (every mandatory value filled)."""
        try:
            return OmegaConf.to_object(self.config)
        except MissingMandatoryValue as error:
            raise ConfigError(
                f"{self.path}: '{error.full_key}' has no value; set it in the recipe or with {error.full_key}=..."
            ) from None
        except OmegaConfBaseException as error:
            raise ConfigError(f"{self.path}: '{error.full_key}': {_first_line(error)}") from None


def packaged_recipes() -> dict[str, Path]:
    """Our recipes by name."""
    folder = resources.files("dymu_lightning.recipes")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def find_recipe(name: str | os.PathLike[str]) -> Path:
    """A packaged recipe by name, or a YAML file by path."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in str(name):
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return path
    recipes = packaged_recipes()
    if str(name) not in recipes:
        close = difflib.get_close_matches(str(name), recipes, n=2, cutoff=0.4)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown recipe {str(name)!r}.{hint} Packaged recipes: {', '.join(sorted(recipes))}")
    return recipes[str(name)]


def load_recipe(name: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge onto its schema, apply ``key=value`` overrides, validate."""
    path = find_recipe(name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    task = data.get("task", "calibrate")
    if task not in SCHEMAS:
        raise ConfigError(f"{path}: unknown task {task!r}; expected one of {sorted(SCHEMAS)}")
    schema = OmegaConf.structured(SCHEMAS[task])
    try:
        loaded = OmegaConf.create(data)
    except OmegaConfBaseException as error:
        raise ConfigError(f"recipe {path}: {_first_line(error)} (key '{getattr(error, 'full_key', '')}')") from None
    config = _merge(schema, loaded, f"recipe {path}")
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        if override.startswith(("+", "~")):
            raise ConfigError(f"override {override!r}: '+key' and '~key' are not supported; every key is in the schema")
        config = _merge(config, OmegaConf.from_dotlist([override]), f"override {override!r} (recipe {path})")
    return Recipe(config=config, path=path, overrides=tuple(overrides))


def _merge(base: DictConfig, update: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as error:
        key = str(error.full_key)
        parent = key.rpartition(".")[0]
        valid = _keys_at(base, parent)
        close = difflib.get_close_matches(key.rpartition(".")[2], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown key '{key}'{hint} Valid keys here: {', '.join(valid)}") from None
    except ValidationError as error:
        raise ConfigError(f"{where}: wrong type for '{error.full_key}': {_first_line(error)}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {_first_line(error)} (key '{getattr(error, 'full_key', '')}')") from None


def _keys_at(config: DictConfig, dotted: str) -> list[str]:
    node = OmegaConf.select(config, dotted) if dotted else config
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0]
