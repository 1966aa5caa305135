"""``python -m dymu_lightning finetune_study``: how much of DyMU's accuracy loss light adaptation recovers.

On Fashion-MNIST with the real DINOv2-S (the ``eval_encoder`` probe protocol's data: labels from the
file names, train and test never mixed), for each DyMU variant (thresholds calibrated on training
images, labels unused):

- ``full + head``: a linear head trained on the full model's features (the reference);
- ``DyMU, training-free``: that head applied to DyMU's merged features (and ``ToMe, training-free``: to
  ToMe's at DyMU's mean count, matched on the calibration images);
- ``DyMU + head`` / ``+ LoRA`` / ``+ BitFit``: trained with merging on, and the same for ToMe.

Every run is an ordinary recipe run (``quickstart`` calibrations, ``finetune_encoder`` fits) whose
command line the page lists. Accuracies are compared per image (paired 95% intervals) against the full
model and against ToMe with the same adaptation.
"""

from __future__ import annotations

import csv
import json
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dymu_lightning.eval.metrics import paired_difference
from dymu_lightning.eval.page import (
    RECORDED_COMMANDS,
    STUDY_PLOT,
    SUMMARY,
    refresh_finetune_section,
    with_cache_variable,
)
from dymu_lightning.files import write_text_atomic
from dymu_lightning.plots import pyplot

ADAPTATIONS = ("head", "lora", "bitfit")
# DyMU low / mid / high targets (tokens left) per side: the results page's, about 15 / 34 / 68% of the full count
TOKENS_LEFT = {112: {"low": 10, "mid": 22, "high": 44}, 224: {"low": 40, "mid": 87, "high": 176}}


