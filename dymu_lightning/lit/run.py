"""Run a calibration recipe: model, data, Lightning Trainer, results in ``out_dir``.

Under Lightning's ``ddp`` strategy every process re-runs the same command line, so this function is
deterministic and creates nothing (no folder, no file) before the Trainer exists; rank 0 writes the
outputs.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy
from PIL import Image

from dymu_lightning.backbones import Backbone, get_backbone
from dymu_lightning.backbones.registry import import_plugins
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.config.recipes import ConfigError, Recipe
from dymu_lightning.config.schema import CalibrationRecipe
from dymu_lightning.core.schedule import SCHEDULES, merges_per_layer
from dymu_lightning.data import GlobalBatchShards
from dymu_lightning.data.crops import CROPS_KINDS, anyres_inputs
from dymu_lightning.data.frames import frames_inputs
from dymu_lightning.data.native import GlobalBatchNative
from dymu_lightning.data.parts import GlobalBatchParts
from dymu_lightning.data.source import check_shards
from dymu_lightning.files import check_writable_dir
from dymu_lightning.lit.calibration import (
    RESULTS_FILE,
    CalibrationModule,
    check_previous_results,
    check_state,
    read_state,
)
from dymu_lightning.lit.datamodule import ShardsDataModule
from dymu_lightning.lit.progress import CalibrationProgressBar
from dymu_lightning.lit.report import write_report
from dymu_lightning.loading import EncoderShape, check_model_and_data, encoder_shape, load_encoder, probe_shape
from dymu_lightning.merges import draw_merges, native_token_groups, pick_images, token_groups

log = logging.getLogger(__name__)

# Our IterableDataset yields whole global batches and splits work across workers itself, so
# Lightning's generic warnings about __len__ with workers and about its own pytree internals are noise.
warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
# Rerunning a finished run resumes at its last step: an empty loader is the point, not a mistake.
warnings.filterwarnings("ignore", message=".*Total length of `DataLoader` across ranks is zero.*")
# On a machine with Slurm installed, every local run would be told to prepend `srun`; docs/calibration.md
# says how to run under Slurm (sbatch scripts/slurm/calibrate.sbatch).
warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")


class _LightningNoise(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger and its note on limit_val_batches
    (trainer.max_steps here, which our own summary reports)."""

    NOISE = ("litlogger", "` was configured so ")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in record.getMessage() for noise in self.NOISE)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_LightningNoise())


