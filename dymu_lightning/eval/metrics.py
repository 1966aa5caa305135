"""Evaluation metrics on plain tensors. Each one is small enough to check by hand (tests/test_eval.py).

Accuracy, cosine similarity and Spearman's rank correlation come from torchmetrics; token-count
statistics reuse :class:`~dymu_lightning.core.calibration.TokenStats`, the same accumulator
calibration reports with.
"""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchmetrics.functional import cosine_similarity, spearman_corrcoef
from torchmetrics.functional.classification import multiclass_accuracy

from dymu_lightning.core.calibration import TokenStats


def token_summary(lengths: Tensor, full: int) -> tuple[dict[str, float | int | None], Tensor]:
    """(mean, std, min, max, images, full) of per-image token counts ``[n]``, and the ``[full + 1]``
    histogram (one bin per count). The std is the population one (divides by n)."""
    stats = TokenStats(full)
    stats.add(lengths)
    return stats.summary(), stats.histogram


def pooled_features(tokens: Tensor, sizes: Tensor, num_prefix: int) -> dict[str, Tensor]:
    """Per-image features of a (possibly merged) encoder output.

    Args:
        tokens: ``[B, L, C]`` (padding rows zero, as in ``MergedTokens.tokens``).
        sizes: ``[B, L]`` original tokens each output token stands for; 0 in padding.
        num_prefix: leading tokens that never merge (the first one is CLS when there is one).

    Returns:
        ``{"mean": [B, C]}``, the mean of the patch tokens weighted by their sizes (for an unmerged
        encoder, the plain mean over patches), plus ``{"cls": [B, C]}`` when there is a prefix token.
    """
    weights = sizes[:, num_prefix:, None].to(tokens.dtype)
    mean = (tokens[:, num_prefix:] * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-12)
    out = {"mean": mean.float()}
    if num_prefix > 0:
        out["cls"] = tokens[:, 0].float()
    return out


def per_image_cosine(features: Tensor, reference: Tensor) -> Tensor:
    """``[n]``: cosine similarity of each row of ``features`` ``[n, C]`` with the same row of ``reference``."""
    return cosine_similarity(features.double(), reference.double(), reduction="none").float()


def knn_predict(train: Tensor, train_labels: Tensor, test: Tensor, num_classes: int, k: int = 10) -> Tensor:
    """``[m]`` labels: each test row votes among its ``k`` nearest train rows by cosine similarity,
    each vote weighted by that similarity; ties go to the lower label.

    Args:
        train: ``[n, C]`` features; train_labels: ``[n]`` long; test: ``[m, C]``.
    """
    similarity = (
        torch.nn.functional.normalize(test.double(), dim=1) @ torch.nn.functional.normalize(train.double(), dim=1).T
    )
    top, neighbour = similarity.topk(min(k, train.shape[0]), dim=1)
    votes = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, train_labels[neighbour], top)
    return votes.argmax(dim=1)


def fit_linear_probe(
    train: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-3, steps: int = 200
) -> torch.nn.Module:
    """A logistic-regression probe on standardised features, fitted with L-BFGS (deterministic).

    The standardisation (mean and std of ``train``) is part of the returned module, so test
    features of any variant go through the same map.
    """
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-6)
    linear = torch.nn.Linear(train.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    x = ((train - mean) / std).double()
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), labels) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return _Standardised(mean, std, linear).requires_grad_(False)


class _Standardised(torch.nn.Module):
    def __init__(self, mean: Tensor, std: Tensor, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = linear

    def forward(self, features: Tensor) -> Tensor:
        """``[m, C]`` -> ``[m]`` predicted labels."""
        return self.linear(((features - self.mean) / self.std).double()).argmax(dim=1)


def accuracy(predicted: Tensor, labels: Tensor, num_classes: int) -> float:
    """Fraction of ``predicted`` ``[m]`` equal to ``labels`` ``[m]`` (micro-averaged)."""
    return float(multiclass_accuracy(predicted, labels, num_classes=num_classes, average="micro"))


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two ``[n]`` series (ties get their mean rank)."""
    return float(spearman_corrcoef(x.double(), y.double()))


def jpeg_bytes_per_pixel(image: Image.Image, size: int, quality: int = 75) -> float:
    """Image complexity as in DyMU's Figure 2: the JPEG size of the ``size`` x ``size`` view the
    encoder sees (shorter side resized, centre crop), in bytes per pixel.

    A flat image compresses to almost nothing, a page of text or a textured field to a lot.
    """
    view = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / (size * size)
