"""Typed recipe schemas. Every key a recipe may set is declared here, with its type and default.

omegaconf validates recipes and ``key=value`` overrides against these dataclasses, so a typo or a
wrong type fails before any model is loaded (see :mod:`dymu_lightning.config.recipes` for the error
messages). docs/configuration.md lists every key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """Which encoder to calibrate."""

    backbone: str = MISSING  # registry name, see `python -m dymu_lightning ls`
    source: str | None = None  # hub id or local save_pretrained directory; None: the backbone's default
    random_init: bool = False  # build `arch` with random weights instead of loading (CI, speed tests)
    arch: dict[str, Any] = field(default_factory=dict)  # architecture config for random_init
    num_blocks: int | None = None  # read features after this many blocks (LLaVA: penultimate); None: all
    dtype: str = "float32"  # float32 | bfloat16 | float16
    image_size: int | None = None  # resize the preprocessed pixels to this side; None: the backbone's own size


@dataclass
class DataConfig:
    """Where the calibration images come from."""

    shards: str = MISSING  # folder with webdataset shards (and their index.json)
    images: str | None = None  # folder of images to write into `shards` on first use; "assets:skimage" = bundled photos
    global_batch_size: int = 32  # images ranked together per step, over all processes
    max_images: int | None = None  # use only the first N images (shrunken runs)
    num_workers: int = 0  # data-loader workers per process
    strict: bool = False  # a corrupt image is an error (true) or is skipped and reported (false)
    shard_size: int = 1000  # images per shard when writing shards from `images`
    # whole (images resized to the tower's side) | anyres (the crops an AnyRes processor makes) |
    # frames (the frames a video processor makes of video shards) | native (each image at the tower's
    # native size, Qwen-VL towers: images of different cell counts)
    crops: str = "whole"
    # anyres: a LLaVA-NeXT/OneVision save_pretrained folder (its image processor); frames: a OneVision
    # folder (its video processor)
    processor: str | None = None
    min_pixels: int | None = None  # native: area bounds of the resize rule (None: the tower's defaults)
    max_pixels: int | None = None


@dataclass
class ScheduleConfig:
    """Target merges per layer."""

    kind: str = "constant"  # constant | linear | reverse_linear
    r: int | None = None  # mean merges per image per merging layer
    tokens_left: int | None = None  # or: tokens per image left after the merging layers
    variant: str | None = None  # a name from `variants`, which then sets r
    variants: dict[str, int] = field(default_factory=dict)  # e.g. {low: 21, mid: 16, high: 8}


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer."""

    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = 1  # processes per node (int), or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn ...
    save_every_n_steps: int = 10  # write the resumable state every N global steps
    max_steps: int | None = None  # stop after N global steps this run (rerun to resume); None: all
    timeout_s: int | None = None  # ddp: a collective waiting longer fails the run (a hung process); None: 30 min
    progress_bar: bool = True


@dataclass
class CalibrationRecipe:
    """`task: calibrate`: find per-layer DToMe thresholds for one encoder."""

    task: str = "calibrate"
    out_dir: str = MISSING  # thresholds.json, report.md and the resumable state land here
    seed: int = 0
    resume: bool = True  # continue from out_dir's saved state if there is one
    plugins: list[str] = field(default_factory=list)  # modules to import first (they register backbones)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


@dataclass
class ProbeConfig:
    """The labelled images a probe is fitted on (with the full model's features)."""

    train_shards: str | None = None  # folder of labelled webdataset shards; None: no probe
    train_images: str | None = None  # folder of images to write into `train_shards` on first use
    max_images: int | None = None  # use only the first N training images
    label_pattern: str = r"^(\d+)_"  # regex whose first group, matched on a sample key, is its integer label
    feature: str = "cls"  # cls (the CLS token) | mean (size-weighted mean of the patch tokens)
    k: int = 10  # neighbours of the kNN probe


