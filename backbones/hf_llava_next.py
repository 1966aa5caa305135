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

OneVision's video frames are crops too: each is merged on its own, pooled 2 x 2 by the model's own
``apply_pooling`` (the same rules: a pooled cell is its group's row or a row of its own), and one
``image_newline`` closes each video.

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


def processor_crops(model: nn.Module, image_processor: object, images: list) -> Tensor:
    """``[total_crops, 3, H, W]``: the crops the model's own image processor makes of ``images`` (each
    image's base crop and AnyRes tiles), as the vision tower sees them at inference.

    Calibrating on these, rather than on whole images resized to the crop size, ranks the edges of
    the crops DyMU will merge (tiles are zoomed-in views, with other statistics than whole images).

    Args:
        model: a LLaVA-NeXT or OneVision model (its config gives the crops per image).
        image_processor: the model's image processor (``processor.image_processor``).
        images: PIL images (or what the processor accepts), each processed as an image of its own.
    """
    out = image_processor(images=images, return_tensors="pt")
    crops = crops_per_image(model, out["image_sizes"], out.get("batch_num_images"))
    return crop_pixels(out["pixel_values"], crops)


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
    tiles_high, tiles_wide = 0, 0
    if crops > 1:
        tiles_high, tiles_wide = get_anyres_image_grid_shape(
            image_size, model.config.image_grid_pinpoints, vision.image_size
        )
        if tiles_high * tiles_wide + 1 != crops:
            raise ValueError(
                f"an image of size {key[1:]} has {crops} crops; its AnyRes grid needs {tiles_high * tiles_wide + 1}"
            )
    grid = _Grid(vision.image_size // vision.patch_size, tiles_high, tiles_wide)
    probe = grid.probe(crops, model.model.image_newline.device)
    out = pack(model, [probe], image_size[None], probe.new_zeros(probe.shape[-1]))[0]
    support = grid.support(out)
    if memo is not None:
        memo[key] = support
    return support


def frame_support(model: nn.Module, memo: dict | None = None) -> Tensor:
    """``[L, S]`` long: for each cell of one pooled video frame, the frame's patches it pools, -1 padded."""
    if memo is not None and "frame" in memo:
        return memo["frame"]
    vision = model.config.vision_config
    grid = _Grid(vision.image_size // vision.patch_size, 0, 0)
    probe = grid.probe(1, model.model.image_newline.device)
    support = grid.support(model.model.apply_pooling(probe)[0])
    if memo is not None:
        memo["frame"] = support
    return support


@dataclass(frozen=True)
class _Grid:
    """The grid coordinates of one image's patches: rows and columns ``[0, side)`` are the base
    crop's; the tiles' stitched grid follows, tile t (row-major, from 1) at tile row
    ``(t - 1) // tiles_wide`` and tile column ``(t - 1) % tiles_wide``."""

    side: int
    tiles_high: int
    tiles_wide: int

    @property
    def num_rows(self) -> int:
        return self.side * (1 + self.tiles_high)

    def probe(self, crops: int, device: torch.device) -> Tensor:
        """``[crops, P, rows + cols]`` float: a one-hot of each patch's grid row, then of its grid column."""
        side, wide = self.side, max(self.tiles_wide, 1)
        tile = torch.arange(crops, device=device)[:, None, None]
        pr = torch.arange(side, device=device)[None, :, None]
        pc = torch.arange(side, device=device)[None, None, :]
        row = torch.where(tile == 0, pr, side + (tile - 1).div(wide, rounding_mode="floor") * side + pr)
        col = torch.where(tile == 0, pc, side + (tile - 1).remainder(wide) * side + pc)
        row, col = row.expand(crops, side, side), col.expand(crops, side, side)
        one_hot = nn.functional.one_hot
        probe = torch.cat([one_hot(row, self.num_rows), one_hot(col, side * (1 + self.tiles_wide))], dim=-1)
        return probe.flatten(1, 2).float()

    def support(self, out: Tensor) -> Tensor:
        """The probe after the layout, ``[L, rows + cols]`` -> ``[L, S]`` patches (``crop * P + patch``)
        each cell reads: its non-zero channels are the rows and the columns it reads."""
        side, wide = self.side, max(self.tiles_wide, 1)
        active = out != 0
        read_rows, row_ok = _active_indices(active[:, : self.num_rows])
        read_cols, col_ok = _active_indices(active[:, self.num_rows :])
        r, c = read_rows[:, :, None], read_cols[:, None, :]  # every (row, column) pair of the cell
        base = r < side
        tr, tc = (r - side).clamp(min=0), (c - side).clamp(min=0)
        crop = torch.where(
            base, 0, 1 + tr.div(side, rounding_mode="floor") * wide + tc.div(side, rounding_mode="floor")
        )
        patch = torch.where(base, r * side + c, tr.remainder(side) * side + tc.remainder(side))
        valid = row_ok[:, :, None] & col_ok[:, None, :]
        return torch.where(valid, crop * side * side + patch, -1).flatten(1)


def image_lengths(model: nn.Module, crops: list[int], image_sizes: Tensor, memo: dict | None = None) -> list[int]:
    """Placeholders (cells) each image takes in the stock sequence."""
    return [cell_support(model, n, size, memo).shape[0] for n, size in zip(crops, image_sizes, strict=True)]


def _active_indices(active: Tensor) -> tuple[Tensor, Tensor]:
    """``[L, K]`` bool -> the indices of the True entries, ``[L, k]`` (k = the most in a row), True ones
    first, and whether each is real."""
    count = max(int(active.sum(1).max()), 1) if active.numel() else 1
    values, index = active.float().topk(count, dim=1)
    return index, values > 0


def _classify(token_of_patch: Tensor, supports: list[Tensor], stock: Tensor) -> tuple[Tensor, Tensor]:
    """Cells -> (``[L]`` the merged token of each cell whose support is one group, else -1; ``[O, C]``
    the stock features of the other cells).

    ``token_of_patch``: ``[n, P]``; ``supports``: ``[L_i, S_i]`` indices into its flattening, -1
    padded; ``stock``: ``[L, C]`` the stock layout of the unmerged features.
    """
    width = max(s.shape[1] for s in supports)
    support = torch.cat([nn.functional.pad(s, (0, width - s.shape[1]), value=-1) for s in supports])  # [L, S]
    present = support >= 0
    token = token_of_patch.flatten()[support.clamp(min=0)]
    lead = token[:, 0]
    pure = present[:, 0] & ((token == lead[:, None]) | ~present).all(1)
    return torch.where(pure, lead, -1), stock[~pure]


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
    cell, own = _classify(token_of_patch, supports, torch.cat(stock))
    return Cells(cell, own, torch.tensor([s.shape[0] for s in stock], device=visual.device))


def video_cells(
    model: nn.Module, visual: Tensor, token_of_patch: Tensor, frames: int, memo: dict | None = None
) -> Cells:
    """Every video's cells in OneVision's layout: each frame pooled (2 x 2 bilinear), the frames one
    after the other, one ``image_newline`` closing the video.

    Args:
        model: a LLaVA-OneVision model.
        visual: ``[T, C]`` the projected merged tokens.
        token_of_patch: ``[videos * frames, P]`` long, the merged token of each frame's patches
            (each frame is merged on its own).
        frames: frames per video.
        memo: see :func:`cell_support`.
    """
    videos, patches = token_of_patch.shape[0] // frames, token_of_patch.shape[1]
    pooled = model.model.apply_pooling(visual[token_of_patch])  # [videos * frames, P', C], of the unmerged frames
    newline = model.model.image_newline.to(pooled)[None, None].expand(videos, 1, -1)
    stock = torch.cat([pooled.reshape(videos, -1, pooled.shape[-1]), newline], dim=1)  # [videos, F * P' + 1, C]
    support = frame_support(model, memo)  # [P', S], patches of one frame
    offset = (torch.arange(videos * frames, device=support.device) * patches)[:, None, None]
    per_frame = torch.where(support >= 0, support + offset, -1)  # [videos * frames, P', S]
    per_video = per_frame.reshape(videos, -1, support.shape[1])
    no_support = per_video.new_full((videos, 1, support.shape[1]), -1)  # the newline
    supports = [torch.cat([per_video, no_support], dim=1).flatten(0, 1)]
    cell, own = _classify(token_of_patch, supports, stock.flatten(0, 1))
    return Cells(cell, own, torch.full((videos,), stock.shape[1], device=visual.device))
