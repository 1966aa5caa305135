"""Align the small LLaVA: train its projector (or LoRA adapters) on captions, the rest frozen.

The model reads one image and the fixed question, and is trained to answer with the image's caption
(the caption tokens and the end-of-turn token carry the loss; nothing else does). The tower and the
language model are frozen (``requires_grad=False``) and stay in eval mode, so a step changes only the
projector (and LoRA adapters), and a run is reproducible from its seed.

With a merging policy the model trains as it will run: DyMU (or ToMe) in the tower and VTU in the
language model, gradients reaching the projector through the merged rows.

Without merging the tower's output does not change while the projector trains, so alignment can
read it once (:func:`tower_features`) and train on the cached features (``CaptionedImages(...,
features=True)``): the same loss as from the pixels, without running the tower every step.

``fit_align`` runs Lightning's ``fit``: ``checkpoints/last.ckpt`` (trainable parameters only, and the
loader's position, so a resumed run continues with the next batch), CSV logs in ``logs/``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from dymu_lightning.backbones.hf_llava import apply_dymu, is_dymu
from dymu_lightning.core import MergePolicy
from dymu_lightning.finetune.adapt import add_lora, count_parameters, lora_module_names
from dymu_lightning.finetune.data import EpochBatches, ResumableLoader
from dymu_lightning.finetune.run import StopAfter, Stopped
from dymu_lightning.vlm.captions import PromptIds

ADAPTATIONS = ("projector", "lora")
LORA_TARGETS = ("lm", "both")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class AlignConfig:
    """One alignment run.

    Attributes:
        out_dir: checkpoints and logs.
        adaptation: ``projector`` (the projector only) or ``lora`` (LoRA adapters and the projector).
        lora_target: ``lm`` (the language model's attention projections) or ``both`` (and the tower's).
        lora_modules: regexes naming the linear modules LoRA goes on (None: attention projections).
        policy: the tower's merging while training (None: all visual tokens).
        schedule: ``constant``, or ``cosine`` (to 0 over the run's steps, after ``warmup_steps`` of
            linear warm-up from ``lr / warmup_steps``).
        class_loss: weight of the class loss added to the caption loss (0: captions only); it needs
            a dataset with labels and ``class_first_ids`` (see :class:`AlignModule`).
        class_first_ids: the first token of each class name (distinct).
        class_prefix: the tokens every answer starts with before the class name.
    """

    out_dir: Path
    seed: int = 0
    batch_size: int = 8
    epochs: int = 1
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    adaptation: str = "projector"
    lora_target: str = "lm"
    lora_modules: tuple[str, ...] | None = None
    lora_r: int = 8
    policy: MergePolicy | None = None
    class_loss: float = 0.0
    class_first_ids: tuple[int, ...] = ()
    class_prefix: int = 0
    stop_after_steps: int | None = None
    checkpoint_every_n_steps: int | None = None
    progress_bar: bool = True
    resume: bool = True


def pixel_tensor(paths: Sequence[Path], processor: Any) -> Tensor:
    """``[n, 3, S, S]`` the images through the tower's preprocessing."""
    images = [Image.open(p).convert("RGB") for p in paths]
    return processor(images, return_tensors="pt")["pixel_values"]


def tower_features(model: nn.Module, pixels: Tensor, batch_size: int = 64) -> Tensor:
    """``[n, P, C]``: what the frozen tower hands the projector for ``pixels`` ``[n, 3, S, S]`` (the
    feature layer's patch tokens, CLS dropped: LLaVA's ``default`` strategy), without merging."""
    if is_dymu(model):
        raise ValueError("tower_features reads the stock tower; remove DyMU first")
    if model.config.vision_feature_select_strategy != "default" or not isinstance(
        model.config.vision_feature_layer, int
    ):
        raise ValueError("tower_features supports one vision_feature_layer with the 'default' strategy")
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    out = []
    with torch.inference_mode():
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size].to(model.dtype)
            out.append(tower(batch, output_hidden_states=True).hidden_states[layer][:, 1:].clone())
    return torch.cat(out) if out else pixels.new_zeros(0)


