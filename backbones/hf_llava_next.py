"""The visual cells of HF LLaVA-NeXT and LLaVA-OneVision (AnyRes) for DyMU, in the model's native layout.

These models cut an image into a base crop (the whole image, resized) and AnyRes tiles, run the
vision tower on every crop, and lay the features out in a sequence of their own: the base crop's
patches, then the tiles stitched into one grid, cut back to the image's aspect ratio ("unpadding"),
for OneVision shrunk by bilinear interpolation when larger than ``anyres_max_N`` crops
("downsampling"), with an ``image_newline`` embedding closing every grid row.

DToMe merges each crop on its own (a crop is one image for the tower, so groups never cross crops).
Each position of the stock sequence is a *cell*; this module finds, for every cell, the patches its
feature is computed from (its *support*), by running the model's own ``pack_image_features`` on a
probe (below). The rule for a cell is then:

* its support lies in one merged group (a base-crop patch, an unpadded tile patch, or a downsampled
  cell whose whole bilinear window is in one group): it is one more virtual position of that group's
  row;
* its support spans several groups (a downsampled cell that straddles groups): it is a row of its own,
  whose feature is the stock pooling of the unmerged features (each patch carrying its group's
  projected token), i.e. unmerge, then pool;
* it has no support (``image_newline``): a row of its own.

Unpadded patches have no cell, so a group loses them; a group left with no cell has no row.

**The probe.** Unpadding is a crop and downsampling a separable bilinear resize, so a cell's support
is (rows it reads) x (columns it reads) of the stitched grid. Feeding ``pack_image_features`` a
one-hot of each patch's grid row and one of its grid column as channels, and zeros as
``image_newline``, gives each cell's rows and columns as its non-zero channels. The probe runs the
model's own layout code, so the cells are where the stock model puts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

ANYRES_MODELS: tuple[type, ...] = (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)


def is_anyres(model: nn.Module) -> bool:
    return isinstance(model, ANYRES_MODELS)


@dataclass(frozen=True)
class Cells:
    """The visual cells of a batch's images, in placeholder order.

    Attributes:
        token: ``[L]`` long, for each cell the merged token (index into the projected tokens) whose
            row it belongs to, or -1 for a cell that is a row of its own.
        own: ``[O, C]``, the features of the cells with a row of their own, in cell order.
        lengths: ``[num_images]`` long, cells (placeholders) per image.
    """

    token: Tensor
    own: Tensor
    lengths: Tensor


def crops_per_image(model: nn.Module, image_sizes: Tensor, batch_num_images: Tensor | None = None) -> list[int]:
    """Crops the vision tower sees for each image (base crop + AnyRes tiles), as the stock model counts them.

    OneVision gives an image no tiles when its sample holds several images (``batch_num_images``)."""
    config = model.config
    single = [True] * len(image_sizes)
    if batch_num_images is not None:
        single = [n == 1 for n in batch_num_images.tolist() for _ in range(n)]
        if len(single) != len(image_sizes):
            raise ValueError(f"batch_num_images counts {len(single)} images; image_sizes has {len(image_sizes)}")
    side = config.vision_config.image_size
    return [
        image_size_to_num_patches(size, config.image_grid_pinpoints, side) if alone else 1
        for size, alone in zip(image_sizes, single, strict=True)
    ]


def crop_pixels(pixel_values: Tensor, crops: list[int]) -> Tensor:
    """``[num_images, max_crops, 3, H, W]`` (padded, as processors give them) or ``[total, 3, H, W]``
    -> ``[total_crops, 3, H, W]``, the crops in image order."""
    if pixel_values.dim() == 5:
        return torch.cat([image[:count] for image, count in zip(pixel_values, crops, strict=True)])
    if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(crops):
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} do not hold the {sum(crops)} crops")
    return pixel_values


def pack(model: nn.Module, features: list[Tensor], image_sizes: Tensor, newline: Tensor) -> list[Tensor]:
    """The model's own ``pack_image_features``: ``[crops_i, P, C]`` per image -> ``[L_i, C]`` per image."""
    inner, config = model.model, model.config
    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        packed, _ = inner.pack_image_features(
            features, image_sizes, image_newline=newline, vision_aspect_ratio=config.vision_aspect_ratio
        )
    else:
        packed, _ = inner.pack_image_features(
            features, image_sizes, config.vision_feature_select_strategy, image_newline=newline
        )
    return list(packed)


