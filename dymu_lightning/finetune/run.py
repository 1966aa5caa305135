"""Run a finetune recipe: check it, build the model, ``trainer.fit``, evaluate, write the results.

Outputs in ``out_dir``: ``checkpoints/last.ckpt`` (resume), ``logs/`` (CSV, and TensorBoard when it
is installed), ``per_image.csv`` (label, prediction and tokens of every validation image under each
evaluated reduction), ``results.json`` and ``report.md``.

Under Lightning's ``ddp`` strategy every process re-runs the same command line: nothing is written
before the Trainer exists, and rank 0 alone evaluates and writes the results after ``fit``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import os
import re
import shlex
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from PIL import Image
from torch import Tensor, nn

from dymu_lightning.backbones import Backbone, get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.config.recipes import ConfigError, Recipe, packaged_recipes
from dymu_lightning.config.schema import FinetuneRecipe, ReductionConfig
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.schedule import matched_fixed_r
from dymu_lightning.finetune.adapt import (
    LORA_TARGETS,
    METHODS,
    add_lora,
    count_parameters,
    freeze_unused,
    lora_module_names,
    set_trainable,
)
from dymu_lightning.finetune.data import FinetuneDataModule, LabelledImages
from dymu_lightning.finetune.module import FinetuneModule
from dymu_lightning.finetune.recalibrate import recalibrate, recalibrated_path
from dymu_lightning.loading import DTYPES, check_at_least, check_model, check_pattern, load_encoder

log = logging.getLogger(__name__)

# The encoder stays in eval mode on purpose (FinetuneModule.train): no dropout or drop-path.
warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")

REDUCTIONS = ("none", "dymu", "tome")
FEATURES = ("cls", "mean")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "64-true")


def check(recipe: Recipe) -> FinetuneRecipe:
    """Validate a finetune recipe beyond its types, without loading a model. Every error is one line
    naming the recipe file and the key."""
    cfg: FinetuneRecipe = recipe.to_object()
    where = recipe.path
    get_backbone(cfg.model.backbone)
    adaptation = cfg.adaptation
    if adaptation.method not in METHODS:
        raise ConfigError(f"{where}: adaptation.method={adaptation.method!r}; expected one of {', '.join(METHODS)}")
    if adaptation.feature not in FEATURES:
        raise ConfigError(f"{where}: adaptation.feature={adaptation.feature!r}; expected one of {', '.join(FEATURES)}")
    if adaptation.lora.target not in LORA_TARGETS:
        raise ConfigError(
            f"{where}: adaptation.lora.target={adaptation.lora.target!r}; expected one of {', '.join(LORA_TARGETS)}"
        )
    if adaptation.method == "lora" and adaptation.lora.target != "tower":
        raise ConfigError(
            f"{where}: adaptation.lora.target={adaptation.lora.target!r} needs a language model; "
            "this recipe fine-tunes an encoder (use tower)"
        )
    for pattern in adaptation.lora.modules or []:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ConfigError(
                f"{where}: adaptation.lora.modules: {pattern!r} is not a regular expression: {error}"
            ) from None
    if cfg.optimizer.name not in OPTIMIZERS:
        raise ConfigError(f"{where}: optimizer.name={cfg.optimizer.name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if cfg.optimizer.schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"{where}: optimizer.schedule={cfg.optimizer.schedule!r}; expected one of {', '.join(LR_SCHEDULES)}"
        )
    if cfg.trainer.precision not in PRECISIONS:
        raise ConfigError(
            f"{where}: trainer.precision={cfg.trainer.precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    check_pattern(where, "data.label_pattern", cfg.data.label_pattern)
    check_model(where, cfg.model)
    check_at_least(
        where,
        [
            ("data.global_batch_size", cfg.data.global_batch_size, 1),
            ("data.num_workers", cfg.data.num_workers, 0),
            ("data.shard_size", cfg.data.shard_size, 1),
            ("adaptation.lora.r", adaptation.lora.r, 1),
            ("data.val_batch_size", cfg.data.val_batch_size, 1),
            ("data.max_train_images", cfg.data.max_train_images, 1),
            ("data.max_val_images", cfg.data.max_val_images, 1),
            ("data.num_classes", cfg.data.num_classes, 2),
            ("trainer.max_epochs", cfg.trainer.max_epochs, 1),
            ("trainer.max_steps", cfg.trainer.max_steps, 1),
            ("trainer.stop_after_steps", cfg.trainer.stop_after_steps, 1),
            ("trainer.checkpoint_every_n_steps", cfg.trainer.checkpoint_every_n_steps, 1),
            ("trainer.check_val_every_n_epoch", cfg.trainer.check_val_every_n_epoch, 1),
        ],
    )
    for key, lr in (("optimizer.lr", cfg.optimizer.lr), ("optimizer.encoder_lr", cfg.optimizer.encoder_lr)):
        if lr is not None and not lr > 0:
            raise ConfigError(f"{where}: {key} must be > 0, got {lr}")
    world = cfg.trainer.devices * cfg.trainer.num_nodes if isinstance(cfg.trainer.devices, int) else None
    for key, size in (
        ("data.global_batch_size", cfg.data.global_batch_size),
        ("data.val_batch_size", cfg.data.val_batch_size),
    ):
        if world is not None and size % world:
            raise ConfigError(f"{where}: {key}={size} is not divisible by the {world} processes")
    for key, reduction in (("reduction", cfg.reduction), *((f"evaluate.{k}", v) for k, v in cfg.evaluate.items())):
        _check_reduction(where, key, reduction, cfg)
    return cfg


def _check_reduction(where: Path, key: str, reduction: ReductionConfig, cfg: FinetuneRecipe) -> None:
    if reduction.kind not in REDUCTIONS:
        raise ConfigError(f"{where}: {key}.kind={reduction.kind!r}; expected one of {', '.join(REDUCTIONS)}")
    if reduction.recalibrate and key != "reduction":
        raise ConfigError(f"{where}: {key}.recalibrate is only for reduction (the adapted encoder's own thresholds)")
    if reduction.recalibrate and reduction.kind != "dymu":
        raise ConfigError(f"{where}: {key}.recalibrate needs {key}.kind=dymu, got {reduction.kind!r}")
    if reduction.kind == "none":
        if reduction.thresholds is not None or reduction.r is not None:
            raise ConfigError(f"{where}: {key}.kind=none takes neither {key}.thresholds nor {key}.r")
        return
    if reduction.kind == "dymu" and reduction.thresholds is None:
        raise ConfigError(f"{where}: {key}.kind=dymu needs {key}.thresholds (a calibration's thresholds.json)")
    if reduction.kind == "dymu" and reduction.r is not None:
        raise ConfigError(f"{where}: {key}.r is for kind=tome; DyMU's merges come from {key}.thresholds")
    if reduction.kind == "tome" and (reduction.thresholds is None) == (reduction.r is None):
        raise ConfigError(
            f"{where}: {key}.kind=tome needs exactly one of {key}.r (merges per layer) and "
            f"{key}.thresholds (match the mean token count that file records)"
        )
    if reduction.r is not None and reduction.r < 0:
        raise ConfigError(f"{where}: {key}.r must be >= 0, got {reduction.r}")
    if reduction.thresholds is not None:
        path = Path(reduction.thresholds).expanduser()
        try:
            thresholds = ThresholdsFile.load(path)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"{where}: {key}.thresholds: {error}") from None
        if thresholds.backbone != cfg.model.backbone:
            raise ConfigError(
                f"{where}: {key}.thresholds {path} was calibrated for backbone '{thresholds.backbone}', "
                f"not model.backbone='{cfg.model.backbone}'"
            )
        if cfg.model.image_size is not None and thresholds.image_size != cfg.model.image_size:
            raise ConfigError(
                f"{where}: {key}.thresholds {path} was calibrated at {thresholds.image_size} px, "
                f"but model.image_size={cfg.model.image_size}"
            )
        if thresholds.num_blocks != cfg.model.num_blocks:
            raise ConfigError(
                f"{where}: {key}.thresholds {path} was calibrated with num_blocks={thresholds.num_blocks}, "
                f"but model.num_blocks={cfg.model.num_blocks}"
            )


def merge_policy(
    reduction: ReductionConfig,
    key: str,
    backbone: Backbone,
    model: nn.Module,
    image_size: int,
    full_tokens: int,
    num_blocks: int | None,
) -> tuple[MergePolicy, dict[str, Any]]:
    """The policy of a reduction section, and what describes it in results.json."""
    if reduction.kind == "none":
        return MergePolicy.off(), {"kind": "none"}
    layers = backbone.num_layers(model)
    if reduction.thresholds is not None:
        path = Path(reduction.thresholds).expanduser()
        thresholds = ThresholdsFile.load(path)
        try:
            thresholds.check_fits(backbone, model, image_size, num_blocks)
        except ValueError as error:
            raise ValueError(f"{key}.thresholds: {error}") from None
        if reduction.kind == "dymu":
            return thresholds.policy(), {"kind": "dymu", "thresholds": str(path)}
        target = float(thresholds.tokens["mean"])
        r = matched_fixed_r(layers, full_tokens, target, backbone.num_prefix_tokens(model), num_blocks)
        return MergePolicy(mode="fixed_r", r=r), {"kind": "tome", "matched_to": str(path), "target": target, "r": r}
    r = [reduction.r] * (num_blocks or layers) + [0] * (layers - (num_blocks or layers))
    return MergePolicy(mode="fixed_r", r=r), {"kind": "tome", "r": r}


class Stopped(Exception):
    """Raised by :class:`StopAfter` once ``last.ckpt`` is written: the run ends as if killed there."""


class StopAfter(Callback):
    """End this invocation at global step ``step``, after writing ``last.ckpt`` (rerun to continue).

    It raises rather than setting ``trainer.should_stop``: a graceful stop would also end the epoch
    (epoch-end hooks, checkpoint), and the resumed run would then skip the epoch's remaining batches."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.save_checkpoint(self.path)
            raise Stopped(f"stopped at step {trainer.global_step} (trainer.stop_after_steps)")