class CaptionedImages(Dataset):
    """Item ``i``: ``{"pixels": [3, S, S], "answer": [A_i] long, "index": i}``, or with ``features``
    ``{"features": [P, C], ...}`` where ``images`` holds :func:`tower_features` rather than pixels;
    with ``labels`` (``[n]`` class indices, for the class loss) also ``"label"``."""

    def __init__(
        self, images: Tensor, answers: Sequence[Tensor], features: bool = False, labels: Tensor | None = None
    ) -> None:
        if len(images) != len(answers):
            raise ValueError(f"{len(images)} images but {len(answers)} captions")
        if labels is not None and len(labels) != len(answers):
            raise ValueError(f"{len(labels)} labels but {len(answers)} captions")
        self.images, self.answers, self.labels = images, list(answers), labels
        self.key = "features" if features else "pixels"

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {self.key: self.images[i], "answer": self.answers[i], "index": i}
        return item if self.labels is None else item | {"label": self.labels[i]}


def collate(items: list[dict[str, Any]], prompt: PromptIds, pad_id: int) -> dict[str, Tensor]:
    """Prompt + answer per image, right-padded: ``input_ids`` / ``attention_mask`` / ``labels``
    ``[B, N + A]`` (labels are -100 outside the answers) and ``pixels`` ``[B, 3, S, S]`` (or
    ``features`` ``[B, P, C]``)."""
    longest = max(len(item["answer"]) for item in items)
    batch, length = len(items), len(prompt.prompt) + longest
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    mask = torch.zeros((batch, length), dtype=torch.long)
    n = len(prompt.prompt)
    for b, item in enumerate(items):
        answer = item["answer"]
        input_ids[b, :n], input_ids[b, n : n + len(answer)] = prompt.prompt, answer
        labels[b, n : n + len(answer)] = answer
        mask[b, : n + len(answer)] = 1
    key = "features" if "features" in items[0] else "pixels"
    images = torch.stack([item[key] for item in items])
    batch_out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, key: images}
    if "label" in items[0]:
        batch_out["class_labels"] = torch.stack([torch.as_tensor(item["label"]) for item in items])
    return batch_out


