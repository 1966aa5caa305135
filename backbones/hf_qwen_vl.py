"""The vision towers of Qwen2-VL and Qwen2.5-VL: 2D-rotary ViTs at native resolution.

The tower takes flattened patches of any number of images (``[N, 3 * t * p * p]``, with a
``grid_thw`` row per image), runs its blocks over them with each image its own attention sequence
(Qwen2.5: most blocks only within windows of ``w x w`` cells), and its patch merger folds every 2x2
window of patches (4 consecutive tokens, one *cell*) into one language-model token.

DToMe here merges whole cells (:mod:`dymu_lightning.core.rotary_units`): a token of this adapter is
one cell, so sizes, group maps and token counts are in the language model's own grid, and the patch
merger stays exact. See docs/concepts.md ("Rotary towers that fold cells").

Two entry points:

* :meth:`HFQwen2VLVision.merged_forward` takes ``[B, 3, H, W]`` square batches like every adapter
  (the registry-wide tests), patchified here with the processor's layout;
* :meth:`HFQwen2VLVision.merged_forward_images` takes images of different sizes (native resolution),
  packed as the tower packs them.

Videos: the tower cuts a video into temporal slices of ``temporal_patch_size`` frames and attends
within each slice only (its ``cu_seqlens`` repeat ``h * w`` per slice; Qwen2.5's windows are per slice
too), every slice at the same 2D positions. To the tower a video of ``t`` slices is therefore ``t``
images of one slice each, and that is how it is merged here (:func:`temporal_slices`): groups never
cross slices, and :class:`MergedTokens` has one row per slice.

The whole model (tower, then VTU over M-RoPE in the language model) is in
:mod:`dymu_lightning.backbones.hf_qwen_vl_lm`.

Not done yet: the static engine path and the CUDA varlen kernels (attention runs on a padded grid per image
or slice).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn
from transformers import Qwen2_5_VLVisionConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)
from transformers.vision_utils import get_vision_position_ids

from dymu_lightning.backbones.base import Backbone, TinyConfig, local_dir
from dymu_lightning.core import BlockParts, MergedTokens, MergePolicy
from dymu_lightning.core.rotary_units import ROTARY_MODES, Rotary, RotaryBlockParts, UnitBatch, run_unit_blocks

#: Qwen-VL's preprocessing statistics (those of OpenAI CLIP).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
#: The pixel budget of Qwen's image processor by default: 4 to 1280 cells of 28 x 28 px.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280
#: Where a whole model keeps its tower's weights: transformers 5.x, and checkpoints written by 4.x.
TOWER_PREFIXES = ("model.visual.", "visual.")
#: A sharded checkpoint's map from each weight to its file (transformers' name for it).
SHARD_INDEX = "model.safetensors.index.json"


def _tower_prefix(key: str) -> str | None:
    """The prefix under which ``key`` is a tower weight, or None for any other weight."""
    return next((prefix for prefix in TOWER_PREFIXES if key.startswith(prefix)), None)


def _tower_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a whole model that hold tower weights: those the shard index names for
    them, or every file where there is no index."""
    index = directory / SHARD_INDEX
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    weight_map = json.loads(index.read_text())["weight_map"]
    return [directory / name for name in sorted({f for key, f in weight_map.items() if _tower_prefix(key)})]


def _download_tower_files(repo_id: str) -> Path:
    """A hub repository's local snapshot folder with ``config.json`` and, for a whole model, only the
    safetensors files that hold the tower (a few hundred MB of a 7B model's 16 GB); a saved tower's
    repository is fetched whole by ``from_pretrained``."""
    directory = Path(hf_hub_download(repo_id, "config.json")).parent
    if "vision_config" not in json.loads((directory / "config.json").read_text()):
        return Path(snapshot_download(repo_id))
    try:
        index = json.loads(Path(hf_hub_download(repo_id, SHARD_INDEX)).read_text())
    except EntryNotFoundError:  # one unsharded file
        hf_hub_download(repo_id, "model.safetensors")
        return directory
    for name in sorted({f for key, f in index["weight_map"].items() if _tower_prefix(key)}):
        hf_hub_download(repo_id, name)
    return directory