def build(
    cfg: FinetuneRecipe, where: Path | str = "recipe"
) -> tuple[FinetuneModule, FinetuneDataModule, dict[str, Any]]:
    """The module (encoder adapted, head initialised from ``cfg.seed``), the data, and facts for the results."""
    L.seed_everything(cfg.seed, verbose=False)
    backbone, encoder, transform = load_encoder(cfg.model)
    dtype = DTYPES[cfg.model.dtype]
    probe = transform(Image.new("RGB", (64, 64)))[None].to(dtype)
    with torch.no_grad():
        embedded = backbone.embed(encoder, probe)
    image_size, full_tokens, width = int(probe.shape[-1]), int(embedded.shape[1]), int(embedded.shape[2])
    if cfg.adaptation.method == "lora":
        lora = cfg.adaptation.lora
        try:
            names = lora_module_names(encoder, lora.modules, "adaptation.lora.modules")
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
        encoder = add_lora(encoder, names, lora.r, lora.alpha, lora.dropout)
    set_trainable(encoder, cfg.adaptation.method)
    freeze_unused(
        encoder,
        lambda: backbone.merged_forward(
            encoder, probe, MergePolicy.off(), num_blocks=cfg.model.num_blocks
        ).tokens.sum(),
    )
    policy, reduction = merge_policy(
        cfg.reduction, "reduction", backbone, encoder, image_size, full_tokens, cfg.model.num_blocks
    )
    data = FinetuneDataModule(cfg.data, transform, cfg.seed)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        # Before the Trainer launches the other processes of this node, which need the labels below.
        data.prepare_data()
    num_classes = cfg.data.num_classes or _num_classes(data)
    head = nn.Linear(width, num_classes).to(dtype)
    per_epoch = len(data.train_images()) // cfg.data.global_batch_size
    total_steps = per_epoch * cfg.trainer.max_epochs
    if cfg.trainer.max_steps is not None:
        total_steps = min(total_steps, cfg.trainer.max_steps)
    module = FinetuneModule(
        backbone, encoder, head, policy, cfg.model.num_blocks, cfg.adaptation.feature, cfg.optimizer, total_steps
    )
    trainable, total = count_parameters(module)
    facts = {
        "backbone": backbone.name,
        "image_size": image_size,
        "full_tokens": full_tokens,
        "num_classes": num_classes,
        "reduction": reduction,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }
    return module, data, facts


