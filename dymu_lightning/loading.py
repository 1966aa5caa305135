"""Loading what a recipe's ``model`` section names: the adapter, the frozen model and its preprocessing.

Every task (calibration, evaluation, fine-tuning) starts here, so the rules for a ``model`` section
(dtype names, image size, random init) live in one place.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from dymu_lightning.backbones import Backbone, get_backbone
from dymu_lightning.backbones.base import local_dir
from dymu_lightning.config.recipes import ConfigError
from dymu_lightning.config.schema import DataConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_encoder(cfg: ModelConfig) -> tuple[Backbone, nn.Module, Callable[[Image.Image], torch.Tensor]]:
    """(adapter, frozen model in ``cfg.dtype``, per-image transform) for a ``model`` section."""
    backbone = get_backbone(cfg.backbone)
    model = backbone.build(cfg.arch) if cfg.random_init else backbone.load(cfg.source)
    model = model.to(DTYPES[cfg.dtype]).eval().requires_grad_(False)
    transform = backbone.image_transform(model)
    if cfg.image_size is not None:
        transform = ResizedTransform(transform, cfg.image_size)
    return backbone, model, transform


class ResizedTransform:
    """A backbone's preprocessing, then the pixels resized to ``size`` x ``size`` (bicubic,
    antialiased). For encoders whose embedding accepts other sizes (HF ViTs interpolate their
    position table); picklable for data-loader workers."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], size: int) -> None:
        self.transform, self.size = transform, size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = self.transform(image)
        if tuple(pixels.shape[-2:]) == (self.size, self.size):
            return pixels
        resized = torch.nn.functional.interpolate(
            pixels[None].float(), size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
        )
        return resized[0].to(pixels.dtype)


def check_arch(path: Path, model: ModelConfig) -> None:
    """A ConfigError for a ``model.arch`` key that the backbone's HF config class does not know (HF
    configs keep unknown keyword arguments as attributes, silently), with the closest known key."""
    config_class = getattr(get_backbone(model.backbone), "config_class", None)
    if config_class is None or not model.arch:
        return
    known = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters) - {"kwargs"}
    for key in model.arch:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean 'model.arch.{close[0]}'?" if close else ""
            raise ConfigError(
                f"{path}: model.arch.{key} is not a setting of {config_class.__name__} "
                f"(backbone '{model.backbone}'){hint}"
            )


def check_model_and_data(
    path: Path, model: ModelConfig, data: DataConfig, more: Sequence[tuple[str, int | None, int]] = ()
) -> None:
    """The checks every shard-reading task makes on its ``model`` and ``data`` sections, plus ``more``
    lower bounds (see :func:`check_at_least`)."""
    check_model(path, model)
    check_at_least(
        path,
        [
            ("data.global_batch_size", data.global_batch_size, 1),
            ("data.max_images", data.max_images, 1),
            ("data.num_workers", data.num_workers, 0),
            ("data.shard_size", data.shard_size, 1),
            *more,
        ],
    )


def check_model(path: Path, model: ModelConfig) -> None:
    """The checks every task makes on its ``model`` section, before anything loads."""
    check_arch(path, model)
    if model.dtype not in DTYPES:
        raise ConfigError(f"{path}: model.dtype={model.dtype!r}; expected one of {sorted(DTYPES)}")
    check_at_least(path, [("model.num_blocks", model.num_blocks, 1), ("model.image_size", model.image_size, 1)])


def check_at_least(path: Path, bounds: Sequence[tuple[str, int | None, int]]) -> None:
    """Each ``(key, value, least)``: a value below ``least`` is an error naming the key; None is not checked."""
    for key, value, least in bounds:
        if value is not None and value < least:
            raise ConfigError(f"{path}: {key} must be >= {least}, got {value}")


@dataclass(frozen=True)
class EncoderShape:
    """What a schedule needs to know of an encoder: blocks, and tokens per image (prefix included)."""

    num_layers: int
    tokens: int
    num_prefix: int
    image_size: int


def encoder_shape(
    backbone: Backbone, model: nn.Module, transform: Callable[[Image.Image], torch.Tensor]
) -> EncoderShape:
    """The shape of ``model`` fed through ``transform`` (one blank image through the embedding)."""
    probe = transform(Image.new("RGB", (64, 64)))[None]
    device = next(model.parameters()).device
    with torch.no_grad():
        tokens = backbone.embed(model, probe.to(device, next(model.parameters()).dtype)).shape[1]
    return EncoderShape(
        backbone.num_layers(model), int(tokens), backbone.num_prefix_tokens(model), int(probe.shape[-1])
    )


def probe_shape(cfg: ModelConfig, path: Path | str = "model") -> EncoderShape | None:
    """The encoder's shape without loading weights: the model is built on the meta device from
    ``model.arch`` (random_init) or from the config.json of a local HF directory. None where that
    needs the weights themselves (a hub id, a timm checkpoint)."""
    backbone = get_backbone(cfg.backbone)
    config_class = getattr(backbone, "config_class", None)
    directory = None
    if not cfg.random_init:
        source = cfg.source if cfg.source is not None else getattr(backbone, "default_source", None)
        directory = local_dir(source) if source is not None else None
        if config_class is None or directory is None or not (Path(directory) / "config.json").is_file():
            return None
    with torch.device("meta"):
        if cfg.random_init:
            try:
                model = backbone.build(cfg.arch)
            except TypeError as error:  # timm: an argument the model does not take
                raise ConfigError(f"{path}: model.arch: backbone '{cfg.backbone}' cannot build it ({error})") from None
        else:
            model = backbone.model_class(config_class.from_pretrained(str(directory)))
            model.name_or_path = str(directory)  # its preprocessing comes from the directory, as on load
    transform = backbone.image_transform(model)
    if cfg.image_size is not None:
        transform = ResizedTransform(transform, cfg.image_size)
    return encoder_shape(backbone, model, transform)


def check_pattern(path: Path, key: str, pattern: str) -> None:
    """``pattern`` must be a regular expression with a group (a label, a scene name)."""
    try:
        groups = re.compile(pattern).groups
    except re.error as error:
        raise ConfigError(f"{path}: {key} is not a regular expression: {error}") from None
    if groups < 1:
        raise ConfigError(f"{path}: {key} needs a group, e.g. '^(\\d+)_'")