def run_study(
    work: Path,
    variants: Sequence[str],
    train: int,
    test: int,
    calibration: int,
    epochs: int,
    adaptations: Sequence[str] = ADAPTATIONS,
    extra: Sequence[str] = (),
    size: int = 112,
    encoder_lr: dict[str, float] | None = None,
    recalibrate: bool = False,
) -> dict[str, Any]:
    """Calibrate, fit and evaluate; returns the collected study (also written to ``work/study.json``).

    ``encoder_lr`` maps an adaptation (lora, bitfit) to its encoder learning rate
    (``optimizer.encoder_lr``); ``recalibrate`` gives DyMU runs that adapt the encoder their own
    thresholds after training (``reduction.recalibrate``). A finished run is reused only if it ran
    with the same overrides."""
    from dymu_lightning.config.recipes import load_recipe
    from dymu_lightning.data.fashion_mnist import fashion_mnist_images
    from dymu_lightning.eval.studies import ieee_float32
    from dymu_lightning.finetune.run import finetune
    from dymu_lightning.lit.run import calibrate

    started = time.perf_counter()
    reused: list[Path] = []  # runs an earlier invocation finished (their time is not in this one's)
    commands: list[str] = []

    def run(recipe: str, overrides: list[str]) -> Path:
        commands.append(shlex.join(["python", "-m", "dymu_lightning", f"recipe={recipe}", *overrides]))
        loaded = load_recipe(recipe, overrides)
        calibration = loaded.config.task == "calibrate"
        done = Path(loaded.config.out_dir) / ("thresholds.json" if calibration else "results.json")
        if _ran_with(done, calibration) == overrides:  # an interrupted study continues where it stopped
            reused.append(done)
            return done
        return calibrate(loaded) if calibration else finetune(loaded)

    folders = {
        "train": fashion_mnist_images("train", train),
        "test": fashion_mnist_images("test", test),
        "calibration": fashion_mnist_images("train", calibration),
    }
    shards = {name: work / "shards" / folder.name for name, folder in folders.items()}
    data = [
        f"data.train_images={folders['train']}",
        f"data.train_shards={shards['train']}",
        f"data.val_images={folders['test']}",
        f"data.val_shards={shards['test']}",
        f"trainer.max_epochs={epochs}",
        f"model.image_size={size}",
        "trainer.progress_bar=false",
        "resume=false",
        *extra,
    ]
    with ieee_float32():
        thresholds = {}
        for variant in variants:
            thresholds[variant] = run(
                "quickstart",
                [
                    f"out_dir={work}/calibrate/{variant}",
                    f"data.images={folders['calibration']}",
                    f"data.shards={shards['calibration']}",
                    "data.global_batch_size=16",
                    "schedule.r=null",
                    f"schedule.tokens_left={TOKENS_LEFT[size][variant]}",
                    f"model.image_size={size}",
                    "trainer.accelerator=cpu",
                    "trainer.progress_bar=false",
                    "resume=false",
                ],
            )
        evaluate = []
        for variant in variants:
            evaluate += [
                f"evaluate.dymu_{variant}.kind=dymu",
                f"evaluate.dymu_{variant}.thresholds={thresholds[variant]}",
                f"evaluate.tome_{variant}.kind=tome",
                f"evaluate.tome_{variant}.thresholds={thresholds[variant]}",
            ]
        runs = {"full_head": run("finetune_encoder", [f"out_dir={work}/full_head", *data, *evaluate])}
        for method in adaptations:
            if method != "head":
                runs[f"full_{method}"] = run(
                    "finetune_encoder",
                    [
                        f"out_dir={work}/full_{method}",
                        *data,
                        f"adaptation.method={method}",
                        *_encoder_lr(encoder_lr, method),
                    ],
                )
        for variant in variants:
            for kind in ("dymu", "tome"):
                for method in adaptations:
                    name = f"{kind}_{variant}_{method}"
                    runs[name] = run(
                        "finetune_encoder",
                        [
                            f"out_dir={work}/{name}",
                            *data,
                            f"adaptation.method={method}",
                            *_encoder_lr(encoder_lr, method),
                            f"reduction.kind={kind}",
                            f"reduction.thresholds={thresholds[variant]}",
                            *(
                                ["reduction.recalibrate=true"]
                                if recalibrate and kind == "dymu" and method != "head"
                                else []
                            ),
                        ],
                    )
    study = collect(work, runs, variants, adaptations)
    study.update(
        commands=commands,
        seconds=time.perf_counter() - started,
        reused=len(reused),
        train=train,
        test=test,
        calibration=calibration,
        epochs=epochs,
    )
    (work / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    return study


def _ran_with(done: Path, calibration: bool) -> list[str] | None:
    """The overrides a finished run (its thresholds.json or results.json) was started with."""
    if not done.is_file():
        return None
    recorded = json.loads(done.read_text())
    return (recorded.get("extra", {}) if calibration else recorded).get("overrides")


def _encoder_lr(encoder_lr: dict[str, float] | None, method: str) -> list[str]:
    lr = (encoder_lr or {}).get(method)
    return [] if lr is None else [f"optimizer.encoder_lr={lr}"]


def parse_encoder_lr(values: Sequence[str]) -> dict[str, float]:
    """``["lora=3e-4", "bitfit=1e-3"]`` (or one number for both) -> ``{method: lr}``."""
    if len(values) == 1 and "=" not in values[0]:
        values = [f"{method}={values[0]}" for method in ADAPTATIONS if method != "head"]
    parsed = {}
    for value in values:
        method, _, lr = value.partition("=")
        if method not in ADAPTATIONS[1:]:
            raise ValueError(f"--encoder-lr: {value!r}; expected lora=LR or bitfit=LR (the head uses optimizer.lr)")
        try:
            parsed[method] = float(lr)
        except ValueError:
            raise ValueError(f"--encoder-lr: {value!r}: {lr!r} is not a number") from None
    return parsed


def partial_study(
    work: Path,
    variants: Sequence[str],
    adaptations: Sequence[str],
    train: int,
    test: int,
    calibration: int,
    epochs: int,
) -> dict[str, Any]:
    """The study from the runs an interrupted invocation finished (their own recorded commands)."""
    from dymu_lightning.backbones.thresholds import ThresholdsFile

    names = ["full_head"] + [f"full_{m}" for m in adaptations if m != "head"]
    names += [f"{k}_{v}_{m}" for v in variants for k in ("dymu", "tome") for m in adaptations]
    runs = {name: work / name / "results.json" for name in names}
    commands = []
    for variant in variants:
        extra = ThresholdsFile.load(work / "calibrate" / variant / "thresholds.json").extra
        commands.append(
            shlex.join(["python", "-m", "dymu_lightning", f"recipe={Path(extra['recipe']).stem}", *extra["overrides"]])
        )
    commands += [json.loads(path.read_text())["command"] for path in runs.values() if path.is_file()]
    study = collect(work, runs, variants, adaptations)
    seconds = sum(json.loads(path.read_text())["wall_seconds"] for path in runs.values() if path.is_file())
    missing = [name for name, path in runs.items() if not path.is_file()]
    study.update(commands=commands, seconds=seconds, train=train, test=test, calibration=calibration, epochs=epochs)
    study["missing"] = missing
    return study


def _correct(out_dir: Path, evaluation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[n]`` bool correct, ``[n]`` tokens) per test image in index order, for one evaluation of a run."""
    with open(out_dir / "per_image.csv") as stream:
        rows = sorted(csv.DictReader(stream), key=lambda row: int(row["index"]))
    correct = torch.tensor([row["label"] == row[f"predicted:{evaluation}"] for row in rows])
    tokens = torch.tensor([int(row[f"tokens:{evaluation}"]) for row in rows])
    return correct, tokens


def collect(work: Path, runs: dict[str, Path], variants: Sequence[str], adaptations: Sequence[str]) -> dict[str, Any]:
    """Rows of the study table: accuracy, tokens, cost, and paired differences."""
    runs = {name: Path(path) for name, path in runs.items() if Path(path).is_file()}  # a partial study: what ran
    results = {name: json.loads(path.read_text()) for name, path in runs.items()}
    full = results["full_head"]
    rows: list[dict[str, Any]] = []

    def add(label: str, variant: str, kind: str, method: str, run: str, evaluation: str) -> None:
        if run not in results or evaluation not in results[run]["evaluations"]:
            return
        result = results[run]
        trained = evaluation in ("trained", "before_recalibration")  # the run's own training, not a reuse
        correct, tokens = _correct(Path(runs[run]).parent, evaluation)
        rows.append(
            {
                "label": label,
                "variant": variant,
                "kind": kind,
                "method": method,
                "run": run,
                "evaluation": evaluation,
                "accuracy": float(correct.double().mean()),
                "tokens_mean": float(tokens.double().mean()),
                "tokens_std": float(tokens.double().std(correction=0)),
                "trainable_parameters": result["trainable_parameters"] if trained else 0,
                "training_images_per_second": result["training_images_per_second"] if trained else None,
                "wall_seconds": result["wall_seconds"] if trained else None,
                "command": result["command"],
                "_correct": correct,
            }
        )

    add("full + head", "-", "full", "head", "full_head", "trained")
    for method in adaptations:
        if method != "head":  # the reference for the same adaptation with merging
            add(f"full + {method}", "-", "full", method, f"full_{method}", "trained")
    for variant in variants:
        add(f"DyMU-{variant}, training-free", variant, "dymu", "none", "full_head", f"dymu_{variant}")
        add(f"ToMe@{variant}, training-free", variant, "tome", "none", "full_head", f"tome_{variant}")
        for method in adaptations:
            for kind, shown in (("dymu", f"DyMU-{variant}"), ("tome", f"ToMe@{variant}")):
                add(f"{shown} + {method}", variant, kind, method, f"{kind}_{variant}_{method}", "trained")
            # a recalibrated run also scored its adapted encoder with the stock encoder's thresholds
            run = f"dymu_{variant}_{method}"
            add(f"DyMU-{variant} + {method}, stock thresholds", variant, "stale", method, run, "before_recalibration")
    reference = rows[0]["_correct"]
    full_same = {row["method"]: row for row in rows if row["kind"] == "full"}
    for row in rows:
        if row is not rows[0]:
            row["vs_full"] = paired_difference(row["_correct"], reference)
        same = full_same.get(row["method"])
        if row["kind"] != "full" and row["method"] != "head" and same is not None:
            row["vs_full_same"] = paired_difference(row["_correct"], same["_correct"])
        twins = [
            r for r in rows if r["kind"] == "tome" and (r["variant"], r["method"]) == (row["variant"], row["method"])
        ]
        if row["kind"] == "dymu" and twins:
            row["vs_tome"] = paired_difference(row["_correct"], twins[0]["_correct"])
    for row in rows:
        del row["_correct"]
    return {
        "rows": rows,
        "machine": full["machine"],
        "image_size": full["image_size"],
        "full_tokens": full["full_tokens"],
    }


def render(study: dict[str, Any], page: Path, command: str) -> Path:
    """The study as a markdown page, with a plot of accuracy against tokens and the results page's
    summary (:func:`summary`) next to it."""
    plot = _plot(study, page.parent / page.stem / STUDY_PLOT)
    write_text_atomic(page.parent / page.stem / SUMMARY, summary(study, page.stem))
    rows = study["rows"]
    lines = [
        "# Fine-tuning with token reduction: results",
        "",
        f"Generated by `{with_cache_variable(command)}` ({study['seconds'] / 60:.0f} min on {study['machine']}"
        + (f", reusing {study['reused']} runs an earlier invocation finished" if study.get("reused") else "")
        + "; "
        "the machine was shared with other jobs, so the speeds are indicative only). "
        "Method and commands: [finetune.md](finetune.md).",
        "",
        f"Real DINOv2-S (frozen except what the adaptation trains) on Fashion-MNIST at {study['image_size']} px "
        f"({study['full_tokens']} tokens unmerged): trained on the first {study['train']} training images for "
        f"{study['epochs']} epoch(s), tested on the first {study['test']} test images. DyMU thresholds were "
        f"calibrated on the first {study['calibration']} training images (labels unused); ToMe's fixed r matches "
        "the mean count DyMU reached there. Every run has the same optimiser, steps and seed.",
        "",
        f"At {study['test']} test images one image is {100 / study['test']:.1f} points; the intervals are paired "
        "95% intervals over the same test images (`dymu_lightning.eval.metrics.paired_difference`).",
        "",
        "| variant | tokens per image | accuracy | vs full + head | vs full, same adaptation "
        "| vs ToMe, same adaptation | trainable params | training images/s | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['label']} | {row['tokens_mean']:.1f} ± {row['tokens_std']:.1f} | {100 * row['accuracy']:.1f}% "
            f"| {_pair(row.get('vs_full'))} | {_pair(row.get('vs_full_same'))} | {_pair(row.get('vs_tome'))} "
            f"| {row['trainable_parameters']:,} "
            f"| {_number(row['training_images_per_second'])} | {_number(row['wall_seconds'], 0)} |"
        )
    lines += [
        "",
        "Training-free rows reuse the full model's head (no training of their own: 0 parameters). Training "
        "images/s counts forward, backward and optimiser step (data loading excluded); wall time is the whole "
        "run, the final evaluation included (training-free runs also evaluate the other reductions).",
        "",
        f"![accuracy against tokens]({plot.relative_to(page.parent)})",
        "",
        *(
            [f"Not run (the invocation was stopped to meet a deadline): {', '.join(study['missing'])}.", ""]
            if study.get("missing")
            else []
        ),
        "## Commands",
        "",
        RECORDED_COMMANDS,
        "```bash",
        *(with_cache_variable(command) for command in study["commands"]),
        "```",
        "",
    ]
    return write_text_atomic(page, "\n".join(lines))


def summary(study: dict[str, Any], stem: str) -> str:
    """The study in one table for docs/results.md: per level, accuracy of DyMU / ToMe training-free and
    under each adaptation; paths relative to the folder of the study page ``stem``.md."""
    rows = {(row["kind"], row["variant"], row["method"]): row for row in study["rows"]}
    methods = [m for m in ADAPTATIONS if any(key[2] == m for key in rows)]
    variants = [v for v in ("low", "mid", "high") if ("dymu", v, "none") in rows]

    def accuracy(kind: str, variant: str, method: str) -> str:
        row = rows.get((kind, variant, method))
        return "-" if row is None else f"{100 * row['accuracy']:.1f}%"

    lines = [
        f"**Study 1** ([{stem}.md]({stem}.md); {study['train']} training and {study['test']} test images at "
        f"{study['image_size']} px, {study['full_tokens']} tokens unmerged). Each cell is DyMU / ToMe at DyMU's "
        "mean count; the full model's row has no merging.",
        "",
        "| level | tokens per image | training-free | " + " | ".join(f"+ {m}" for m in methods) + " |",
        "|---" * (3 + len(methods)) + "|",
        f"| full | {study['full_tokens']} | - | " + " | ".join(accuracy("full", "-", m) for m in methods) + " |",
    ]
    for v in variants:
        cells = [f"{accuracy('dymu', v, m)} / {accuracy('tome', v, m)}" for m in ("none", *methods)]
        lines.append(f"| {v} | {rows['dymu', v, 'none']['tokens_mean']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", f"![{stem}: accuracy against tokens]({stem}/{STUDY_PLOT})", ""])


def _pair(pair: dict[str, float] | None) -> str:
    if pair is None:
        return "-"
    return f"{100 * pair['difference']:+.1f} [{100 * pair['low']:+.1f}, {100 * pair['high']:+.1f}]"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _plot(study: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(8, 4))
    styles = {
        "none": ("o", "training-free"),
        "head": ("s", "+ head"),
        "lora": ("^", "+ LoRA"),
        "bitfit": ("D", "+ BitFit"),
    }
    colours = {"full": "black", "dymu": "tab:blue", "tome": "tab:orange", "stale": "tab:gray"}
    names = {"full": "full", "dymu": "DyMU", "tome": "ToMe", "stale": "DyMU, stock thresholds"}
    for row in study["rows"]:
        marker, _ = styles[row["method"]]
        axis.scatter(row["tokens_mean"], 100 * row["accuracy"], marker=marker, color=colours[row["kind"]], s=40)
    for marker, label in styles.values():
        axis.scatter([], [], marker=marker, color="grey", label=label)
    for kind, colour in colours.items():
        if any(row["kind"] == kind for row in study["rows"]):
            axis.scatter([], [], marker="o", color=colour, label=names[kind])
    axis.set_xlabel("tokens per image at the encoder output (mean)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_title("DINOv2-S on Fashion-MNIST: training-free vs adapted vs ToMe", fontsize=9)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: points fill the axes
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def run_command(
    work: Path,
    page: Path,
    variants: list[str],
    adaptations: list[str],
    train: int,
    test: int,
    calibration: int,
    epochs: int,
    size: int,
    render_only: bool,
    overrides: list[str],
    encoder_lr: list[str] | None = None,
    recalibrate: bool = False,
) -> int:
    """The ``finetune_study`` command: run (or, with ``render_only``, only render) the study."""
    encoder_lrs = parse_encoder_lr(encoder_lr or [])
    for key, given, allowed in (
        ("--variants", variants, ("low", "mid", "high")),
        ("--adaptations", adaptations, ADAPTATIONS),
    ):
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(f"{key}: unknown {', '.join(unknown)}; expected some of {', '.join(allowed)}")
    if size not in TOKENS_LEFT:
        raise ValueError(f"--size: expected one of {sorted(TOKENS_LEFT)}, got {size}")
    command = shlex.join(
        ["python", "-m", "dymu_lightning", "finetune_study", "--work", str(work), "--page", str(page)]
        + ["--variants", *variants, "--adaptations", *adaptations, "--train", str(train), "--test", str(test)]
        + (["--encoder-lr", *encoder_lr] if encoder_lr else [])  # before an option: it takes several values
        + (["--recalibrate"] if recalibrate else [])
        + ["--calibration", str(calibration), "--epochs", str(epochs), "--size", str(size), *overrides]
    )
    if render_only and (work / "study.json").is_file():
        study = json.loads((work / "study.json").read_text())
    elif render_only:
        study = partial_study(work, variants, adaptations, train, test, calibration, epochs)
    else:
        study = run_study(
            work, variants, train, test, calibration, epochs, adaptations, overrides, size, encoder_lrs, recalibrate
        )
        study["command"] = command
        write_text_atomic(work / "study.json", json.dumps(study, indent=2) + "\n")
    render(study, page, study.get("command", command))
    print(f"wrote {page}")
    results = refresh_finetune_section(page.parent / "results.md")
    if results is not None:
        print(f"updated the fine-tuning section of {results}")
    return 0