def _num_classes(data: FinetuneDataModule) -> int:
    labels = torch.cat([data.train_images().labels, data.val_images().labels])
    return int(labels.max()) + 1


def finetune(recipe: Recipe) -> Path:
    """Run the recipe; returns the path of ``results.json``."""
    started = time.perf_counter()
    cfg = check(recipe)
    module, data, facts = build(cfg, recipe.path)
    out_dir = Path(cfg.out_dir).expanduser()
    trainer = make_trainer(cfg)
    last = out_dir / "checkpoints" / "last.ckpt"
    resume = last if cfg.resume and last.is_file() else None
    if resume is not None and trainer.is_global_zero:
        log.warning("resuming from %s", resume)
    path = out_dir / "results.json"
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except Stopped as stopped:
        if trainer.is_global_zero:
            print(f"{stopped}; rerun the command to continue from {last}")
        return path
    if not trainer.is_global_zero:
        return path
    return evaluate_and_write(recipe, cfg, module, data, facts, trainer, started)


def make_trainer(cfg: FinetuneRecipe) -> L.Trainer:
    """The Trainer of a recipe: ``last.ckpt`` in ``out_dir/checkpoints`` (every
    ``checkpoint_every_n_steps`` steps, else at each epoch end; at the end of training; and when
    ``stop_after_steps`` stops the run), CSV (and TensorBoard) logs in ``out_dir/logs``."""
    out_dir = Path(cfg.out_dir).expanduser()
    last = out_dir / "checkpoints" / "last.ckpt"
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=last.parent,
            save_last=True,
            save_top_k=1,  # no monitor: the latest; Lightning writes last.ckpt only alongside a top-k save
            every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
            save_on_train_epoch_end=True,
            enable_version_counter=False,  # overwrite last.ckpt when a resumed run saves again
        )
    ]
    if cfg.trainer.stop_after_steps is not None:
        callbacks.append(StopAfter(cfg.trainer.stop_after_steps, last))
    return L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,
        max_epochs=cfg.trainer.max_epochs,
        max_steps=cfg.trainer.max_steps or -1,
        check_val_every_n_epoch=cfg.trainer.check_val_every_n_epoch or 1,
        limit_val_batches=None if cfg.trainer.check_val_every_n_epoch else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=_loggers(out_dir),
        callbacks=callbacks,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,  # our loaders split every global batch across ranks themselves
    )


