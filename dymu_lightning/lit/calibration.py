"""The calibration LightningModule: DyMU thresholds over global batches, resumable.

Lightning runs it with ``trainer.validate``: there is nothing to train. Each step is one global
batch; the module ranks every layer's edges over all processes (see
:class:`~dymu_lightning.core.calibration.GlobalBatchCut`) and accumulates the batch thresholds. All
processes end each step with identical statistics, so rank 0 alone writes the state and the results.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from dymu_lightning.backbones.base import Backbone
from dymu_lightning.core import LayerMerges, MergePolicy
from dymu_lightning.core.calibration import GlobalBatchCut, ThresholdStats, TokenStats

STATE_FILE = "calibration_state.pt"
# DYMU_FAULT_KILL_AFTER_STEP=N makes every process SIGKILL itself after global step N (tests only).
_KILL_AFTER_STEP = int(os.environ.get("DYMU_FAULT_KILL_AFTER_STEP", "0")) or None


class CalibrationModule(L.LightningModule):
    """Accumulates per-layer thresholds of one encoder.

    Args:
        backbone: the adapter.
        model: the host encoder (moved to the device by Lightning).
        r: target merges per image, per layer.
        num_blocks: read features after this many blocks (None: all).
        out_dir: where the resumable state is saved.
        save_every_n_steps: state-saving period in global steps.
        fingerprint: what makes a saved state belong to this run (checked on resume).
        full_tokens: tokens per image without merging.
        state: a saved state to continue from, or None.
    """

    def __init__(
        self,
        backbone: Backbone,
        model: nn.Module,
        r: list[int],
        num_blocks: int | None,
        out_dir: Path,
        save_every_n_steps: int,
        fingerprint: dict[str, Any],
        full_tokens: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.encoder = model
        self.r = list(r)
        self.num_blocks = num_blocks
        self.out_dir = Path(out_dir)
        self.save_every_n_steps = save_every_n_steps
        self.fingerprint = fingerprint
        self.thresholds = ThresholdStats(len(r))
        self.tokens = TokenStats(full_tokens)
        self.steps_done = 0
        self.images_seen = 0
        self.images_skipped = 0
        self.index_sums = torch.zeros(2, dtype=torch.float64)
        self.bytes_gathered_per_step = 0
        if state is not None:
            self.thresholds.load_state_dict(state["thresholds"])
            self.tokens.load_state_dict(state["tokens"])
            self.steps_done = int(state["steps_done"])
            self.images_seen = int(state["images_seen"])
            self.images_skipped = int(state["images_skipped"])
            self.index_sums = state["index_sums"].clone()
        self._started = time.perf_counter()
        self._images_this_run = 0

    # ----- one global step ---------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        valid = batch["valid"].bool()
        pixels = batch["pixels"].to(next(self.encoder.parameters()).dtype)
        # Real images, and images skipped as undecodable (their rows keep their index but are invalid).
        counts = self._gather(torch.stack([valid.sum(), ((batch["index"] >= 0) & ~valid).sum()]))
        global_images, skipped = (int(c) for c in counts.reshape(-1, 2).sum(dim=0))
        cut = GlobalBatchCut(self.r, valid, global_images, gather=self._gather)
        batch_thresholds: dict[int, Tensor] = {}

        def record(merges: LayerMerges) -> None:
            batch_thresholds[merges.layer] = merges.batch_threshold

        policy = MergePolicy(mode="batch_topk", r=self.r, batch_cut=cut, on_layer=record)
        with torch.no_grad():
            out = self.backbone.merged_forward(self.encoder, pixels, policy, num_blocks=self.num_blocks)
        if global_images > 0:
            for layer, threshold in batch_thresholds.items():
                self.thresholds.add(layer, threshold)
        # Token counts of every real image of the global batch: fixed-size payload, -1 for padding.
        lengths = torch.where(valid, out.lengths, torch.full_like(out.lengths, -1))
        every_length = self._gather(lengths)
        self.tokens.add(every_length[every_length >= 0].cpu())

        self.steps_done += 1
        self.images_seen += global_images
        self.images_skipped += skipped
        # Which images were seen, summarised: sum and sum of squares of their global indices.
        # A sample seen twice, or missed, changes them (the audit behind "exactly once").
        index = self._gather(torch.where(valid, batch["index"], torch.full_like(batch["index"], -1)))
        seen = index[index >= 0].double()
        self.index_sums += torch.stack([seen.sum(), (seen**2).sum()]).cpu()
        self._images_this_run += global_images
        self.bytes_gathered_per_step = sum(cut.bytes_sent) + 2 * lengths.numel() * lengths.element_size()
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        summary = self.tokens.summary()
        self.log("img/s", self._images_this_run / elapsed, prog_bar=True, on_step=True, on_epoch=False)
        if summary["mean"] is not None:
            self.log("tokens", float(summary["mean"]), prog_bar=True, on_step=True, on_epoch=False)
        if self.steps_done % self.save_every_n_steps == 0:
            self.save_state()
        if self.steps_done == _KILL_AFTER_STEP:
            # Fault injection for the resume tests: die as a preempted job would, without cleanup.
            os.kill(os.getpid(), signal.SIGKILL)

    def on_validation_start(self) -> None:
        self._started = time.perf_counter()
        self._images_this_run = 0

    def on_validation_end(self) -> None:
        self.save_state()

    # ----- state ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "thresholds": self.thresholds.state_dict(),
            "tokens": self.tokens.state_dict(),
            "steps_done": self.steps_done,
            "images_seen": self.images_seen,
            "images_skipped": self.images_skipped,
            "index_sums": self.index_sums.clone(),
        }

    def save_state(self) -> None:
        """Rank 0 writes the state atomically: a kill mid-write leaves the previous state."""
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.out_dir / (STATE_FILE + ".tmp")
        torch.save(self.state(), temporary)
        temporary.replace(self.out_dir / STATE_FILE)

    # ----- collectives ---------------------------------------------------------------------------------
    def _gather(self, tensor: Tensor) -> Tensor:
        """``[n]`` -> ``[world * n]`` (same shape on every process)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.all_gather(tensor).reshape(-1)

    def configure_optimizers(self) -> None:
        return None


def load_state(out_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state in ``out_dir``, if any; an error if it belongs to a different run."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state.get("fingerprint", {})
    if saved != fingerprint:
        differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{path} holds the state of a different calibration run (differs in: {', '.join(differing)}). "
            "Use another out_dir, or resume=false to start over."
        )
    return state