def target_r(cfg: CalibrationRecipe, path: Path) -> tuple[int | None, int | None]:
    """(r, tokens_left) from the schedule section; a named variant sets r."""
    schedule = cfg.schedule
    r = schedule.r
    if schedule.variant is not None:
        if r is not None:
            raise ConfigError(
                f"{path}: schedule.r={r} and schedule.variant={schedule.variant!r} are both set; "
                "add schedule.variant=null to use r"
            )
        if schedule.variant not in schedule.variants:
            raise ConfigError(
                f"{path}: schedule.variant={schedule.variant!r} is not one of schedule.variants "
                f"({', '.join(sorted(schedule.variants)) or 'none defined'})"
            )
        r = schedule.variants[schedule.variant]
    if (r is None) == (schedule.tokens_left is None):
        raise ConfigError(f"{path}: set exactly one of schedule.r, schedule.variant and schedule.tokens_left")
    return r, schedule.tokens_left


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def check(recipe: Recipe, probe: bool = True) -> CalibrationRecipe:
    """Validate a recipe beyond its types, without loading weights: with ``probe``, the schedule is
    checked against the encoder's shape where that is known without its weights (:func:`probe_shape`);
    :func:`calibrate` checks it against the loaded model in any case, before any compute."""
    cfg: CalibrationRecipe = recipe.to_object()
    path = recipe.path
    target_r(cfg, path)
    for name, value in cfg.schedule.variants.items():
        if value < 0:
            raise ConfigError(f"{path}: schedule.variants.{name} must be >= 0, got {value}")
    import_plugins(cfg.plugins, f"{path}: plugins")  # their backbones register themselves
    get_backbone(cfg.model.backbone)  # unknown names fail here, with a did-you-mean
    if cfg.schedule.kind not in SCHEDULES:
        raise ConfigError(f"{path}: schedule.kind={cfg.schedule.kind!r}; expected one of {SCHEDULES}")
    trainer = cfg.trainer
    if trainer.accelerator not in ACCELERATORS:
        raise ConfigError(f"{path}: trainer.accelerator={trainer.accelerator!r}; expected one of {ACCELERATORS}")
    devices = trainer.devices
    if devices != "auto" and (not isinstance(devices, int) or isinstance(devices, bool) or devices < 1):
        raise ConfigError(f"{path}: trainer.devices must be an integer >= 1 or 'auto', got {devices!r}")
    check_model_and_data(
        path,
        cfg.model,
        cfg.data,
        [
            ("trainer.num_nodes", trainer.num_nodes, 1),
            ("trainer.save_every_n_steps", trainer.save_every_n_steps, 1),
            ("trainer.max_steps", trainer.max_steps, 1),
            ("trainer.timeout_s", trainer.timeout_s, 1),
            ("schedule.r", cfg.schedule.r, 0),
            ("schedule.tokens_left", cfg.schedule.tokens_left, 1),
        ],
    )
    check_crops(cfg, path)
    world = _world_size(cfg)
    launched = os.environ.get("WORLD_SIZE")
    if launched is not None and world is not None and int(launched) != world:
        # torchrun (or srun) started WORLD_SIZE processes; Lightning must be told the same layout,
        # or each process would calibrate alone on all the data.
        raise ConfigError(
            f"{path}: the launcher started {launched} processes but trainer.devices x trainer.num_nodes "
            f"= {world}; set them to match (and trainer.strategy=ddp)"
        )
    if world is not None and cfg.data.global_batch_size % world:
        raise ConfigError(
            f"{path}: data.global_batch_size={cfg.data.global_batch_size} is not divisible by the "
            f"{world} processes (trainer.devices x trainer.num_nodes)"
        )
    if trainer.timeout_s is not None and trainer.strategy != "ddp":
        raise ConfigError(f"{path}: trainer.timeout_s needs trainer.strategy=ddp, got {trainer.strategy!r}")
    check_writable_dir(cfg.out_dir, f"{path}: out_dir={cfg.out_dir}")
    try:
        check_shards(cfg.data.shards, cfg.data.images)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{path}: {error}") from None
    if probe:
        shape = probe_shape(cfg.model, path)
        if shape is not None:
            check_schedule(cfg, path, shape)
    return cfg


def check_crops(cfg: CalibrationRecipe, path: Path) -> None:
    """``data.crops`` is known, and ``data.processor`` is set exactly when a processor cuts the inputs
    (AnyRes crops, video frames)."""
    data = cfg.data
    if data.crops not in CROPS_KINDS:
        raise ConfigError(f"{path}: data.crops={data.crops!r}; expected one of {CROPS_KINDS}")
    if data.crops == "anyres" and data.processor is None:
        raise ConfigError(
            f"{path}: data.crops=anyres needs data.processor=<a LLaVA-NeXT or OneVision save_pretrained folder>, "
            "whose image processor cuts the crops"
        )
    if data.crops == "frames" and data.processor is None:
        raise ConfigError(
            f"{path}: data.crops=frames needs data.processor=<a LLaVA-OneVision save_pretrained folder>, "
            "whose video processor samples and resizes the frames"
        )
    if data.crops not in ("anyres", "frames") and data.processor is not None:
        raise ConfigError(
            f"{path}: data.processor={data.processor!r} is read only with data.crops=anyres or data.crops=frames"
        )
    for key in ("min_pixels", "max_pixels"):
        value = getattr(data, key)
        if value is not None and data.crops != "native":
            raise ConfigError(f"{path}: data.{key}={value} is read only with data.crops=native")
        if value is not None and value < 1:
            raise ConfigError(f"{path}: data.{key} must be >= 1, got {value}")
    if data.min_pixels is not None and data.max_pixels is not None and data.min_pixels > data.max_pixels:
        raise ConfigError(f"{path}: data.min_pixels={data.min_pixels} is above data.max_pixels={data.max_pixels}")
    if data.crops == "native" and cfg.schedule.tokens_left is not None:
        raise ConfigError(
            f"{path}: schedule.tokens_left counts the tokens of one image size; with data.crops=native (images "
            "of different sizes) set schedule.r, the merges per image and layer"
        )