def _loggers(out_dir: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(out_dir, name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out_dir, name="logs"))
    return loggers


def predict(module: FinetuneModule, data: FinetuneDataModule, policy: MergePolicy) -> dict[str, Tensor]:
    """Every validation image in sample order: ``index``, ``label``, ``predicted``, ``tokens``."""
    rows: dict[str, list[Tensor]] = {"index": [], "label": [], "predicted": [], "tokens": []}
    module.eval()
    device = next(module.head.parameters()).device
    dtype = next(module.encoder.parameters()).dtype
    with torch.inference_mode():
        for batch in data.ordered_loader():
            valid = batch["valid"].bool()
            if not valid.any():
                continue
            logits, lengths = module(batch["pixels"][valid].to(device, dtype), policy)
            rows["index"].append(batch["index"][valid])
            rows["label"].append(batch["label"][valid])
            rows["predicted"].append(logits.argmax(dim=-1).cpu())
            rows["tokens"].append(lengths.cpu())
    return {key: torch.cat(values) for key, values in rows.items()}


def evaluate_and_write(
    recipe: Recipe,
    cfg: FinetuneRecipe,
    module: FinetuneModule,
    data: FinetuneDataModule,
    facts: dict[str, Any],
    trainer: L.Trainer,
    started: float,
) -> Path:
    """Evaluate the trained module on the validation images (its own reduction and each of
    ``cfg.evaluate``); write per_image.csv, results.json and report.md."""
    out_dir = Path(cfg.out_dir).expanduser()
    encoder, backbone = module.encoder, module.backbone
    module.to(trainer.strategy.root_device)  # Lightning moves the module back to the CPU after fit
    evaluations: dict[str, dict[str, Any]] = {}
    columns: dict[str, Tensor] = {}
    sections = {"trained": (module.policy, facts["reduction"])}
    for name, reduction in cfg.evaluate.items():
        sections[name] = merge_policy(
            reduction,
            f"evaluate.{name}",
            backbone,
            encoder,
            facts["image_size"],
            facts["full_tokens"],
            cfg.model.num_blocks,
        )
    if cfg.reduction.recalibrate:
        # The adapted encoder's own thresholds score the trained model; the stock ones stay as a section.
        original = ThresholdsFile.load(Path(cfg.reduction.thresholds).expanduser())
        found = recalibrate(backbone, encoder, data.train_images(), original, cfg.model.num_blocks)
        path = found.save(recalibrated_path(out_dir))
        sections = {
            "trained": (found.policy(), {**facts["reduction"], "recalibrated": str(path)}),
            "before_recalibration": sections["trained"],
            **{name: section for name, section in sections.items() if name != "trained"},
        }
        facts = {**facts, "reduction": sections["trained"][1]}
    labels = None
    for name, (policy, description) in sections.items():
        seconds = time.perf_counter()
        rows = predict(module, data, policy)
        seconds = time.perf_counter() - seconds
        labels = rows["label"]
        correct = rows["predicted"] == rows["label"]
        evaluations[name] = {
            "reduction": description,
            "accuracy": float(correct.double().mean()),
            "tokens_mean": float(rows["tokens"].double().mean()),
            "tokens_std": float(rows["tokens"].double().std(correction=0)),
            "images": int(correct.numel()),
            "images_per_second": correct.numel() / max(seconds, 1e-9),
        }
        columns[f"predicted:{name}"] = rows["predicted"]
        columns[f"tokens:{name}"] = rows["tokens"]
        index = rows["index"]
    keys = [data.val_images().shards.key(int(i)) for i in index]
    with open(out_dir / "per_image.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["index", "key", "label", *columns])
        for row, key in enumerate(keys):
            writer.writerow([int(index[row]), key, int(labels[row]), *(int(v[row]) for v in columns.values())])

    metrics = trainer.callback_metrics
    result = {
        "task": "finetune",
        "command": command_line(recipe),
        "recipe": str(recipe.path),
        "overrides": list(recipe.overrides),
        "method": cfg.adaptation.method,
        "feature": cfg.adaptation.feature,
        **facts,
        "train_images": len(data.train_images()),
        "val_images": int(labels.numel()),
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "world_size": trainer.world_size,
        "training_images_per_second": module.train_images / module.train_seconds if module.train_seconds else None,
        "training_seconds": module.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "final_train_loss": float(metrics["train_loss"]) if "train_loss" in metrics else None,
        "evaluations": evaluations,
        "accuracy": evaluations["trained"]["accuracy"],
        "tokens_mean": evaluations["trained"]["tokens_mean"],
        "machine": _machine(trainer),
    }
    path = out_dir / "results.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "report.md").write_text(report(result))
    print(
        f"finetuned ({cfg.adaptation.method}, reduction {facts['reduction']['kind']}): accuracy "
        f"{result['accuracy']:.4f} at {result['tokens_mean']:.1f} tokens per image; "
        f"{facts['trainable_parameters']:,} trainable parameters; wrote {path}"
    )
    return path


def command_line(recipe: Recipe) -> str:
    """The command that reruns this recipe (a packaged recipe by its name)."""
    packaged = packaged_recipes().get(recipe.path.stem)
    name = (
        recipe.path.stem if packaged is not None and packaged.resolve() == recipe.path.resolve() else str(recipe.path)
    )
    return shlex.join(["python", "-m", "dymu_lightning", f"recipe={name}", *recipe.overrides])


def _machine(trainer: L.Trainer) -> str:
    device = "cuda " + torch.cuda.get_device_name() if trainer.strategy.root_device.type == "cuda" else "cpu"
    return f"{device}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}"


def report(result: dict[str, Any]) -> str:
    """report.md: the run in a few lines and a table of its evaluations."""
    lines = [
        f"# Fine-tune: {result['method']} on {result['backbone']}",
        "",
        f"Command: `{result['command']}`",
        "",
        f"- {result['train_images']} training images, {result['val_images']} validation images at "
        f"{result['image_size']} px ({result['full_tokens']} tokens unmerged), {result['num_classes']} classes",
        f"- trainable parameters: {result['trainable_parameters']:,} of {result['total_parameters']:,}",
        f"- {result['global_steps']} optimiser steps, {result['world_size']} process(es); training "
        + (
            f"{result['training_images_per_second']:.1f} images/s"
            if result["training_images_per_second"]
            else "not run in this invocation"
        )
        + f"; wall time {result['wall_seconds']:.0f} s ({result['machine']})",
        "",
        "| evaluated with | reduction | accuracy | tokens per image |",
        "|---|---|---|---|",
    ]
    for name, entry in result["evaluations"].items():
        reduction = entry["reduction"]
        shown = reduction["kind"] + (
            f" ({Path(reduction['thresholds']).parent.name})" if "thresholds" in reduction else ""
        )
        if "r" in reduction:
            shown += f" r={reduction['r']}"
        lines.append(
            f"| {name} | {shown} | {entry['accuracy']:.4f} | {entry['tokens_mean']:.1f} ± {entry['tokens_std']:.1f} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["FinetuneDataModule", "LabelledImages", "check", "finetune"]