class HFQwen2VLVision(Backbone):
    """``Qwen2VisionTransformerPretrainedModel``: every block attends over the whole image."""

    model_class: type[nn.Module] = Qwen2VisionTransformerPretrainedModel
    config_class: type = Qwen2VLVisionConfig
    #: blocks() cannot describe a rotary block as plain :class:`BlockParts`: the generic naive ViT
    #: reference does not apply (tests/test_qwen_vl.py has this family's own).
    plain_blocks = False

    def __init__(self, default_source: str | os.PathLike[str] | None = None) -> None:
        self.default_source = default_source

    # ----- building and loading ---------------------------------------------------------------------
    def load(self, source: str | os.PathLike[str] | None = None) -> nn.Module:
        """A vision tower from a hub id or a local directory: a saved tower (``save_pretrained`` of the
        tower itself), or a whole Qwen2-VL / Qwen2.5-VL, of which only the tower's config and weights
        are read (the language model's weights are never loaded; from the hub, only the safetensors
        files that hold tower weights are downloaded)."""
        source = source if source is not None else self.default_source
        if source is None:
            raise ValueError(f"backbone '{self.name}' needs a hub id or a local directory to load from")
        directory = local_dir(source)
        if directory is None:
            directory = _download_tower_files(str(source))
        if "vision_config" in json.loads((directory / "config.json").read_text()):
            return self._tower_of_whole_model(directory)
        return self.model_class.from_pretrained(str(directory), attn_implementation="sdpa").eval()

    def _tower_of_whole_model(self, directory: Path) -> nn.Module:
        """The tower of a whole saved model: its ``vision_config``, and the weights under ``model.visual.``
        (transformers 5.x) or ``visual.`` (checkpoints written by 4.x), read tensor by tensor from the
        safetensors files that hold them (a 7B checkpoint is never read whole)."""
        config = self.config_class.from_dict(json.loads((directory / "config.json").read_text())["vision_config"])
        config._attn_implementation = "sdpa"
        model = self.model_class(config)
        state = {}
        for file in _tower_weight_files(directory):
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                    prefix = _tower_prefix(key)
                    if prefix is not None:
                        state[key[len(prefix) :]] = weights.get_tensor(key)
        if not state:
            raise FileNotFoundError(f"backbone '{self.name}': no vision tower weights in {directory}/*.safetensors")
        model.load_state_dict(state, strict=True)
        dtype = next(iter(state.values())).dtype
        return model.to(dtype).eval()

    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """A random tower; ``img_size`` (the square side :meth:`preprocess` and the tests use) is ours,
        not the host config's, and is kept on the model as ``dymu_image_size``."""
        config = dict(config)
        image_size = config.pop("img_size", None)
        model_config = self.config_class(**config)
        model_config._attn_implementation = "sdpa"
        model = self.model_class(model_config).eval()
        if image_size is not None:
            model.dymu_image_size = int(image_size)
        return model

    def tiny_configs(self) -> Sequence[TinyConfig]:
        # 16 x 16 patches of 4 px = 64 cells per 64 px image. Without absolute position embeddings,
        # the keys of a smooth image are nearly equal at the default init (0.02): a wider init
        # spreads the similarities, so float32 rounding decides no test's merges.
        return [
            TinyConfig(
                "tiny",
                {
                    "depth": 3,
                    "embed_dim": 32,
                    "hidden_size": 24,
                    "num_heads": 2,
                    "mlp_ratio": 2,
                    "patch_size": 4,
                    "initializer_range": 0.1,
                    "img_size": 64,
                },
            )
        ]

    def handles(self, model: nn.Module) -> bool:
        return type(model) is self.model_class

    # ----- preprocessing ------------------------------------------------------------------------------
    def image_size(self, model: nn.Module) -> int:
        """The square side of :meth:`preprocess` (a multiple of ``patch * merge``)."""
        unit = self.cell_pixels(model)
        size = getattr(model, "dymu_image_size", None) or 448
        return -(-size // unit) * unit

    def cell_pixels(self, model: nn.Module) -> int:
        """Pixels on a side of one cell (one language-model token): ``patch * merge`` (28 for Qwen)."""
        return model.config.patch_size * model.config.spatial_merge_size

    def preprocess(self, model: nn.Module, images: Sequence[Image.Image]) -> Tensor:
        """Square resize to :meth:`image_size` (bicubic) and Qwen's normalisation: ``[B, 3, S, S]``.
        (Qwen's own processor keeps the aspect ratio: :meth:`preprocess_native` sizes images so.)"""
        size = self.image_size(model)
        out = []
        for image in images:
            array = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
            pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
            out.append((pixels - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None])
        return torch.stack(out)

    def native_size(
        self, model: nn.Module, height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
    ) -> tuple[int, int]:
        """The size Qwen's image processor resizes an image to: each side to the nearest multiple of
        :meth:`cell_pixels`, then, if the area is outside ``[min_pixels, max_pixels]``, both sides
        scaled by one factor (keeping the aspect ratio) and rounded down (too big) or up (too small)
        to multiples again. Images more than 200 times as long as wide are refused, as there."""
        unit = self.cell_pixels(model)
        if max(height, width) > 200 * min(height, width):
            raise ValueError(f"backbone '{self.name}': a {height} x {width} image is over 200 times as long as wide")
        h, w = max(unit, round(height / unit) * unit), max(unit, round(width / unit) * unit)
        # The same float operations as the processor (divide by the shrink, multiply by the growth),
        # so a side on a multiple's edge rounds the same way.
        if h * w > max_pixels:
            shrink = math.sqrt(height * width / max_pixels)
            h = max(unit, math.floor(height / shrink / unit) * unit)
            w = max(unit, math.floor(width / shrink / unit) * unit)
        elif h * w < min_pixels:
            growth = math.sqrt(min_pixels / (height * width))
            h, w = math.ceil(height * growth / unit) * unit, math.ceil(width * growth / unit) * unit
        return h, w

    def preprocess_native(
        self,
        model: nn.Module,
        images: Sequence[Image.Image],
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
    ) -> list[Tensor]:
        """Images at native resolution, as Qwen's processor sizes them (:meth:`native_size`; bicubic)
        with its normalisation: one ``[3, H, W]`` each, ready for :meth:`merged_forward_images`."""
        out = []
        for image in images:
            height, width = self.native_size(model, image.height, image.width, min_pixels, max_pixels)
            array = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
            pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
            out.append((pixels - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None])
        return out

    def patchify(self, model: nn.Module, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Images as the tower takes them: each ``[3, H, W]`` (sides multiples of :meth:`cell_pixels`)
        becomes ``t = temporal_patch_size`` identical frames cut into patches, listed cell by cell
        (the 4 patches of a 2x2 cell consecutive), each patch flattened as ``(channel, frame, y, x)``.

        Returns:
            ``[N, 3 * t * p * p]`` patches of all images, and ``grid_thw`` ``[B, 3]`` long
            (``(1, H / p, W / p)`` per image).
        """
        t = model.config.temporal_patch_size
        return self._cut(model, [image[None].expand(t, *image.shape) for image in images], "image")

    def patchify_videos(self, model: nn.Module, videos: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Videos as the tower takes them (what Qwen's video processor returns as
        ``pixel_values_videos`` and ``video_grid_thw``): each ``[F, 3, H, W]``, ``F`` a multiple of
        ``temporal_patch_size``, is cut into slices of that many consecutive frames, slice after slice,
        each slice cut as :meth:`patchify` cuts an image.

        Returns:
            ``[N, 3 * t * p * p]`` patches, and ``grid_thw`` ``[V, 3]`` long (``(F / t, H / p, W / p)``).
        """
        t = model.config.temporal_patch_size
        for video in videos:
            if video.dim() != 4 or video.shape[0] % t:
                raise ValueError(
                    f"backbone '{self.name}': a video must be [frames, 3, H, W] with frames a multiple of "
                    f"temporal_patch_size {t}, got {list(video.shape)}"
                )
        return self._cut(model, videos, "video")

    def _cut(self, model: nn.Module, clips: Sequence[Tensor], kind: str) -> tuple[Tensor, Tensor]:
        """``[F, 3, H, W]`` clips (``F`` a multiple of ``temporal_patch_size``) -> patches and grid rows."""
        config = model.config
        p, m, t = config.patch_size, config.spatial_merge_size, config.temporal_patch_size
        rows, grids = [], []
        for clip in clips:
            frames, channels, height, width = clip.shape
            if height % (p * m) or width % (p * m):
                raise ValueError(
                    f"backbone '{self.name}': {kind} sides must be multiples of {p * m} px (patch {p} x merge {m}), "
                    f"got {height} x {width}"
                )
            gt, gh, gw = frames // t, height // p, width // p
            cut = clip.reshape(gt, t, channels, gh // m, m, p, gw // m, m, p)
            # -> (slice, cell row, cell column, row in cell, column in cell, channel, frame, y, x)
            rows.append(cut.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, channels * t * p * p))
            grids.append((gt, gh, gw))
        return torch.cat(rows), torch.tensor(grids, dtype=torch.long, device=clips[0].device)

    # ----- the host's anatomy -------------------------------------------------------------------------
    def width(self, model: nn.Module) -> int:
        """Channels inside the tower."""
        return model.config.embed_dim

    def unit(self, model: nn.Module) -> int:
        """Tokens per cell (4 for a 2x2 merger)."""
        return model.config.spatial_merge_size**2

    def embed(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """``[B, 3, S, S]`` -> ``[B, cells, 4 * C]``: each cell's 4 patch embeddings side by side."""
        patches, grid = self.patchify(model, list(pixels))
        x = self.embed_patches(model, patches, grid)
        return x.reshape(pixels.shape[0], -1, self.unit(model) * x.shape[-1])

    def embed_patches(self, model: nn.Module, patches: Tensor, grid_thw: Tensor) -> Tensor:
        """``[N, 3 * t * p * p]`` patches (``grid_thw`` ``[I, 3]``) -> ``[N, C]``: what the host adds up
        before its first block (the patch embedding; Qwen3-VL adds position embeddings)."""
        return model.patch_embed(patches)

    def taps(self, model: nn.Module) -> dict[int, Callable[[Tensor], Tensor]]:
        """Block index -> a map ``[T, 4 * C] -> [T, C_out]`` on cells read after that block (none here;
        Qwen3-VL's DeepStack mergers)."""
        return {}

    def blocks(self, model: nn.Module) -> list[BlockParts]:
        raise NotImplementedError(
            f"backbone '{self.name}': its blocks rotate q and k by 2D positions, which BlockParts cannot "
            "express; use rotary_blocks() and merged_forward()"
        )

    def num_layers(self, model: nn.Module) -> int:
        return len(model.blocks)

    def windowed_layers(self, model: nn.Module) -> set[int]:
        """Blocks that attend within windows only (none in Qwen2-VL)."""
        return set()

    def rotary_blocks(self, model: nn.Module) -> list[RotaryBlockParts]:
        windowed = self.windowed_layers(model)
        return [self._parts(block, index in windowed) for index, block in enumerate(model.blocks)]

    def _parts(self, block: nn.Module, windowed: bool) -> RotaryBlockParts:
        attn = block.attn

        def attn_in(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            q, k, v = attn.qkv(block.norm1(x)).view(x.shape[0], 3, attn.num_heads, -1).unbind(1)
            return q, k, v

        return RotaryBlockParts(
            attn_in=attn_in,
            attn_out=attn.proj,
            mlp=lambda x: block.mlp(block.norm2(x)),
            scale=attn.scaling,
            windowed=windowed,
        )

    def final_norm(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        """The patch merger, as a map ``[T, 4 * C] -> [T, C_out]`` on cells."""
        width = self.width(model)
        return lambda cells: model.merger(cells.reshape(-1, width))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def windows(self, model: nn.Module, grid_thw: Tensor) -> Tensor | None:
        """``[cells]`` each cell's attention window within its image or video slice, or None (no
        windowed block)."""
        return None

    def stock_features(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """``[B, cells, C_out]``: the host's own forward (merger output), image by image."""
        patches, grid = self.patchify(model, list(pixels))
        out = model(hidden_states=patches, grid_thw=grid).pooler_output
        return out.reshape(pixels.shape[0], -1, out.shape[-1])

    def stock_features_images(self, model: nn.Module, images: Sequence[Tensor]) -> list[Tensor]:
        """Images of any sizes through the host's own forward, packed: one ``[cells_b, C_out]`` each."""
        return self.stock_features_patches(model, *self.patchify(model, images))

    def stock_features_patches(self, model: nn.Module, patches: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """Patches of images and videos (``grid_thw`` ``[I, 3]``) through the host's own forward: one
        ``[cells, C_out]`` per temporal slice (:func:`temporal_slices`), as :meth:`merged_forward_patches`
        lists them."""
        out = model(hidden_states=patches, grid_thw=grid_thw).pooler_output
        slices = temporal_slices(grid_thw)
        return list(out.split((slices[:, 1] * slices[:, 2] // self.unit(model)).tolist()))

    # ----- the merged forward ---------------------------------------------------------------------------
    def merged_forward(
        self,
        model: nn.Module,
        pixels: Tensor,
        policy: MergePolicy,
        backend: str = "sdpa",
        num_blocks: int | None = None,
        path: str = "auto",
        compile_merge: bool = False,
        rotary: str = "exact",
        compile_blocks: bool = False,
    ) -> MergedTokens:
        """DToMe over ``[B, 3, S, S]`` pixels; tokens are cells (see :meth:`merged_forward_images`).
        ``path`` must be ``"auto"`` or ``"dynamic"`` and ``compile_merge``, ``compile_blocks`` False:
        this family runs its own rotary engine, with no static path and nothing compiled yet."""
        if path not in ("auto", "dynamic"):
            raise ValueError(f"backbone '{self.name}' has only the dynamic engine path, got path={path!r}")
        for name, value in (("compile_merge", compile_merge), ("compile_blocks", compile_blocks)):
            if value:
                raise ValueError(f"backbone '{self.name}' has no compiled engine yet; use {name}=False")
        return self.merged_forward_images(model, list(pixels), policy, backend, num_blocks, rotary)

    def merged_forward_images(
        self,
        model: nn.Module,
        images: Sequence[Tensor],
        policy: MergePolicy,
        backend: str = "sdpa",
        num_blocks: int | None = None,
        rotary: str = "exact",
    ) -> MergedTokens:
        """DToMe over images of different sizes, packed as the tower packs them.

        Args:
            images: each ``[3, H, W]``, sides multiples of :meth:`cell_pixels`.
            policy: per-layer merging; edges are between cells of one image (and one window).
            backend: ``"sdpa"`` or ``"eager"``.
            num_blocks: run only the first blocks and skip the patch merger (tokens ``[B, L, 4 * C]``).
            rotary: ``"exact"`` (virtual full grid) or ``"mean"`` (merged rows at mean positions).

        Returns:
            :class:`MergedTokens` over cells: ``tokens`` ``[B, L, C_out]``, ``group`` ``[B, U0]`` (each
            cell's output token, ``-1`` past an image's cells), sizes in cells.
        """
        patches, grid = self.patchify(model, images)
        return self.merged_forward_patches(model, patches, grid, policy, backend, num_blocks, rotary)

    def merged_forward_patches(
        self,
        model: nn.Module,
        patches: Tensor,
        grid_thw: Tensor,
        policy: MergePolicy,
        backend: str = "sdpa",
        num_blocks: int | None = None,
        rotary: str = "exact",
    ) -> MergedTokens:
        """:meth:`merged_forward_images` on patches already cut as the tower takes them (what Qwen's
        processors return as ``pixel_values`` and ``image_grid_thw``, or ``pixel_values_videos`` and
        ``video_grid_thw``, and what ``generate()`` passes).

        Args:
            patches: ``[N, 3 * t * p * p]`` of all images and videos, one after the other, slice after
                slice, cell by cell.
            grid_thw: ``[I, 3]`` long, ``(slices, H / p, W / p)`` per image (1 slice) or video.

        Returns:
            :class:`MergedTokens` with one row per temporal slice (:func:`temporal_slices`): an image
            is one row, a video of ``t`` slices ``t`` consecutive rows, each merged on its own.
        """
        if rotary not in ROTARY_MODES:
            raise ValueError(
                f"unknown rotary mode {rotary!r} for backbone '{self.name}'; expected one of {ROTARY_MODES}"
            )
        num_layers = self.num_layers(model)
        self._check(policy, backend, num_layers)
        blocks = self.rotary_blocks(model)
        final = self.final_norm(model)
        if num_blocks is not None:
            if not 1 <= num_blocks <= num_layers:
                raise ValueError(
                    f"num_blocks={num_blocks} is out of range for backbone '{self.name}' ({num_layers} layers)"
                )
            blocks, final = blocks[:num_blocks], None
        batch = self.unit_batch(model, patches, grid_thw)
        taps = self.taps(model) if final is not None else None  # a truncated tower hands on no taps
        return run_unit_blocks(batch, blocks, policy, self.rotary(model), rotary, final, backend, taps)

    def unit_batch(self, model: nn.Module, patches: Tensor, grid_thw: Tensor) -> UnitBatch:
        """The embedded tokens, rotary positions and windows of packed patches, one segment per
        temporal slice (the tower attends within a slice only)."""
        slices = temporal_slices(grid_thw)
        found, expected = patches.shape[0], int(slices.prod(1).sum())
        if found != expected:
            raise ValueError(f"backbone '{self.name}': {found} patches, but grid_thw describes {expected}")
        x = self.embed_patches(model, patches, slices)
        positions = get_vision_position_ids(slices, model.config.spatial_merge_size)
        cells = slices[:, 1] * slices[:, 2] // self.unit(model)
        return UnitBatch(x, cells, self.unit(model), positions, self.windows(model, slices))

    def rotary(self, model: nn.Module) -> Rotary:
        """The host's 2D rotary: its embedding module (which takes fractional positions as well) and
        its rotation function."""
        embedding = model.rotary_pos_emb
        anchor = next(model.parameters())
        return Rotary(angles=lambda positions: embedding(anchor, positions), rotate=self.rotate)

    #: the host's rotation of q and k by the rotary tables
    rotate = staticmethod(apply_rotary_pos_emb_vision)


def temporal_slices(grid_thw: Tensor) -> Tensor:
    """``[I, 3]`` grid rows ``(t, h, w)`` -> ``[sum t, 3]``: one ``(1, h, w)`` row per temporal slice,
    in the tower's order (each image or video's slices in turn)."""
    rows = grid_thw.repeat_interleave(grid_thw[:, 0], dim=0)
    return torch.cat([torch.ones_like(rows[:, :1]), rows[:, 1:]], dim=1)


class HFQwen25VLVision(HFQwen2VLVision):
    """``Qwen2_5_VisionTransformerPretrainedModel``: RMSNorm, gated MLP, and window attention in
    every block not listed in ``fullatt_block_indexes``. Cells of different windows never merge."""

    model_class = Qwen2_5_VisionTransformerPretrainedModel
    config_class = Qwen2_5_VLVisionConfig

    def tiny_configs(self) -> Sequence[TinyConfig]:
        # Windows of 32 px = 4 x 4 cells: a 64 px image has 4 windows of 16 cells.
        return [
            TinyConfig(
                "tiny",
                {
                    "depth": 4,
                    "hidden_size": 32,
                    "intermediate_size": 48,
                    "out_hidden_size": 24,
                    "num_heads": 2,
                    "patch_size": 4,
                    "window_size": 32,
                    "fullatt_block_indexes": [1, 3],
                    "initializer_range": 0.1,
                    "img_size": 64,
                },
            )
        ]

    def width(self, model: nn.Module) -> int:
        return model.config.hidden_size

    def windowed_layers(self, model: nn.Module) -> set[int]:
        return set(range(len(model.blocks))) - set(model.config.fullatt_block_indexes)

    def windows(self, model: nn.Module, grid_thw: Tensor) -> Tensor | None:
        """Window of each cell, in raster order: ``(row // w) * windows_per_row + column // w`` with
        ``w = window_size // merge // patch`` cells (partial windows at the right and bottom edges)."""
        config = model.config
        side = config.window_size // config.spatial_merge_size // config.patch_size
        out = []
        for slices, gh, gw in grid_thw.tolist():
            ch, cw = gh // config.spatial_merge_size, gw // config.spatial_merge_size
            row = torch.arange(ch, device=grid_thw.device)[:, None] // side
            column = torch.arange(cw, device=grid_thw.device)[None, :] // side
            # every temporal slice of a video has the same windows (ids within the slice)
            out.append((row * -(-cw // side) + column).flatten().repeat(slices))
        return torch.cat(out)
