"""`python -m dymu_lightning [COMMAND] recipe=NAME key=value ...`

Commands:
  (none)   run the recipe:                python -m dymu_lightning recipe=quickstart out_dir=runs/q
  ls       list recipes and backbones:    python -m dymu_lightning ls
  show     print the resolved config:     python -m dymu_lightning show recipe=llava_calib schedule.variant=low
  check    validate without loading:      python -m dymu_lightning check recipe=clip_calib
  shards   write webdataset shards:       python -m dymu_lightning shards SRC_DIR OUT_DIR [--shard-size N]
  demo     DToMe on real photos:          python -m dymu_lightning demo
  results  measure and write the results: python -m dymu_lightning results [--out docs] (docs/evaluation.md)

Recipes are YAML files in recipes/ (or a path); `key=value` overrides any key of the recipe's schema
(docs/configuration.md).
"""

from __future__ import annotations

import sys

COMMANDS = ("ls", "show", "check", "shards", "demo", "results")


def split_arguments(argv: list[str]) -> tuple[str, str | None, list[str]]:
    """(command, recipe, overrides) from ``argv``; the command defaults to ``run``."""
    command = "run"
    if argv and argv[0] in COMMANDS:
        command, argv = argv[0], argv[1:]
    recipe = None
    overrides = []
    for argument in argv:
        if argument.startswith("recipe="):
            recipe = argument.partition("=")[2]
        else:
            overrides.append(argument)
    return command, recipe, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if argv else 2
    command, recipe_name, overrides = split_arguments(argv)

    if command == "demo":
        from dymu_lightning.demo import main as demo_main

        demo_main(*_demo_arguments(overrides))
        return 0
    if command == "shards":
        from dymu_lightning.data.shards import main as shards_main

        return shards_main(overrides)
    if command == "ls":
        return _list()
    if command == "results":
        from dymu_lightning.eval.results import main as results_main

        return results_main(overrides)

    from omegaconf.errors import OmegaConfBaseException

    from dymu_lightning.config.recipes import ConfigError, load_recipe

    try:
        if recipe_name is None:
            raise ConfigError(f"'{command}' needs recipe=NAME (see `python -m dymu_lightning ls`)")
        recipe = load_recipe(recipe_name, overrides)
        if command == "show":
            from omegaconf import OmegaConf

            print(f"# {recipe.path}" + (f" with {' '.join(recipe.overrides)}" if recipe.overrides else ""))
            print(OmegaConf.to_yaml(recipe.config, resolve=True), end="")
            return 0
        if recipe.config.task == "eval_encoder":
            from dymu_lightning.eval.run import check
            from dymu_lightning.eval.run import evaluate as run
        elif recipe.config.task == "finetune":
            from dymu_lightning.finetune.run import check
            from dymu_lightning.finetune.run import finetune as run
        else:
            from dymu_lightning.lit.run import calibrate as run
            from dymu_lightning.lit.run import check

        if command == "check":
            check(recipe)
            print(f"{recipe.path}: ok")
            return 0
        from dymu_lightning.lit.calibration import CollectiveError, Requeued

        try:
            run(recipe)
        except CollectiveError as error:
            # One line that says what happened and how to resume; gloo's own text is at its end.
            print(f"error: {error}", file=sys.stderr)
            return 1
        except Requeued as stopped:
            # Not a failure when the job went back to the queue: the requeued job finishes the work.
            print(f"{'note' if stopped.requeued else 'error'}: {stopped}", file=sys.stderr)
            return 0 if stopped.requeued else 1
        return 0
    except (ValueError, KeyError, FileNotFoundError, OmegaConfBaseException) as error:
        # Bad input (ConfigError is a ValueError) gets one line naming the problem, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2


def _list() -> int:
    from dymu_lightning.backbones import list_backbones
    from dymu_lightning.config.recipes import packaged_recipes

    print("recipes:")
    for name, path in sorted(packaged_recipes().items()):
        print(f"  {name:<20} {_first_comment(path)}")
    print("backbones:")
    for name in list_backbones():
        print(f"  {name}")
    return 0


def _first_comment(path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _demo_arguments(arguments: list[str]) -> tuple[int, object]:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m dymu_lightning demo")
    parser.add_argument("--r", type=int, default=12, help="target merges per layer for the thresholds")
    parser.add_argument("--images", type=Path, default=None, help="a folder of images (default: bundled photos)")
    args = parser.parse_args(arguments)
    return args.r, args.images