def native_inputs(
    cfg: CalibrationRecipe, path: Path, backbone: Backbone, model: torch.nn.Module
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any], int, tuple[int, int, int]] | None:
    """With ``data.crops=native``: (the transform sizing each image by the tower's native rule,
    thresholds.json's ``inputs``, the most cells an image can have, the shape of dummy rows);
    None otherwise. A ConfigError for a backbone without a native rule."""
    if cfg.data.crops != "native":
        return None
    if not callable(getattr(backbone, "native_size", None)):
        raise ConfigError(
            f"{path}: data.crops=native needs a backbone that takes images at their native size (hf_qwen2_vl, "
            f"hf_qwen2_5_vl, hf_qwen3_vl); backbone '{backbone.name}' has no native resize rule: use data.crops=whole"
        )
    defaults = inspect.signature(backbone.native_size).parameters
    bounds = {
        key: int(getattr(cfg.data, key) if getattr(cfg.data, key) is not None else defaults[key].default)
        for key in ("min_pixels", "max_pixels")
    }
    if bounds["min_pixels"] > bounds["max_pixels"]:
        raise ConfigError(f"{path}: min_pixels {bounds['min_pixels']} is above max_pixels {bounds['max_pixels']}")
    unit = backbone.cell_pixels(model)
    transform = functools.partial(_native_pixels, backbone, model, bounds)
    inputs = {"kind": "native", **bounds}
    return transform, inputs, bounds["max_pixels"] // (unit * unit), (3, 2 * unit, 2 * unit)


def _native_pixels(
    backbone: Backbone, model: torch.nn.Module, bounds: dict[str, int], image: Image.Image
) -> torch.Tensor:
    """``[3, H, W]``: one image at the tower's native size (a module-level function: it pickles)."""
    return backbone.preprocess_native(model, [image], **bounds)[0]


def load_crops_processor(cfg: CalibrationRecipe, path: Path, image_size: int) -> tuple[Any, dict[str, Any] | None]:
    """(image or video processor, thresholds.json's ``inputs``) of ``data.crops=anyres`` or
    ``data.crops=frames``; (None, None) for whole images. The crops or frames must have the side the
    encoder is fed (``image_size``)."""
    if cfg.data.crops not in ("anyres", "frames"):
        return None, None
    from transformers import AutoImageProcessor, AutoVideoProcessor

    source = str(Path(cfg.data.processor).expanduser())
    frames = cfg.data.crops == "frames"
    try:
        if frames:
            processor = AutoVideoProcessor.from_pretrained(source)
            inputs = frames_inputs(processor, source)
        else:
            processor = AutoImageProcessor.from_pretrained(source)
            inputs = anyres_inputs(processor, source)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: data.processor={cfg.data.processor}: {error}") from None
    side = inputs["frame_size" if frames else "crop_size"]
    if side != image_size:
        made = "resizes frames to" if frames else "cuts crops of"
        raise ConfigError(
            f"{path}: data.processor={cfg.data.processor} {made} {side} px, but the encoder is fed {image_size} px "
            f"images; set model.image_size={side} or use that model's own tower"
        )
    return processor, inputs


