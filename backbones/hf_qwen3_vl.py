"""The vision tower of Qwen3-VL: Qwen2-VL's rotary tower, with learned position embeddings and DeepStack.

``Qwen3VLVisionModel`` differs from Qwen2-VL's tower (:mod:`dymu_lightning.backbones.hf_qwen_vl`) in
three ways that matter to DToMe, and each is handled by the shared rotary engine
(:mod:`dymu_lightning.core.rotary_units`) through one hook of :class:`HFQwen2VLVision`:

* **Absolute position embeddings.** A learned square table, resampled (bilinear, align corners) to
  each image's patch grid, is added to the patch embeddings before the first block
  (:meth:`HFQwen3VLVision.embed_patches`). It is part of the embedding, so merging is unchanged.
* **2D rotary, no windows.** The same axial rotary as Qwen2-VL (h and w positions per patch); every
  block attends over its whole image or video slice, as in Qwen2-VL.
* **DeepStack.** After blocks ``deepstack_visual_indexes`` the tower folds its cells through one more
  patch merger each (norm after the 2x2 fold); the language model adds these features to its hidden
  states at the visual positions after its first layers. With merging, a tap at block ``k`` sees
  more rows than the output has: each output row gets the mean over its cells of the tap's feature
  of the block-``k`` row that held the cell (:meth:`HFQwen3VLVision.taps`,
  :attr:`MergedTokens.taps`). Nothing merged: the stock features, exactly.

See docs/concepts.md ("Qwen3-VL: position embeddings and DeepStack").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from transformers import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from dymu_lightning.backbones.base import TinyConfig
from dymu_lightning.backbones.hf_qwen_vl import HFQwen2VLVision


class HFQwen3VLVision(HFQwen2VLVision):
    """``Qwen3VLVisionModel``: LayerNorm blocks with a plain MLP, learned position embeddings
    interpolated to the grid, full attention in every block, and DeepStack taps."""

    model_class = Qwen3VLVisionModel
    config_class = Qwen3VLVisionConfig
    rotate = staticmethod(apply_rotary_pos_emb_vision)

    def tiny_configs(self) -> Sequence[TinyConfig]:
        # A 6 x 6 table of position embeddings, resampled to every grid; DeepStack after blocks 0 and 1.
        return [
            TinyConfig(
                "tiny",
                {
                    "depth": 3,
                    "hidden_size": 32,
                    "intermediate_size": 48,
                    "out_hidden_size": 24,
                    "num_heads": 2,
                    "patch_size": 4,
                    "num_position_embeddings": 36,
                    "deepstack_visual_indexes": [0, 1],
                    "initializer_range": 0.1,
                    "img_size": 64,
                },
            )
        ]

    def width(self, model: nn.Module) -> int:
        return model.config.hidden_size

    def embed_patches(self, model: nn.Module, patches: Tensor, grid_thw: Tensor) -> Tensor:
        """The patch embeddings plus the learned position table resampled to each grid, as the host's
        forward adds them."""
        if patches.is_meta:  # shape probes (`check`): resampling the table needs the grid's values
            return model.patch_embed(patches)
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid_thw,
            num_grid_per_side=model.num_grid_per_side,
            mode=model.interpolation_mode,
            align_corners=model.interpolation_align_corners,
            spatial_merge_size=model.config.spatial_merge_size,
        )
        x = model.patch_embed(patches)
        return x + (model.pos_embed(indices) * weights[:, :, None]).sum(1).to(x.dtype)

    def taps(self, model: nn.Module) -> dict[int, Callable[[Tensor], Tensor]]:
        """DeepStack: block ``deepstack_visual_indexes[i]`` -> ``deepstack_merger_list[i]`` on cells."""
        width = self.width(model)

        def tap(merger: nn.Module) -> Callable[[Tensor], Tensor]:
            return lambda cells: merger(cells.reshape(-1, width))

        indexes = model.config.deepstack_visual_indexes
        return {int(block): tap(merger) for block, merger in zip(indexes, model.deepstack_merger_list, strict=True)}

    def stock_taps_patches(self, model: nn.Module, patches: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """The host's own DeepStack features: ``[cells, C_out]`` per tap, all images packed."""
        return list(model(hidden_states=patches, grid_thw=grid_thw).deepstack_features)
