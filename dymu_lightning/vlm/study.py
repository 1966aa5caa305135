"""``python -m dymu_lightning vlm_study``: Study 2, DyMU in the aligned small LLaVA (docs/vlm_results.md).

Zero-shot Fashion-MNIST classification by class-name likelihood (:mod:`dymu_lightning.vlm.scoring`)
with the small LLaVA whose projector ``align_small_llava`` trained, at 112 px (64 visual tokens).
Every reduction is scored on the same test images:

- the full model;
- DyMU low / mid / high, training-free, with VTU and without it (the merged rows as a plain shorter
  sequence at consecutive positions);
- ToMe (fixed r per layer) at DyMU's mean count on the calibration images, with and without VTU;
- light adaptation: the aligned projector trained further with merging on (DyMU + VTU, and ToMe +
  VTU for the same steps), ``--adaptations lora`` adds LoRA on the language model.

Thresholds are calibrated on training images (labels unused; paper Eq. 4 on one batch, as
``batch_thresholds`` does), the tokens left per variant as in Study 1. Accuracies are compared per
image with paired 95% intervals against the full model.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dymu_lightning.eval.metrics import paired_difference
from dymu_lightning.eval.page import STUDY_PLOT, SUMMARY, refresh_finetune_section
from dymu_lightning.files import write_text_atomic
from dymu_lightning.plots import pyplot

SIZE = 112
# Tokens left after the tower (CLS included) for DyMU low / mid / high: Study 1's targets at 112 px.
TOKENS_LEFT = {"low": 10, "mid": 22, "high": 44}


def _policies(model: Any, calibration: torch.Tensor, variants: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per variant: DyMU's thresholds from the calibration images and ToMe's r at DyMU's mean count."""
    from dymu_lightning.backbones import get_backbone
    from dymu_lightning.backbones.thresholds import batch_thresholds
    from dymu_lightning.core import MergePolicy
    from dymu_lightning.core.schedule import matched_fixed_r, merges_per_layer

    backbone, tower = get_backbone("hf_dinov2"), model.model.vision_tower
    layers, blocks = backbone.num_layers(tower), layers_read(model)
    tokens = (SIZE // tower.config.patch_size) ** 2 + 1
    found = {}
    for variant in variants:
        r = merges_per_layer(layers, tokens_left=TOKENS_LEFT[variant], tokens=tokens, merging_layers=blocks)
        thresholds = batch_thresholds(backbone, tower, calibration, r)
        dymu = MergePolicy(thresholds=thresholds)
        with torch.inference_mode():
            lengths = backbone.merged_forward(tower, calibration, dymu, num_blocks=blocks).lengths
        mean = float(lengths.double().mean())
        tome_r = matched_fixed_r(layers, tokens, mean, 1, blocks)
        found[variant] = {
            "r": r,
            "thresholds": thresholds,
            "calibration_tokens": mean,
            "tome_r": tome_r,
            "dymu": dymu,
            "tome": MergePolicy(mode="fixed_r", r=tome_r),
        }
    return found


def layers_read(model: Any) -> int:
    """Tower blocks before LLaVA's feature layer (11 of 12 for ``vision_feature_layer=-2``)."""
    layer = model.config.vision_feature_layer
    return layer if layer >= 0 else model.config.vision_config.num_hidden_layers + 1 + layer


def run_study(
    work: Path,
    variants: Sequence[str],
    adapt: Sequence[str],
    adaptations: Sequence[str],
    train: int,
    test: int,
    calibration: int,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Calibrate, adapt, score; returns the study (also written to ``work/study.json``)."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from dymu_lightning.assets.paths import small_llava_dir
    from dymu_lightning.backbones.hf_vit import dinov2_image_processor
    from dymu_lightning.vlm.align import AlignConfig, CaptionedImages, fit_align, pixel_tensor
    from dymu_lightning.vlm.captions import (
        TEMPLATES,
        answer_ids,
        caption_set,
        class_first_ids,
        prompt_ids,
        scoring_prefix_ids,
    )
    from dymu_lightning.vlm.evaluate import Reduction, classify

    started = time.perf_counter()
    directory = small_llava_dir()
    if not (directory / "dymu_alignment.json").is_file():
        raise FileNotFoundError(
            f"{directory} has no aligned projector; run `python -m dymu_lightning align_small_llava`"
        )
    tokenizer = AutoTokenizer.from_pretrained(directory)

    def load() -> Any:
        return LlavaForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()

    model = load()
    processor = dinov2_image_processor(SIZE, shortest_edge=SIZE)
    test_set = caption_set(f"fashion_mnist:test:{test}").require("test", "evaluation")
    test_pixels = pixel_tensor(test_set.paths, processor)
    calibration_set = caption_set(f"fashion_mnist:train:{calibration}").require("train", "calibration")
    policies = _policies(model, pixel_tensor(calibration_set.paths, processor), variants)

    labels = test_set.labels
    results: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, dict[str, Any]] = {}
    variant_facts = {
        v: {k: p[k] for k in ("r", "thresholds", "calibration_tokens", "tome_r")} for v, p in policies.items()
    }
    alignment = json.loads((directory / "dymu_alignment.json").read_text())
    facts = {
        "train": train,
        "test": test,
        "calibration": calibration,
        "variants": variant_facts,
        "alignment": alignment,
    }

    def record(name: str, info: dict[str, Any], score: Any) -> None:
        """Score one reduction (or read its saved scores) and write the study so far."""
        saved = work / "scores" / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}.json"
        if saved.is_file():  # an interrupted study continues where it stopped
            entry = json.loads(saved.read_text())
            info = entry["meta"]
        else:
            print(f"vlm study: {name}", flush=True)
            found = score()
            entry = {key: value.tolist() for key, value in found.items()} | {"meta": info}
            write_text_atomic(saved, json.dumps(entry) + "\n")
        results[name] = {key: torch.tensor(entry[key]) for key in ("predicted", "visual_rows")}
        meta[name] = info
        study = collect(results, meta, labels) | facts | {"seconds": time.perf_counter() - started}
        write_text_atomic(work / "study.json", json.dumps(study, indent=2) + "\n")

    def training_free(reduction: Reduction) -> None:
        info = {"kind": "full" if reduction.policy is None else "training-free", "trainable": 0}
        record(reduction.name, info, lambda: classify(model, tokenizer, test_pixels, [reduction])[reduction.name])

    # The adaptation trains as the alignment did: its caption templates, class loss and learning rate
    # (an older alignment without them: the four templates, captions only, 3e-4).
    templates, class_loss = alignment.get("templates", TEMPLATES), alignment.get("class_loss", 0.0)
    adapt_lr = alignment["learning_rate"] if "class_loss" in alignment else 3e-4
    train_set = caption_set(f"fashion_mnist:train:{train}", seed=1, templates=templates)
    train_set.require("train", "adaptation")
    patches = (SIZE // model.config.vision_config.patch_size) ** 2
    prompt = prompt_ids(tokenizer, model.config.image_token_id, patches)
    answers = answer_ids(tokenizer, train_set.captions, prompt.end)
    dataset = CaptionedImages(pixel_tensor(train_set.paths, processor), answers, labels=train_set.labels)
    classes = {
        "class_loss": class_loss,
        "class_first_ids": class_first_ids(tokenizer),
        "class_prefix": len(scoring_prefix_ids(tokenizer)),
    }

    def adapted(variant: str, kind: str, adaptation: str) -> None:
        name = f"{'DyMU-' if kind == 'dymu' else 'ToMe@'}{variant} + VTU, {adaptation} adapted"
        policy = policies[variant][kind]
        info: dict[str, Any] = {"kind": "adapted"}

        def score() -> dict[str, torch.Tensor]:
            trained = load()
            cfg = AlignConfig(
                out_dir=work / f"{kind}_{variant}_{adaptation}", seed=1, lr=adapt_lr, adaptation=adaptation,
                policy=policy, progress_bar=False, **classes,
            )  # fmt: skip
            _, _, fit = fit_align(trained, dataset, prompt, tokenizer.pad_token_id, cfg)
            info.update(
                lr=adapt_lr,
                trainable=fit["trainable_parameters"],
                images_per_second=fit["training_images_per_second"],
                steps=fit["global_steps"],
            )
            return classify(trained, tokenizer, test_pixels, [Reduction(name, policy, True)])[name]

        record(name, info, score)

    training_free(Reduction("full"))
    # The adapted variants first after their own training-free rows: the most telling rows come first.
    for variant in sorted(variants, key=lambda v: v not in adapt):
        found = policies[variant]
        training_free(Reduction(f"DyMU-{variant} + VTU", found["dymu"], True))
        training_free(Reduction(f"DyMU-{variant}, no VTU", found["dymu"], False))
        training_free(Reduction(f"ToMe@{variant} + VTU", found["tome"], True))
        training_free(Reduction(f"ToMe@{variant}, no VTU", found["tome"], False))
        if variant in adapt:
            for kind in ("dymu", "tome"):
                for adaptation in adaptations:
                    adapted(variant, kind, adaptation)
    return json.loads((work / "study.json").read_text())


def collect(results: dict[str, dict[str, torch.Tensor]], meta: dict[str, dict[str, Any]], labels: torch.Tensor) -> dict:
    """Rows: accuracy, tokens, paired difference against the full model, per reduction."""
    full = results["full"]["predicted"] == labels
    rows = []
    for name, entry in results.items():
        correct = entry["predicted"] == labels
        tokens = entry["visual_rows"].double()
        rows.append(
            {
                "name": name,
                **meta[name],
                "accuracy": float(correct.double().mean()),
                "tokens_mean": float(tokens.mean()),
                "tokens_std": float(tokens.std(correction=0)),
                "vs_full": None if name == "full" else paired_difference(correct, full),
                "correct": correct.int().tolist(),
            }
        )
    return {"rows": rows}


def _interval(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    return f"{100 * diff['difference']:+.1f} [{100 * diff['low']:+.1f}, {100 * diff['high']:+.1f}]"


def render(study: dict[str, Any], command: str, page: Path) -> Path:
    """Write the page and its plot (``page``'s stem folder)."""
    rows, alignment = study["rows"], study["alignment"]
    lines = [
        "# Study 2: DyMU in a real small VLM",
        "",
        f"Generated by `{command}` ({study['seconds'] / 60:.0f} min on {alignment['machine']}; the machine was "
        "shared with other jobs, so times are indicative only). Method: "
        "[finetune.md](finetune.md#study-2-the-small-llava-as-a-vlm).",
        "",
        "The small LLaVA (real DINOv2-S tower, real SmolLM2-135M, [assets.md](assets.md)) with the projector "
        f"that `{alignment['command']}` trained (seed {alignment['seed']}, {alignment['train']}; "
        f"{alignment['trainable_parameters']:,} trainable parameters, {alignment['global_steps']} steps). "
        f"Zero-shot classification of the first {study['test']} Fashion-MNIST **test** images at 112 px "
        "(64 visual tokens): the language model scores each class name after the image and the prompt "
        '"What is in this picture?" / "A photo of a" (mean log-probability of the name\'s tokens); the best '
        "class is the answer. DyMU's thresholds come from the first "
        f"{study['calibration']} training images (labels unused); ToMe's fixed r matches DyMU's mean count "
        f"there. Adapted rows train the aligned projector further on {study['train']} captioned training "
        "images with merging on"
        + (
            f", as the alignment trained (its captions, class loss weight {alignment['class_loss']} and "
            f"learning rate {alignment['learning_rate']})"
            if "class_loss" in alignment
            else ""
        )
        + " (same seed, steps and learning rate for DyMU and ToMe).",
        "",
        f"At {study['test']} test images one image is {100 / study['test']:.1f} points; intervals are paired "
        "95% intervals over the same images (`dymu_lightning.eval.metrics.paired_difference`).",
        "",
        "| reduction | kind | visual tokens per image | accuracy | vs full | trainable params | training images/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['kind']} | {row['tokens_mean']:.1f} ± {row['tokens_std']:.1f} | "
            f"{100 * row['accuracy']:.1f}% | {_interval(row['vs_full'])} | {row['trainable']:,} | "
            + (f"{row['images_per_second']:.2f} |" if row.get("images_per_second") else "- |")
        )
    if not any(row["kind"] == "adapted" for row in rows):
        lines += ["", "No adapted row: this study was stopped before an adaptation finished (rerun the command: it"]
        lines += ["continues from the reductions already scored, kept in its `--work` folder)."]
    lines += ["", "| variant | r per layer (calibration) | DyMU tokens on calibration images | ToMe r per layer |"]
    lines += ["|---|---|---|---|"]
    for variant, entry in study["variants"].items():
        lines.append(f"| {variant} | {entry['r']} | {entry['calibration_tokens']:.1f} | {entry['tome_r']} |")
    plot = page.parent / page.stem / STUDY_PLOT
    _plot(rows, plot)
    write_text_atomic(page.parent / page.stem / SUMMARY, summary(study, page.stem))
    lines += ["", f"![accuracy against visual tokens]({page.stem}/{STUDY_PLOT})", ""]
    return write_text_atomic(page, "\n".join(lines))


def summary(study: dict[str, Any], stem: str) -> str:
    """The study's table for docs/results.md, paths relative to the folder of the page ``stem``.md."""
    lines = [
        f"**Study 2** ([{stem}.md]({stem}.md)): zero-shot accuracy of the aligned small LLaVA on the first "
        f"{study['test']} Fashion-MNIST test images, paired 95% intervals against the full model.",
        "",
        "| reduction | kind | visual tokens per image | accuracy | vs full |",
        "|---|---|---|---|---|",
    ]
    for row in study["rows"]:
        lines.append(
            f"| {row['name']} | {row['kind']} | {row['tokens_mean']:.1f} | {100 * row['accuracy']:.1f}% "
            f"| {_interval(row['vs_full'])} |"
        )
    return "\n".join([*lines, "", f"![{stem}: accuracy against tokens]({stem}/{STUDY_PLOT})", ""])


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = {
        "full": ("k", "*"),
        "VTU": ("tab:blue", "o"),
        "no VTU": ("tab:orange", "s"),
        "ToMe": ("tab:green", "^"),
        "adapted": ("tab:red", "D"),
    }
    for row in rows:
        name = row["name"]
        key = (
            "full"
            if name == "full"
            else "adapted"
            if row["kind"] == "adapted"
            else "ToMe"
            if name.startswith("ToMe")
            else "no VTU"
            if "no VTU" in name
            else "VTU"
        )
        colour, marker = styles[key]
        diff = row["vs_full"]
        error = (
            None
            if diff is None
            else [[100 * (diff["difference"] - diff["low"])], [100 * (diff["high"] - diff["difference"])]]
        )
        axis.errorbar(row["tokens_mean"], 100 * row["accuracy"], yerr=error, color=colour, marker=marker, capsize=3)
        axis.annotate(
            name, (row["tokens_mean"], 100 * row["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    axis.set_xlabel("visual tokens per image (mean)")
    axis.set_ylabel("zero-shot accuracy (%), bars: paired 95% vs full")
    axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_command(
    work: Path,
    page: Path,
    variants: list[str],
    adapt: list[str],
    adaptations: list[str],
    train: int,
    test: int,
    calibration: int,
    render_only: bool = False,
) -> int:
    """The ``vlm_study`` command."""
    for variant in [*variants, *adapt]:
        if variant not in TOKENS_LEFT:
            raise ValueError(f"unknown DyMU variant {variant!r}; expected one of {', '.join(TOKENS_LEFT)}")
    if set(adapt) - set(variants):
        raise ValueError(
            f"--adapt {' '.join(adapt)}: adapted variants must also be in --variants ({' '.join(variants)})"
        )
    for adaptation in adaptations:
        if adaptation not in ("projector", "lora"):
            raise ValueError(f"unknown adaptation {adaptation!r}; expected one of projector, lora")
    command = shlex.join(
        [
            "python",
            "-m",
            "dymu_lightning",
            "vlm_study",
            "--work",
            str(work),
            "--page",
            str(page),
            "--variants",
            *variants,
        ]
        + ["--adapt", *adapt] * bool(adapt)
        + ["--adaptations", *adaptations, "--train", str(train), "--test", str(test), "--calibration", str(calibration)]
    )
    if render_only:
        study = json.loads((work / "study.json").read_text())
        command = study.get("command", command)
    else:
        study = run_study(work, variants, adapt, adaptations, train, test, calibration)
        study["command"] = command
        write_text_atomic(work / "study.json", json.dumps(study, indent=2) + "\n")
    print(f"wrote {render(study, command, page)}")
    results = refresh_finetune_section(page.parent / "results.md")
    if results is not None:
        print(f"updated the fine-tuning section of {results}")
    return 0