def check_schedule(cfg: CalibrationRecipe, path: Path, shape: EncoderShape) -> list[int]:
    """Per-layer r of the recipe's schedule on an encoder of this shape; a ConfigError if the depth or
    the schedule does not fit it, e.g. more merges than a layer has pairs (thresholds would be 0,
    leaving a handful of tokens)."""
    layers, tokens, prefix = shape.num_layers, shape.tokens, shape.num_prefix
    backbone = f"backbone '{cfg.model.backbone}'"
    if cfg.model.num_blocks is not None and cfg.model.num_blocks > layers:
        raise ConfigError(f"{path}: model.num_blocks={cfg.model.num_blocks}, but {backbone} has {layers} blocks")
    r_value, tokens_left = target_r(cfg, path)
    at = f"{tokens} tokens per image at {shape.image_size} px"
    if tokens_left is not None and not prefix < tokens_left <= tokens:
        raise ConfigError(
            f"{path}: schedule.tokens_left={tokens_left}, but {backbone} gives {at} ({prefix} prefix tokens "
            f"never merge); expected {prefix + 1}..{tokens}"
        )
    r = merges_per_layer(
        layers,
        cfg.schedule.kind,
        r=r_value,
        tokens_left=tokens_left,
        tokens=tokens,
        merging_layers=cfg.model.num_blocks,
    )
    if cfg.schedule.variant is not None:
        asked = f"schedule.variant={cfg.schedule.variant!r} (r={r_value})"
    else:
        asked = f"schedule.r={r_value}" if r_value is not None else f"schedule.tokens_left={tokens_left}"
    n = tokens
    for layer, r_l in enumerate(r):
        # Bipartite matching: one candidate pair per A token (even positions past the prefix) while
        # there is a B token. Merging every pair leaves no edge to set the threshold by.
        pairs = max(0, (n + 1) // 2 - (prefix + 1) // 2) if n // 2 - prefix // 2 > 0 else 0
        if r_l > 0 and r_l >= pairs:
            raise ConfigError(
                f"{path}: {asked} asks layer {layer} for {r_l} merges per image, but its {n} tokens (of {at}) "
                f"form {pairs} candidate pairs, and a threshold needs fewer merges than pairs; lower the "
                "schedule, or feed larger images (model.image_size)"
            )
        n -= r_l
    return r


def calibrate(recipe: Recipe) -> Path:
    """Run the calibration recipe; returns the path of thresholds.json."""
    cfg = check(recipe, probe=False)
    out_dir = Path(cfg.out_dir).expanduser()
    saved = read_state(out_dir) if cfg.resume else None  # unreadable: an error before the model loads
    # Another run's results in out_dir are not overwritten (r is compared once the model is known).
    check_previous_results(out_dir, _fingerprint(cfg, []), ignore=("r",))
    L.seed_everything(cfg.seed, verbose=False)
    backbone, model, transform = load_encoder(cfg.model)
    shape = encoder_shape(backbone, model, transform)
    r = check_schedule(cfg, recipe.path, shape)  # before any compute
    r_value, tokens_left = target_r(cfg, recipe.path)
    image_processor, inputs = load_crops_processor(cfg, recipe.path, shape.image_size)
    full_tokens, native_dummy = shape.tokens, None
    native = native_inputs(cfg, recipe.path, backbone, model)
    if native is not None:  # each image at its own size: tokens are counted up to the largest image's cells
        transform, inputs, full_tokens, native_dummy = native
    fingerprint = _fingerprint(cfg, r)
    # Under Slurm our module handles the requeue signal (save at a step boundary, requeue, stop) in
    # place of Lightning's handler, which would checkpoint the whole encoder from inside the handler.
    # torchrun inside a Slurm job takes precedence, as in Lightning: torchrun then owns the ranks.
    slurm = SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()
    state = check_state(saved, out_dir, fingerprint)
    check_previous_results(out_dir, fingerprint)
    start_step = int(state["steps_done"]) if state else 0
    if start_step:
        log.warning("resuming %s from step %d (%d images seen)", out_dir, start_step, state["images_seen"])

    module = CalibrationModule(
        backbone,
        model,
        r,
        cfg.model.num_blocks,
        out_dir,
        cfg.trainer.save_every_n_steps,
        fingerprint,
        full_tokens,
        state,
        requeue_job=_slurm_job() if slurm else None,
        native=native is not None,
    )
    datamodule = ShardsDataModule.from_config(cfg.data, transform, start_step, image_processor, native_dummy)
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=_strategy(cfg),
        plugins=[SLURMEnvironment(auto_requeue=False)] if slurm else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.trainer.progress_bar,
        callbacks=[CalibrationProgressBar()] if cfg.trainer.progress_bar else [],
        limit_val_batches=cfg.trainer.max_steps,
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)

    path = out_dir / RESULTS_FILE
    if trainer.is_global_zero:
        total_steps = datamodule.dataset.num_steps if datamodule.dataset is not None else module.steps_done
        result = ThresholdsFile(
            backbone=backbone.name,
            num_layers=backbone.num_layers(model),
            image_size=shape.image_size,
            thresholds=[t if rl > 0 else None for t, rl in zip(module.thresholds.mean(), r, strict=True)],
            r=r,
            schedule={
                "kind": cfg.schedule.kind,
                "r": r_value,
                "tokens_left": tokens_left,
                "variant": cfg.schedule.variant,
                "merging_layers": cfg.model.num_blocks or backbone.num_layers(model),
            },
            images_seen=module.images_seen,
            global_batch_size=cfg.data.global_batch_size,
            world_size=trainer.world_size,
            tokens=module.tokens.summary(),
            source="random"
            if cfg.model.random_init
            else str(cfg.model.source or getattr(backbone, "default_source", "")),
            num_blocks=cfg.model.num_blocks,
            extra={
                "steps": module.steps_done,
                "bytes_gathered_per_step": module.bytes_gathered_per_step,
                "bytes_gathered_per_layer": module.bytes_gathered_per_layer,
                "seconds_per_step": module.seconds_per_step,
                "images_skipped": module.images_skipped,
                "index_sum": float(module.index_sums[0]),
                "index_square_sum": float(module.index_sums[1]),
                "total_steps": total_steps,
                "recipe": str(recipe.path),
                "overrides": list(recipe.overrides),
                "fingerprint": fingerprint,
                **({"full_tokens": module.full_tokens.summary()} if module.full_tokens is not None else {}),
            },
            partial=module.steps_done < total_steps,
            inputs=inputs,
        )
        result.save(path)
        merges = _draw_merges(backbone, model, transform, datamodule.dataset, result, out_dir)
        write_report(result, module.tokens.histogram, out_dir, merges)
        _print_summary(result, path)
    return path


