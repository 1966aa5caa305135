"""The LightningModule of the finetune task: an encoder (merging or not) and a linear head.

The encoder runs through ``Backbone.merged_forward`` with the recipe's reduction, so gradients reach
the trainable encoder parameters through the size-weighted merges (the matching itself, an argmax, has
no gradient). The encoder always runs in eval mode: dropout and drop-path stay off, so a step changes
only what the adaptation trains, and runs are reproducible.

Checkpoints hold the trainable parameters only (the frozen encoder is rebuilt from the recipe).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from dymu_lightning.backbones import Backbone
from dymu_lightning.core import MergePolicy
from dymu_lightning.eval.metrics import pooled_features


class FinetuneModule(L.LightningModule):
    """Classifier = encoder features (``feature``: cls or mean) -> ``head``.

    Args:
        backbone: the encoder's adapter.
        encoder: the encoder, with its parameters' ``requires_grad`` already set by the adaptation.
        head: ``nn.Linear(C, num_classes)``.
        policy: the merging policy in training and validation.
        num_blocks: read features after this many blocks (None: all, with the final norm).
        feature: ``cls`` or ``mean``.
        optimizer: the recipe's ``optimizer`` section.
        total_steps: optimiser steps of the whole run (the cosine schedule's length).
    """

    strict_loading = False  # checkpoints leave out the frozen encoder weights

    def __init__(
        self,
        backbone: Backbone,
        encoder: nn.Module,
        head: nn.Linear,
        policy: MergePolicy,
        num_blocks: int | None,
        feature: str,
        optimizer: Any,
        total_steps: int = 1,
    ) -> None:
        super().__init__()
        self.backbone, self.encoder, self.head = backbone, encoder, head
        self.policy, self.num_blocks, self.feature, self.optimizer_cfg = policy, num_blocks, feature, optimizer
        self.total_steps = total_steps
        self.encoder_trains = any(p.requires_grad for p in encoder.parameters())
        num_classes = head.out_features
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_tokens = MeanMetric()
        self.train_seconds = 0.0  # time in training steps (forward, backward, optimiser), this invocation
        self.train_images = 0
        self._step_start = 0.0

    def train(self, mode: bool = True) -> FinetuneModule:
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, pixels: Tensor, policy: MergePolicy | None = None) -> tuple[Tensor, Tensor]:
        """``([B, C] features, [B] tokens per image)`` under ``policy`` (default: the module's)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trains):
            out = self.backbone.merged_forward(self.encoder, pixels, policy or self.policy, num_blocks=self.num_blocks)
        return pooled_features(out.tokens, out.sizes, out.num_prefix)[self.feature], out.lengths

    def forward(self, pixels: Tensor, policy: MergePolicy | None = None) -> tuple[Tensor, Tensor]:
        """``([B, num_classes] logits, [B] tokens per image)``."""
        features, lengths = self.features(pixels, policy)
        return self.head(features.to(self.head.weight.dtype)), lengths

    def training_step(self, batch: dict[str, Any], batch_index: int) -> Tensor:
        logits, lengths = self(batch["pixels"])
        loss = nn.functional.cross_entropy(logits.float(), batch["label"])
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_tokens", lengths.float().mean())
        return loss

    def validation_step(self, batch: dict[str, Any], batch_index: int) -> None:
        valid = batch["valid"].bool()
        if valid.any():
            logits, lengths = self(batch["pixels"][valid])
            self.val_accuracy.update(logits.argmax(dim=-1), batch["label"][valid])
            self.val_tokens.update(lengths.float())
        # Every rank logs, even with only padding rows: the metrics are reduced across ranks at the
        # epoch end, and a rank that never logged would leave the others waiting.
        self.log("val_acc", self.val_accuracy, prog_bar=True)
        self.log("val_tokens", self.val_tokens)

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        self.train_seconds += time.perf_counter() - self._step_start
        self.train_images += int(batch["label"].numel()) * self.trainer.world_size

    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_cfg
        parameters = self.parameter_groups()
        if cfg.name == "adamw":
            optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        if cfg.schedule == "constant":
            return optimizer
        # Not trainer.estimated_stepping_batches: it sets the training data up before a checkpoint's
        # loader position is restored, and the resumed run would then start its epoch over.
        steps = max(self.total_steps, 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimiser's groups: the head at ``optimizer.lr``, the encoder's trainable parameters at
        ``optimizer.encoder_lr`` (``lr`` when unset). A group with no parameter is left out."""
        cfg = self.optimizer_cfg
        encoder_lr = cfg.lr if cfg.encoder_lr is None else cfg.encoder_lr
        head = [p for p in self.head.parameters() if p.requires_grad]
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": cfg.lr}, {"params": encoder, "lr": encoder_lr}]
        return [group for group in groups if group["params"]]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained parameters (head, adapters, biases ...) by name, detached copies."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}
