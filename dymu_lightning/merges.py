"""What merged: images beside their final token groups, from the simplest image to the busiest.

Each image is shown as the encoder sees it (preprocessed); each of its patches is coloured by the
output token that represents it, so one flat colour is one merged token, and the title gives the
image's token count. Used by the ``merges`` command (any backbone, any thresholds.json) and by the
calibration report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from dymu_lightning.backbones import Backbone
from dymu_lightning.core import MergePolicy
from dymu_lightning.plots import pyplot


def token_groups(
    backbone: Backbone, model: nn.Module, pixels: Tensor, policy: MergePolicy, num_blocks: int | None = None
) -> tuple[Tensor, Tensor]:
    """(``[B, h, w]`` group of each patch, ``[B]`` output tokens per image) under ``policy``.

    Groups are numbered per image; patches with the same number became one token."""
    with torch.inference_mode():
        out = backbone.merged_forward(model, pixels, policy, num_blocks=num_blocks)
    group = out.group.cpu()
    side = math.isqrt(group.shape[1])
    if side * side != group.shape[1]:
        raise ValueError(f"{group.shape[1]} patches do not form a square grid")
    return group.reshape(-1, side, side), out.lengths.cpu()


def native_token_groups(
    backbone: Backbone,
    model: nn.Module,
    images: Sequence[Tensor],
    policy: MergePolicy,
    num_blocks: int | None = None,
) -> tuple[list[Tensor], Tensor]:
    """(each image's ``[h, w]`` group of each cell, ``[B]`` output tokens per image) for a tower that
    takes images at their own size (``merged_forward_images``, the Qwen-VL towers): ``images`` are
    ``[3, H, W]`` each, and a cell is ``cell_pixels`` px on a side, one language-model token."""
    with torch.inference_mode():
        out = backbone.merged_forward_images(model, list(images), policy, num_blocks=num_blocks)
    unit = backbone.cell_pixels(model)
    group = out.group.cpu()
    maps = []
    for i, image in enumerate(images):
        h, w = image.shape[1] // unit, image.shape[2] // unit
        maps.append(group[i, : h * w].reshape(h, w))  # cells in raster order, as the tower packs them
    return maps, out.lengths.cpu()


def group_colours(groups: Tensor, seed: int = 0) -> Tensor:
    """``[h, w, 3]`` float colours in [0, 1]: one random colour per group (fixed by ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    palette = 0.15 + 0.85 * torch.rand(int(groups.max()) + 1, 3, generator=generator)
    return palette[groups]


def draw_merges(
    pixels: Tensor | Sequence[Tensor],
    groups: Tensor | Sequence[Tensor],
    lengths: Tensor,
    path: Path,
    title: str = "",
    columns: int = 4,
    unit: str = "patches",
) -> Path:
    """Save a panel to ``path``: each image as the encoder sees it (``pixels``, ``[B, 3, H, W]`` or one
    ``[3, H_i, W_i]`` each, after preprocessing, contrast stretched) beside its coloured groups
    (``[B, h, w]`` or one ``[h_i, w_i]`` each, over ``unit``: patches, or cells), ordered by token
    count (the simplest image first), titled with the count."""
    plt = pyplot()
    order = torch.argsort(lengths, stable=True).tolist()
    columns = max(1, min(columns, len(order)))
    rows = math.ceil(len(order) / columns)
    figure, axes = plt.subplots(rows, 2 * columns, figsize=(2.2 * 2 * columns, 2.4 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for slot, i in enumerate(order):
        row, column = divmod(slot, columns)
        picture = pixels[i].detach().float().cpu().permute(1, 2, 0)
        picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-6)
        axes[row, 2 * column].imshow(picture.numpy())
        axes[row, 2 * column + 1].imshow(group_colours(groups[i]).numpy(), interpolation="nearest")
        axes[row, 2 * column + 1].set_title(f"{int(lengths[i])} tokens", fontsize=9)
        height, width = groups[i].shape
        axes[row, 2 * column].set_title(f"{height}x{width} {unit}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def pick_images(
    images: Sequence[Image.Image], transform: Callable[[Image.Image], Tensor], count: int
) -> tuple[list[Image.Image], Tensor]:
    """The first ``count`` images and their pixels ``[count, 3, H, W]``."""
    chosen = list(images[:count])
    return chosen, torch.stack([transform(image) for image in chosen])


def merges_command(
    thresholds: Path, images: str = "assets:skimage", max_images: int = 8, out: Path = Path("merges.png"),
    source: str | None = None,
) -> int:  # fmt: skip
    """The ``merges`` command: load the backbone a thresholds file names, draw ``max_images`` images."""
    from dymu_lightning.backbones import get_backbone
    from dymu_lightning.backbones.thresholds import ThresholdsFile
    from dymu_lightning.data.shards import image_files
    from dymu_lightning.data.source import resolve_images
    from dymu_lightning.loading import ResizedTransform

    if max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    calibrated = ThresholdsFile.load(thresholds)
    backbone = get_backbone(calibrated.backbone)
    weights = source if source is not None else calibrated.source
    if weights in ("", "random"):
        raise ValueError(
            f"{thresholds}: source={weights!r}: the thresholds belong to random weights; give the weights with --source"
        )
    files = image_files(resolve_images(images))[:max_images]
    model = backbone.load(weights).float().eval()
    pictures = [Image.open(f).convert("RGB") for f in files]
    if calibrated.inputs is not None and calibrated.inputs["kind"] == "native":  # each image at its own size
        bounds = {key: calibrated.inputs[key] for key in ("min_pixels", "max_pixels")}
        pixels = backbone.preprocess_native(model, pictures, **bounds)
        groups, lengths = native_token_groups(backbone, model, pixels, calibrated.policy(), calibrated.num_blocks)
        title = f"{calibrated.backbone} at native size, {thresholds}: cells of {backbone.cell_pixels(model)} px"
        draw_merges(pixels, groups, lengths, out, title, unit="cells")
    else:
        transform = ResizedTransform(backbone.image_transform(model), calibrated.image_size)
        _, pixels = pick_images(pictures, transform, max_images)
        groups, lengths = token_groups(backbone, model, pixels, calibrated.policy(), calibrated.num_blocks)
        full = groups.shape[-1] ** 2
        title = f"{calibrated.backbone} at {calibrated.image_size} px, {thresholds}: {full} patches"
        draw_merges(pixels, groups, lengths, out, title)
    for file, length in zip(files, lengths.tolist(), strict=True):
        print(f"{file.name}: {length} tokens")
    print(f"wrote {out}")
    return 0