@dataclass
class EvalEncoderRecipe:
    """`task: eval_encoder`: token counts, fidelity, probe accuracy and complexity of DyMU variants."""

    task: str = "eval_encoder"
    out_dir: str = MISSING  # metrics.json, per_image.csv, report.md and the plots land here
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the evaluated images; global_batch_size = batch size
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    variants: dict[str, str] = field(default_factory=dict)  # DyMU variant name -> its thresholds.json
    tome: bool = True  # add ToMe (fixed r) at the mean token count of each DyMU variant
    complexity: bool = True  # JPEG bytes per pixel of each image vs its token count
    # regex whose first group, matched on a sample key, names the image's scene (burst frames of one
    # view); adds Spearman over scene means. None: every image counts on its own only
    scene_pattern: str | None = None
    # where the encoder runs: cpu | cuda | cuda:N (the metrics are computed on the CPU either way)
    device: str = "cpu"
    seed: int = 0  # seeds a random_init model before it is built (calibration seeds the same way)
    plugins: list[str] = field(default_factory=list)  # modules to import first (they register backbones)


SCHEMAS: dict[str, type] = {"calibrate": CalibrationRecipe, "eval_encoder": EvalEncoderRecipe}


# ----- task: finetune (docs/finetune.md) --------------------------------------------------------------------------


@dataclass
class FinetuneDataConfig:
    """Labelled images: a training set and a held-out validation set, never mixed."""

    train_shards: str = MISSING  # folder of labelled webdataset shards
    train_images: str | None = None  # folder to write `train_shards` from on first use; or fashion_mnist:train:N
    val_shards: str = MISSING
    val_images: str | None = None  # or fashion_mnist:test:N (the first N test images)
    label_pattern: str = r"^(\d+)_"  # regex whose first group, matched on a sample key, is its integer label
    num_classes: int | None = None  # None: 1 + the largest label of either set
    global_batch_size: int = 32  # training images per optimiser step, over all processes
    val_batch_size: int = 64  # validation images per step, over all processes
    max_train_images: int | None = None  # use only the first N (shards sort by key: the label leads)
    max_val_images: int | None = None
    num_workers: int = 0  # data-loader workers per process
    shard_size: int = 1000  # images per shard when writing shards from images


@dataclass
class LoraSettings:
    """LoRA (peft) on linear layers of the adapted model."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = "tower"  # tower | lm | both (lm and both need a language model)
    # regexes matched (fully) against module names; None: the linear layers of the attention blocks
    modules: list[str] | None = None


@dataclass
class AdaptationConfig:
    """What training may change. Every method trains the head (a linear classifier, or a VLM's projector)."""

    method: str = "head"  # head | lora | bitfit (norms and biases)
    feature: str = "cls"  # what the head reads: cls | mean (size-weighted mean of the patch tokens)
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class ReductionConfig:
    """Token reduction in the encoder, in training and evaluation."""

    kind: str = "none"  # none | dymu | tome
    thresholds: str | None = None  # dymu: its thresholds.json; tome: match the mean count this file records
    r: int | None = None  # tome: merges per image per layer (instead of thresholds)
    # dymu, `reduction` only: after training, calibrate the thresholds' schedule again on the adapted
    # encoder (training images) and evaluate with those; an adaptation changes the keys they compare
    recalibrate: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    # the encoder's trainable parameters (LoRA adapters, BitFit norms and biases); None: lr. The head
    # starts from scratch and the encoder from a trained model, so they usually want different steps.
    encoder_lr: float | None = None
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "constant"  # constant | cosine (to 0 over the run's optimiser steps)


@dataclass
class FinetuneTrainerConfig:
    """Passed to lightning.Trainer."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn ...
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed
    max_epochs: int = 1
    max_steps: int | None = None  # optimiser steps in all; None: max_epochs decides
    stop_after_steps: int | None = None  # stop this invocation at this global step (checkpointed); rerun to continue
    checkpoint_every_n_steps: int | None = None  # last.ckpt every N steps; None: at each epoch end
    check_val_every_n_epoch: int | None = 1  # validation accuracy during training; None: only the final evaluation
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class FinetuneRecipe:
    """`task: finetune`: adapt an encoder (head, LoRA or BitFit), with or without token reduction."""

    task: str = "finetune"
    out_dir: str = MISSING  # results.json, report.md, per_image.csv, checkpoints/ and logs/ land here
    seed: int = 0
    resume: bool = True  # continue from out_dir/checkpoints/last.ckpt if there is one
    model: ModelConfig = field(default_factory=ModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    reduction: ReductionConfig = field(default_factory=ReductionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)
    # also evaluate the trained model under these reductions (e.g. a head trained on the full model,
    # applied to DyMU's merged tokens: the training-free setting)
    evaluate: dict[str, ReductionConfig] = field(default_factory=dict)


SCHEMAS["finetune"] = FinetuneRecipe
