"""A progress bar for calibration, named "Calibrating", that shows images/s and the running mean
token count.

Lightning's bars show logged metrics during training only; calibration runs in ``trainer.validate``,
so this bar puts the module's progress-bar metrics next to the validation bar itself.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class CalibrationProgressBar(TQDMProgressBar):
    DESCRIPTION = "Calibrating"

    @property
    def validation_description(self) -> str:
        return self.DESCRIPTION

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # As Lightning's, without "DataLoader 0" after the name: there is one data loader.
        if not self.has_dataloader_changed(dataloader_idx) or self.val_progress_bar is None:
            return
        self.val_progress_bar.reset()
        self.val_progress_bar.total = convert_inf(self.total_val_batches_current_dataloader)
        self.val_progress_bar.initial = 0
        self.val_progress_bar.set_description(self.DESCRIPTION)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.val_progress_bar is not None:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k in ("img/s", "tokens")}
            self.val_progress_bar.set_postfix({k: f"{float(v):.1f}" for k, v in metrics.items()}, refresh=False)