def cell_support(model: nn.Module, crops: int, image_size: Tensor, memo: dict | None = None) -> Tensor:
    """``[L, S]`` long: for each cell of one image, the patches (``crop * P + patch``) its feature is
    computed from, -1 padded, valid entries first; a newline cell has none.

    Args:
        model: a LLaVA-NeXT or OneVision model.
        crops: the image's crops (1: the base crop only).
        image_size: ``[2]``, the image's (height, width), as the processor reports it.
        memo: a dict that keeps supports by (crops, height, width) between calls.
    """
    key = (crops, *(int(v) for v in image_size.tolist()))
    if memo is not None and key in memo:
        return memo[key]
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size  # patches a side of one crop
    tiles_high, tiles_wide = 0, 0
    if crops > 1:
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size, model.config.image_grid_pinpoints, vision.image_size
        )
        if tiles_high * tiles_wide + 1 != crops:
            raise ValueError(
                f"an image of size {key[1:]} has {crops} crops; its AnyRes grid needs {tiles_high * tiles_wide + 1}"
            )
    device = model.model.image_newline.device
    # Grid coordinates: rows [0, side) and columns [0, side) are the base crop's; the tiles' stitched
    # grid follows, tile t (row-major, from 1) at tile row (t-1) // tiles_wide, tile column (t-1) % tiles_wide.
    num_rows, num_cols = side * (1 + tiles_high), side * (1 + tiles_wide)
    tile = torch.arange(crops, device=device)[:, None, None]
    pr = torch.arange(side, device=device)[None, :, None]
    pc = torch.arange(side, device=device)[None, None, :]
    grid_row = torch.where(tile == 0, pr, side + (tile - 1).div(max(tiles_wide, 1), rounding_mode="floor") * side + pr)
    grid_col = torch.where(tile == 0, pc, side + (tile - 1).remainder(max(tiles_wide, 1)) * side + pc)
    grid_row, grid_col = grid_row.expand(crops, side, side), grid_col.expand(crops, side, side)
    probe = torch.cat(
        [nn.functional.one_hot(grid_row, num_rows), nn.functional.one_hot(grid_col, num_cols)], dim=-1
    ).float()
    out = pack(model, [probe.flatten(1, 2)], image_size[None], probe.new_zeros(num_rows + num_cols))[0]
    active = out != 0  # [L, rows + cols]: a cell's non-zero channels are the rows and columns it reads
    rows, cols = active[:, :num_rows], active[:, num_rows:]
    read_rows, row_ok = _active_indices(rows)
    read_cols, col_ok = _active_indices(cols)
    r, c = read_rows[:, :, None], read_cols[:, None, :]  # every (row, column) pair of the cell
    base = r < side
    tr, tc = (r - side).clamp(min=0), (c - side).clamp(min=0)
    crop = torch.where(
        base, 0, 1 + tr.div(side, rounding_mode="floor") * max(tiles_wide, 1) + tc.div(side, rounding_mode="floor")
    )
    patch = torch.where(base, r * side + c, tr.remainder(side) * side + tc.remainder(side))
    valid = row_ok[:, :, None] & col_ok[:, None, :]
    support = torch.where(valid, crop * side * side + patch, -1).flatten(1)
    if memo is not None:
        memo[key] = support
    return support


def image_lengths(model: nn.Module, crops: list[int], image_sizes: Tensor, memo: dict | None = None) -> list[int]:
    """Placeholders (cells) each image takes in the stock sequence."""
    return [cell_support(model, n, size, memo).shape[0] for n, size in zip(crops, image_sizes, strict=True)]


def _active_indices(active: Tensor) -> tuple[Tensor, Tensor]:
    """``[L, K]`` bool -> the indices of the True entries, ``[L, k]`` (k = the most in a row), True ones
    first, and whether each is real."""
    count = max(int(active.sum(1).max()), 1) if active.numel() else 1
    values, index = active.float().topk(count, dim=1)
    return index, values > 0


def anyres_cells(
    model: nn.Module,
    visual: Tensor,
    token_of_patch: Tensor,
    crops: list[int],
    image_sizes: Tensor,
    memo: dict | None = None,
) -> Cells:
    """Every image's cells in the stock layout, each a group's row or a row of its own.

    Args:
        model: a LLaVA-NeXT or OneVision model.
        visual: ``[T, C]`` the projected merged tokens of every crop.
        token_of_patch: ``[total_crops, P]`` long, the merged token (row of ``visual``) of each patch.
        crops: crops per image (they sum to ``total_crops``).
        image_sizes: ``[num_images, 2]``.
        memo: see :func:`cell_support`.
    """
    per_image = token_of_patch.split(crops)
    # unmerged: each patch carries its group's projected token; the stock layout of these is what
    # the rows of their own are read from (exactly the stock features when nothing merges)
    stock = pack(model, [visual[tokens] for tokens in per_image], image_sizes, model.model.image_newline)
    supports, offset = [], 0
    for i, tokens in enumerate(per_image):
        support = cell_support(model, crops[i], image_sizes[i], memo)
        if support.shape[0] != stock[i].shape[0]:
            raise RuntimeError(
                f"image {i}: the probe found {support.shape[0]} cells, the model packs {stock[i].shape[0]}"
            )
        supports.append(torch.where(support >= 0, support + offset, -1))
        offset += tokens.numel()
    width = max(s.shape[1] for s in supports)
    support = torch.cat([nn.functional.pad(s, (0, width - s.shape[1]), value=-1) for s in supports])  # [L, S]
    present = support >= 0
    token = token_of_patch.flatten()[support.clamp(min=0)]
    lead = token[:, 0]
    pure = present[:, 0] & ((token == lead[:, None]) | ~present).all(1)
    cell = torch.where(pure, lead, -1)
    lengths = torch.tensor([s.shape[0] for s in stock], device=visual.device)
    return Cells(cell, torch.cat(stock)[~pure], lengths)
