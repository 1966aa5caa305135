"""DToMe in pure torch: matching, merging, proportional attention and the merged encoder forward.

Nothing here imports Lightning, timm or transformers; backbone adapters in
``dymu_lightning.backbones`` connect host models to :func:`run_blocks`.
"""

from dymu_lightning.core.attention import BACKENDS, attention
from dymu_lightning.core.capacity import CapacityState, LaggedCounts, merge_step
from dymu_lightning.core.encoder import PATHS, STATIC_BATCH_CUTOFF, BlockParts, MergedTokens, run_blocks
from dymu_lightning.core.layout import TokenLayout
from dymu_lightning.core.matching import Edges, bipartite_edges
from dymu_lightning.core.merge import TokenState, merge_tokens
from dymu_lightning.core.policy import MODES, LayerMerges, MergePolicy, local_batch_cut, rank_within_image
from dymu_lightning.core.rotary_units import ROTARY_MODES, Rotary, RotaryBlockParts, UnitBatch, run_unit_blocks
from dymu_lightning.core.widened import AttentionLinears

__all__ = [
    "BACKENDS",
    "MODES",
    "PATHS",
    "ROTARY_MODES",
    "STATIC_BATCH_CUTOFF",
    "AttentionLinears",
    "BlockParts",
    "CapacityState",
    "Edges",
    "LaggedCounts",
    "LayerMerges",
    "MergePolicy",
    "MergedTokens",
    "Rotary",
    "RotaryBlockParts",
    "TokenLayout",
    "TokenState",
    "UnitBatch",
    "attention",
    "bipartite_edges",
    "local_batch_cut",
    "merge_step",
    "merge_tokens",
    "rank_within_image",
    "run_blocks",
    "run_unit_blocks",
]