MERGES_IMAGES = 8  # images in the report's panel of what merged


def _draw_merges(
    backbone: Backbone,
    model: torch.nn.Module,
    transform: Callable[[Image.Image], torch.Tensor],
    dataset: GlobalBatchShards | None,
    result: ThresholdsFile,
    out_dir: Path,
) -> Path | None:
    """merges.png: the first decodable images of the data under the final thresholds, simplest first."""
    if dataset is None or result.images_seen == 0:
        return None
    parameter = next(model.parameters())
    if isinstance(dataset, GlobalBatchParts):  # the crops or frames calibrated on, as the processor made them
        rows = (dataset.part(i) for i in range(dataset.num_samples))
        pixels = torch.stack(list(itertools.islice((row for row in rows if row is not None), MERGES_IMAGES)))
        groups, lengths = token_groups(
            backbone, model, pixels.to(parameter.device, parameter.dtype), result.policy(), result.num_blocks
        )
        parts = _INPUTS_SEEN[result.inputs["kind"]]
        title = f"{result.backbone}: final groups on the first {parts} under the calibrated thresholds"
        return draw_merges(pixels, groups, lengths, out_dir / "merges.png", title)
    pictures = []
    for i in range(dataset.num_samples):
        try:
            pictures.append(dataset.image(i))
        except ValueError:  # undecodable: counted in images_skipped already
            continue
        if len(pictures) == MERGES_IMAGES:
            break
    if isinstance(dataset, GlobalBatchNative):  # each image at its own size, over cells
        images = [transform(picture).to(parameter.device, parameter.dtype) for picture in pictures]
        groups, lengths = native_token_groups(backbone, model, images, result.policy(), result.num_blocks)
        title = f"{result.backbone}: final groups at native size under the calibrated thresholds, simplest image first"
        return draw_merges(images, groups, lengths, out_dir / "merges.png", title, unit="cells")
    _, pixels = pick_images(pictures, transform, MERGES_IMAGES)
    groups, lengths = token_groups(
        backbone, model, pixels.to(parameter.device, parameter.dtype), result.policy(), result.num_blocks
    )
    title = f"{result.backbone}: final groups under the calibrated thresholds, simplest image first"
    return draw_merges(pixels, groups, lengths, out_dir / "merges.png", title)


