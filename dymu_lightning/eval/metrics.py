"""Evaluation metrics on plain tensors. Each one is small enough to check by hand (tests/test_eval.py).

Accuracy, cosine similarity and Spearman's rank correlation come from torchmetrics; token-count
statistics reuse :class:`~dymu_lightning.core.calibration.TokenStats`, the same accumulator
calibration reports with.
"""

from __future__ import annotations

import io
import re

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


WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the linear probe's L2 strengths, tried by cross-validation


def choose_weight_decay(
    train: Tensor, labels: Tensor, num_classes: int, grid: tuple[float, ...] = WEIGHT_DECAYS, folds: int = 5
) -> tuple[float, dict[float, float]]:
    """The linear probe's weight decay with the best ``folds``-fold accuracy on ``train`` ``[n, C]``.

    Chosen on the training features alone (fold of row i: i mod ``folds``), so the choice cannot see
    the evaluated variants. Ties go to the larger decay. Returns (decay, {decay: mean fold accuracy}).
    """
    fold = torch.arange(train.shape[0]) % folds
    scores = {}
    for decay in grid:
        correct = 0
        for held in range(folds):
            fit = fold != held
            probe = fit_linear_probe(train[fit], labels[fit], num_classes, decay)
            correct += int((probe(train[~fit]) == labels[~fit]).sum())
        scores[decay] = correct / train.shape[0]
    best = max(scores.values())
    return max(decay for decay, score in scores.items() if score == best), scores


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


def paired_difference(correct_a: Tensor, correct_b: Tensor) -> dict[str, float | int]:
    """Accuracy of A minus accuracy of B on the same images, with a 95% interval.

    Args:
        correct_a, correct_b: ``[n]`` bool, whether each variant got each image right.

    The interval is the normal one for the mean of the per-image differences (each -1, 0 or +1), so
    it only counts the images where the two disagree: ``only_a`` right for A alone, ``only_b`` for B.
    """
    difference = correct_a.double() - correct_b.double()
    n = difference.numel()
    half_width = 1.96 * float(difference.std(correction=1)) / n**0.5 if n > 1 else float("inf")
    mean = float(difference.mean())
    return {
        "difference": mean,
        "low": mean - half_width,
        "high": mean + half_width,
        "only_a": int((correct_a & ~correct_b).sum()),
        "only_b": int((correct_b & ~correct_a).sum()),
        "images": n,
    }


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two ``[n]`` series (ties get their mean rank)."""
    return float(spearman_corrcoef(x.double(), y.double()))


def spearman_interval(x: Tensor, y: Tensor, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of :func:`spearman` over the ``[n]`` pairs (seeded, so a rerun
    prints the same interval). Resamples whose ``y`` is constant have no correlation and are skipped."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, x.numel(), (resamples, x.numel()), generator=generator)
    values = [spearman(x[pick], y[pick]) for pick in picks if y[pick].unique().numel() > 1]
    low, high = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)


def group_means(values: Tensor, groups: list[str]) -> Tensor:
    """``[G]``: the mean of ``values`` ``[n]`` over each group, groups in order of first appearance."""
    names = list(dict.fromkeys(groups))
    index = torch.tensor([names.index(g) for g in groups])
    sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, index, values.double())
    return sums / torch.bincount(index, minlength=len(names)).double()


SCENE_PATTERN = r"^(.*[A-Za-z])(?:[-_]?\d+)+[a-z]?$"  # a file name less its trailing frame number


def scene_of(key: str, pattern: str = SCENE_PATTERN) -> str:
    """The scene an image belongs to: the first group of ``pattern`` matched on its key, else the key.

    With the default, ``calibration_left07`` and ``calibration_left12`` are one scene, ``campus_P1070493``
    and ``campus_P1070512`` another, while ``rocks2-r`` and ``58060`` stay their own.
    """
    match = re.match(pattern, key)
    return match.group(1) if match else key


def jpeg_bytes_per_pixel(image: Image.Image, size: int, quality: int = 75) -> float:
    """Image complexity as in DyMU's Figure 2: the JPEG size of the ``size`` x ``size`` view the
    encoder sees (shorter side resized, centre crop), in bytes per pixel.

    A flat image compresses to almost nothing, a page of text or a textured field to a lot.
    """
    view = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / (size * size)