def init_projector(model: nn.Module, seed: int) -> None:
    """Draw the projector's weights afresh from ``seed`` (normal, std 0.02; zero biases), so that an
    alignment starts from the same weights whatever projector the folder held before."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.multi_modal_projector.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                if module.bias is not None:
                    module.bias.zero_()


def fit_projector_to_names(
    model: nn.Module, features: Tensor, labels: Tensor, class_ids: Sequence[int], ridge: float = 1e-2
) -> None:
    """Set the projector's last layer so that every visual token of an image lands near the input
    embedding of its class name's token (``class_ids[label]``): a ridge regression over the visual
    tokens of ``features`` ``[n, P, C]`` (:func:`tower_features`), the first layer kept as it is.

    A start for the gradient steps: the language model then sees each image as roughly its class's
    word, and the steps refine from there. ``ridge`` scales the penalty by the mean diagonal of the
    Gram matrix. Deterministic (a linear solve in float64).
    """
    projector = model.model.multi_modal_projector
    last = projector.linear_2
    with torch.no_grad():
        hidden = projector.act(projector.linear_1(features.flatten(0, 1).to(last.weight.dtype))).double()
        hidden = torch.cat([hidden, torch.ones(len(hidden), 1, dtype=hidden.dtype)], 1)  # [n * P, H + 1]: bias
        embeddings = model.get_input_embeddings().weight[torch.as_tensor(list(class_ids))].double()  # [K, D]
        targets = embeddings[labels.repeat_interleave(features.shape[1])]  # [n * P, D]
        gram = hidden.T @ hidden
        gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
        solution = torch.linalg.solve(gram, hidden.T @ targets)  # [H + 1, D]
        last.weight.copy_(solution[:-1].T.to(last.weight.dtype))
        last.bias.copy_(solution[-1].to(last.bias.dtype))


def set_trainable(model: nn.Module, adaptation: str, lora_target: str = "lm", **lora: Any) -> nn.Module:
    """Freeze the LLaVA but its projector (and, for ``lora``, add adapters to ``lora_target``).

    Raises:
        ValueError: an unknown adaptation or LoRA target, or LoRA modules that match nothing.
    """
    if adaptation not in ADAPTATIONS:
        raise ValueError(f"unknown adaptation {adaptation!r}; expected one of {', '.join(ADAPTATIONS)}")
    if lora_target not in LORA_TARGETS:
        raise ValueError(f"lora.target={lora_target!r}; expected one of {', '.join(LORA_TARGETS)}")
    model.requires_grad_(False)
    if adaptation == "lora":
        parts = [model.model.language_model] + ([model.model.vision_tower] if lora_target == "both" else [])
        patterns, r = lora.get("modules"), lora.get("r", 8)
        for part in parts:
            names = lora_module_names(part, patterns, "lora.modules")
            add_lora(part, names, r, alpha=2 * r, dropout=0.0)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
    model.model.multi_modal_projector.requires_grad_(True)
    return model


class AlignModule(L.LightningModule):
    """Caption loss of a LLaVA whose trainable parameters were set by :func:`set_trainable`.

    Args:
        model: the LLaVA (DyMU applied when the run merges).
        lr: AdamW's learning rate (no weight decay: the projector starts from a random init).
        schedule: ``constant`` or ``cosine`` over ``total_steps`` optimiser steps, after
            ``warmup_steps`` of linear warm-up.
        class_loss: weight of the class loss, added to the caption loss. Every answer starts with
            ``class_prefix`` tokens (the scoring prefix, "A photo of a"), then the class name; the class
            loss is the cross-entropy of the image's class among the K classes, each scored by the
            log-probability of its name's first token at that point (``class_first_ids``, distinct):
            the zero-shot scoring's decision, made on the names' first tokens. It needs batches with
            ``class_labels`` (``CaptionedImages(..., labels=...)``) and costs no extra forward.
    """

    strict_loading = False  # checkpoints leave out the frozen weights

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int = 1,
        class_loss: float = 0.0,
        class_first_ids: Sequence[int] = (),
        class_prefix: int = 0,
    ) -> None:
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if class_loss and (len(set(class_first_ids)) != len(class_first_ids) or len(class_first_ids) < 2):
            raise ValueError("the class loss needs the distinct first tokens of at least two class names")
        self.model, self.lr = model, lr
        self.class_loss, self.class_prefix = class_loss, class_prefix
        self.register_buffer("class_first_ids", torch.tensor(list(class_first_ids), dtype=torch.long), persistent=False)
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, max(total_steps, 1)
        self.train_seconds, self.train_images, self._start = 0.0, 0, 0.0

    def train(self, mode: bool = True) -> AlignModule:
        super().train(mode)
        self.model.eval()  # no dropout anywhere: only the trained parameters change
        return self

    def caption_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy of the answer tokens."""
        return self.losses(batch)[0]

    def losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """The caption loss, and the class loss (None without ``class_loss``), from one forward."""
        labels = batch["labels"]
        keep = labels.shape[1] - int((labels != -100).any(0).nonzero()[0]) + 1  # from the token before the answers
        if "features" in batch:
            images = {"inputs_embeds": self.embed_features(batch["input_ids"], batch["features"])}
        else:
            images = {"input_ids": batch["input_ids"], "pixel_values": batch["pixels"].to(self.model.dtype)}
        logits = self.model(
            **images, attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep
        ).logits  # [B, keep, V]
        targets = labels[:, -keep + 1 :]
        caption = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100
        )
        if not self.class_loss:
            return caption, None
        # logits[:, 0] reads the token before the answer, so logits[:, class_prefix] predicts the name's first token.
        scores = logits[:, self.class_prefix].float().log_softmax(-1)[:, self.class_first_ids]  # [B, K]
        return caption, nn.functional.cross_entropy(scores, batch["class_labels"])

    def embed_features(self, input_ids: Tensor, features: Tensor) -> Tensor:
        """``[B, N, D]``: the text's embeddings with the image placeholders replaced by the projected
        ``features`` ``[B, P, C]`` (what LLaVA does with the tower's output)."""
        if is_dymu(self.model):
            raise ValueError("cached tower features train the stock model; a merging run needs the pixels")
        embeds = self.model.get_input_embeddings()(input_ids)
        placeholders = (input_ids == self.model.config.image_token_id)[..., None]
        projected = self.model.model.multi_modal_projector(features.to(embeds.dtype))
        return embeds.masked_scatter(placeholders, projected.to(embeds.dtype))

    def training_step(self, batch: dict[str, Tensor], batch_index: int) -> Tensor:
        caption, classes = self.losses(batch)
        loss = caption if classes is None else caption + self.class_loss * classes
        if classes is not None:
            self.log("caption_loss", caption)
            self.log("class_loss", classes)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_start(self, batch: Any, batch_index: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        self.train_seconds += time.perf_counter() - self._start
        self.train_images += int(batch["labels"].shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)
        if self.schedule == "constant" and not self.warmup_steps:
            return optimizer
        warmup, total, cosine = self.warmup_steps, self.total_steps, self.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup, 1)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def trainable_state(self) -> dict[str, Tensor]:
        """The trained parameters by name (``model.`` prefix dropped), detached copies."""
        return {
            re.sub(r"^model\.", "", name): p.detach().clone() for name, p in self.named_parameters() if p.requires_grad
        }


