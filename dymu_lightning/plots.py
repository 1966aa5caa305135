"""The plots that reports share: matplotlib without a display, and the token-count histogram."""

from __future__ import annotations

from typing import Any

import torch


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: reports are written on clusters with no display."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def draw_token_histogram(axis: Any, histogram: torch.Tensor, **bar_options: Any) -> None:
    """Bars of a per-count histogram ``[full + 1]`` (images with each token count) on a matplotlib axis."""
    # Per-count bins are too thin to read for small runs: group them into about 40 bars.
    width = max(1, histogram.numel() // 40)
    padded = torch.nn.functional.pad(histogram, (0, (-histogram.numel()) % width))
    bars = padded.reshape(-1, width).sum(dim=1)
    axis.bar((torch.arange(bars.numel()) * width).tolist(), bars.tolist(), width=width, align="edge", **bar_options)
    axis.set_xlabel("tokens per image at the encoder output")
    axis.set_ylabel("images")
