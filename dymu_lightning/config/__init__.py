"""Recipes and their typed schemas."""

from dymu_lightning.config.recipes import ConfigError, Recipe, find_recipe, load_recipe, packaged_recipes

__all__ = ["ConfigError", "Recipe", "find_recipe", "load_recipe", "packaged_recipes"]