class AlignData(L.LightningDataModule):
    """Seeded shuffled batches of :class:`CaptionedImages` whose position survives a resume."""

    def __init__(self, dataset: CaptionedImages, prompt: PromptIds, pad_id: int, batch_size: int, seed: int) -> None:
        super().__init__()
        self.dataset, self.prompt, self.pad_id, self.batch_size, self.seed = dataset, prompt, pad_id, batch_size, seed

    def train_dataloader(self) -> ResumableLoader:
        trainer = self.trainer
        batches = EpochBatches(len(self.dataset), self.batch_size, 0, 1, self.seed)

        def batches_done() -> int:
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed

        return ResumableLoader(
            self.dataset, batches, batches_done, collate_fn=lambda items: collate(items, self.prompt, self.pad_id)
        )


def fit_align(
    model: nn.Module, dataset: CaptionedImages, prompt: PromptIds, pad_id: int, cfg: AlignConfig
) -> tuple[AlignModule, L.Trainer, dict[str, Any]]:
    """Train ``model`` in place as ``cfg`` says; returns the module, the trainer and facts for results.

    A run stopped by ``cfg.stop_after_steps`` returns with ``facts["stopped"]`` set; rerunning with
    ``cfg.resume`` continues from ``out_dir/checkpoints/last.ckpt``.
    """
    L.seed_everything(cfg.seed, verbose=False)
    set_trainable(model, cfg.adaptation, cfg.lora_target, modules=cfg.lora_modules, r=cfg.lora_r)
    if cfg.policy is not None and not is_dymu(model):
        apply_dymu(model, cfg.policy)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected one of {', '.join(SCHEDULES)}")
    total_steps = cfg.epochs * (len(dataset) // cfg.batch_size)
    classes = {"class_loss": cfg.class_loss, "class_first_ids": cfg.class_first_ids, "class_prefix": cfg.class_prefix}
    module = AlignModule(model, cfg.lr, cfg.schedule, cfg.warmup_steps, total_steps, **classes)
    last = Path(cfg.out_dir) / "checkpoints" / "last.ckpt"
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=last.parent,
            save_last=True,
            save_top_k=1,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    ]
    if cfg.stop_after_steps is not None:
        callbacks.append(StopAfter(cfg.stop_after_steps, last))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=cfg.epochs,
        logger=CSVLogger(cfg.out_dir, name="logs"),
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,
    )
    data = AlignData(dataset, prompt, pad_id, cfg.batch_size, cfg.seed)
    trainable, total = count_parameters(model)
    facts: dict[str, Any] = {"trainable_parameters": trainable, "total_parameters": total, "stopped": None}
    try:
        trainer.fit(module, datamodule=data, ckpt_path=last if cfg.resume and last.is_file() else None)
    except Stopped as stopped:
        facts["stopped"] = str(stopped)
    metrics = trainer.callback_metrics
    facts.update(
        global_steps=trainer.global_step,
        final_train_loss=float(metrics["train_loss"]) if "train_loss" in metrics else None,
        final_caption_loss=float(metrics["caption_loss"]) if "caption_loss" in metrics else None,
        final_class_loss=float(metrics["class_loss"]) if "class_loss" in metrics else None,
        training_seconds=module.train_seconds,
        training_images_per_second=module.train_images / module.train_seconds if module.train_seconds else None,
    )
    return module, trainer, facts
