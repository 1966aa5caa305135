"""The one interface every vision backbone adapter implements.

An adapter knows one family of host models (timm ViTs, HF CLIP, ...): how to load and build them,
how they preprocess images, and how each block splits into the pieces of
:class:`~dymu_lightning.core.BlockParts`. Patching, unpatching and the merged forward are written
once, here, on top of those answers.
"""

from __future__ import annotations

import os
import types
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor, nn

from dymu_lightning.core import BACKENDS, BlockParts, MergedTokens, MergePolicy, run_blocks
from dymu_lightning.core.cuda_graph import GraphCache
from dymu_lightning.core.encoder import PATHS

PATCH_ATTRIBUTE = "_dymu_patch"
# The static path's CUDA graphs, per model; an entry goes when its model does.
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, GraphCache] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class PatchState:
    """What :meth:`Backbone.patch` attaches to a model (and :meth:`Backbone.unpatch` removes)."""

    backbone: Backbone
    policy: MergePolicy
    backend: str
    num_blocks: int | None


@dataclass(frozen=True)
class TinyConfig:
    """A small random architecture of an adapter's family, used by tests parametrised over the registry."""

    name: str
    config: Mapping[str, Any]


class Backbone(ABC):
    """Adapter between one family of host ViTs and the DToMe forward.

    Subclasses answer the questions below; patching and the merged forward are shared.
    """

    #: Registry name; set by :func:`~dymu_lightning.backbones.registry.register_backbone`.
    name: str = ""
    #: True when :meth:`blocks` describes every host block completely as :class:`BlockParts` (no
    #: positional term inside attention), so the generic engine and the naive ViT reference of the
    #: tests apply. Rotary towers (Qwen-VL) set False and bring their own forward and reference.
    plain_blocks: bool = True

    # ----- building and loading ---------------------------------------------------------------------
    @abstractmethod
    def load(self, source: str | os.PathLike[str]) -> nn.Module:
        """Pretrained model from a hub id or a local ``save_pretrained`` directory."""

    @abstractmethod
    def build(self, config: Mapping[str, Any]) -> nn.Module:
        """Randomly initialised model from an architecture config (no weights needed)."""

    @abstractmethod
    def tiny_configs(self) -> Sequence[TinyConfig]:
        """Small architectures covering the family's variants, for tests."""

    @abstractmethod
    def preprocess(self, model: nn.Module, images: Sequence[Image.Image]) -> Tensor:
        """The model's own preprocessing: PIL images -> ``[B, 3, H, W]`` pixels."""

    def image_transform(self, model: nn.Module) -> Callable[[Image.Image], Tensor]:
        """One PIL image -> ``[3, H, W]``, picklable for data-loader workers. The default wraps
        :meth:`preprocess`; adapters override it with something lighter than the whole model."""
        return _PreprocessOne(self, model)

    # ----- the host model's anatomy ----------------------------------------------------------------
    @abstractmethod
    def embed(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """``[B, 3, H, W]`` -> ``[B, N, C]`` tokens entering the first block (prefix tokens first)."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[BlockParts]:
        """Every transformer block, in order."""

    @abstractmethod
    def final_norm(self, model: nn.Module) -> Callable[[Tensor], Tensor] | None:
        """The position-wise map the host applies to its last hidden state, if any."""

    @abstractmethod
    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Leading tokens that never merge (CLS, registers)."""

    @abstractmethod
    def stock_features(self, model: nn.Module, pixels: Tensor) -> Tensor:
        """``[B, N, C]``: the unpatched host's last hidden state (final norm included where the host
        applies one), computed by the host's own forward. The reference every test compares to."""

    def handles(self, model: nn.Module) -> bool:
        """Whether ``model`` is of this adapter's family. Used to find the adapter for a vision tower
        inside a larger model (e.g. a LLaVA); adapters override it, the default claims nothing."""
        return False

    # ----- shared ------------------------------------------------------------------------------------
    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def merged_forward(
        self,
        model: nn.Module,
        pixels: Tensor,
        policy: MergePolicy,
        backend: str = "sdpa",
        num_blocks: int | None = None,
        path: str = "auto",
        compile_merge: bool = False,
        widened: bool | None = None,
        compile_blocks: bool = False,
    ) -> MergedTokens:
        """Run the encoder with DToMe, without patching the model.

        Args:
            pixels: ``[B, 3, H, W]``.
            policy: merging policy; checked against the model's layer count.
            backend: ``"sdpa"`` or ``"eager"`` attention.
            num_blocks: run only the first ``num_blocks`` blocks and skip the final norm (e.g.
                LLaVA's penultimate-layer features); None runs them all and applies the final norm.
            path: the engine's ``"dynamic"`` or ``"static"`` path, or ``"auto"`` (static, replayed
                as a CUDA graph, for CUDA batches up to ``STATIC_BATCH_CUTOFF``).
            compile_merge: matching and merging through ``torch.compile`` (opt-in; the first call
                compiles, see ``dymu_lightning.core.encoder.compiled_merge_steps``).
            widened: proportional attention as widened heads folded into the projections (True)
                or as a log-size bias on a padded grid (False); None: widened where ``varlen_attn``
                runs (CUDA, half precision, ``"sdpa"``).
            compile_blocks: every block through ``torch.compile`` (opt-in; the first call compiles,
                eager with a warning where compiling fails; see
                ``dymu_lightning.core.encoder.compiled_block_steps``).
        """
        if path not in PATHS:
            raise ValueError(f"unknown engine path {path!r}; expected one of {PATHS}")
        blocks = self.blocks(model)
        self._check(policy, backend, len(blocks))
        final = self.final_norm(model)
        if num_blocks is not None:
            if not 1 <= num_blocks <= len(blocks):
                raise ValueError(
                    f"num_blocks={num_blocks} is out of range for backbone '{self.name}' ({len(blocks)} layers)"
                )
            blocks, final = blocks[:num_blocks], None
        return run_blocks(
            self.embed(model, pixels),
            blocks,
            policy,
            num_prefix=self.num_prefix_tokens(model),
            final=final,
            backend=backend,
            path=path,
            graphs=_GRAPHS.setdefault(model, GraphCache()) if pixels.device.type == "cuda" else None,
            graph_key=(num_blocks, next(model.parameters()).data_ptr()),
            compile_merge=compile_merge,
            widened=widened,
            compile_blocks=compile_blocks,
        )

    def patch(
        self,
        model: nn.Module,
        policy: MergePolicy,
        backend: str = "sdpa",
        num_blocks: int | None = None,
    ) -> nn.Module:
        """Make ``model(pixels)`` return :class:`MergedTokens`. Nothing inside the model changes:
        patching sets one instance attribute for ``forward`` and one holding the policy, so
        :meth:`unpatch` restores the model exactly. Patching again replaces the policy."""
        self._check(policy, backend, self.num_layers(model))
        state = PatchState(self, policy, backend, num_blocks)
        object.__setattr__(model, PATCH_ATTRIBUTE, state)

        # A bound method (not a closure) so that copy.deepcopy of a patched model stays self-contained.
        object.__setattr__(model, "forward", types.MethodType(_patched_forward, model))
        return model

    def unpatch(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`patch`."""
        if not is_patched(model):
            raise ValueError(f"this {type(model).__name__} is not patched by dymu_lightning")
        object.__delattr__(model, "forward")
        object.__delattr__(model, PATCH_ATTRIBUTE)
        return model

    def _check(self, policy: MergePolicy, backend: str, num_layers: int) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
        policy.validate(num_layers, self.name or type(self).__name__)


class _PreprocessOne:
    def __init__(self, backbone: Backbone, model: nn.Module) -> None:
        self.backbone, self.model = backbone, model

    def __call__(self, image: Image.Image) -> Tensor:
        return self.backbone.preprocess(self.model, [image])[0]


def _patched_forward(model: nn.Module, pixel_values: Tensor) -> MergedTokens:
    state: PatchState = getattr(model, PATCH_ATTRIBUTE)
    return state.backbone.merged_forward(model, pixel_values, state.policy, state.backend, state.num_blocks)


def is_patched(model: nn.Module) -> bool:
    return PATCH_ATTRIBUTE in vars(model)


def local_dir(source: str | os.PathLike[str]) -> Path | None:
    """``source`` as a directory if it names an existing one, else None (a hub id)."""
    path = Path(source).expanduser()
    return path if path.is_dir() else None