def _strategy(cfg: CalibrationRecipe) -> str | DDPStrategy:
    if cfg.trainer.timeout_s is None:
        return cfg.trainer.strategy
    return DDPStrategy(timeout=timedelta(seconds=cfg.trainer.timeout_s))


def _slurm_job() -> str:
    """The id that `scontrol requeue` takes: an array task's own, or the job's."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def _world_size(cfg: CalibrationRecipe) -> int | None:
    devices = cfg.trainer.devices
    if isinstance(devices, int):
        return devices * cfg.trainer.num_nodes
    return None


def _fingerprint(cfg: CalibrationRecipe, r: list[int]) -> dict[str, Any]:
    """What a saved state must agree on to be resumed by this run."""
    return {
        "backbone": cfg.model.backbone,
        "source": "random" if cfg.model.random_init else str(cfg.model.source),
        "arch": dict(cfg.model.arch) if cfg.model.random_init else {},
        "num_blocks": cfg.model.num_blocks,
        "dtype": cfg.model.dtype,
        **({"image_size": cfg.model.image_size} if cfg.model.image_size is not None else {}),
        "r": list(r),
        "shards": str(Path(cfg.data.shards).expanduser().resolve()),
        "global_batch_size": cfg.data.global_batch_size,
        "max_images": cfg.data.max_images,
        "seed": cfg.seed,
        # only when set: states saved before data.crops existed stay resumable
        **(
            {"crops": cfg.data.crops, "processor": cfg.data.processor} if cfg.data.crops in ("anyres", "frames") else {}
        ),
        **(
            {"crops": "native", "min_pixels": cfg.data.min_pixels, "max_pixels": cfg.data.max_pixels}
            if cfg.data.crops == "native"
            else {}
        ),
    }


_INPUTS_SEEN = {
    "anyres_crops": "AnyRes crops",
    "video_frames": "video frames",
    "native": "images at native size",
}  # by thresholds.json's inputs kind


def _print_summary(result: ThresholdsFile, path: Path) -> None:
    tokens = result.tokens
    shown = " ".join("-" if t is None else f"{t:.3f}" for t in result.thresholds)
    # each crop or frame is one image of the ranking
    seen = _INPUTS_SEEN[result.inputs["kind"]] if result.inputs is not None else "images"
    print(f"calibrated {result.backbone}: {result.images_seen} {seen}, world size {result.world_size}")
    print(f"thresholds: {shown}")
    full = result.extra.get("full_tokens")
    if tokens["mean"] is not None and full is not None:  # native sizes: each image has its own full count
        print(
            f"tokens per image: {tokens['mean']:.1f} ± {tokens['std']:.1f} (min {tokens['min']}, "
            f"max {tokens['max']}) of {full['mean']:.1f} on average unmerged (min {full['min']}, max {full['max']})"
        )
    elif tokens["mean"] is not None:
        print(
            f"tokens per image: {tokens['mean']:.1f} ± {tokens['std']:.1f} (min {tokens['min']}, "
            f"max {tokens['max']}) of {tokens['full']}"
        )
    if result.partial:
        print(
            f"partial: {result.extra['steps']} of {result.extra['total_steps']} global steps (trainer.max_steps); "
            "run the same command again to continue"
        )
    print(f"wrote {path} and {path.parent / 'report.md'}")
