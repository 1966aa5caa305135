"""Peak memory of generate() with DyMU against the stock model, counted as tensor bytes on the CPU
(``benchmarks/peak_memory.py``): DyMU must never need more memory than the model it speeds up."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from tests_support import generate, merging_policy, prompt_batch, tiny_llava

from dymu_lightning.backbones.hf_llava import apply_dymu
from dymu_lightning.core import MergePolicy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peak_memory import PeakTensorBytes  # noqa: E402


def peak_bytes(model, batch) -> int:
    with torch.no_grad(), PeakTensorBytes() as tracker:
        generate(model, batch, 3)
    return tracker.peak


def test_the_tracker_counts_allocations_not_views_and_frees():
    with PeakTensorBytes() as tracker:
        a = torch.zeros(1000, 1000, dtype=torch.float64)  # 8 MB
        b = a.t()  # a view: nothing new
        a.add_(1)  # in place: nothing new
        c = a + 1  # 8 MB more
        del c
        d = torch.ones(500, 1000, dtype=torch.float64)  # 4 MB, after c was freed
    assert tracker.peak == 16_000_000 and tracker.live == 12_000_000
    del a, b, d


@pytest.mark.parametrize("cache", ["compact", "expanded"])
def test_dymu_generate_never_peaks_above_the_stock_model(cache):
    """Left-padded batch of two prompts with three images; nothing merged, then merging."""
    model = tiny_llava()
    batch = prompt_batch()
    stock = peak_bytes(model, batch)
    apply_dymu(model, MergePolicy(thresholds=[math.inf] * 3), cache=cache)
    unmerged = peak_bytes(model, batch)
    apply_dymu(model, merging_policy(model), cache=cache)
    merged = peak_bytes(model, batch)
    assert unmerged <= stock  # the same work as the stock model, in no more memory
    assert merged < 0.75 * stock  # fewer rows: less memory, not just no more
