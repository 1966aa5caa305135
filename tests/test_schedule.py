"""Per-layer merge targets."""

from __future__ import annotations

import pytest

from dymu_lightning.core.schedule import merges_per_layer


def test_constant_schedule_and_merging_layers():
    assert merges_per_layer(24, r=16, merging_layers=23) == [16] * 23 + [0]


@pytest.mark.parametrize("kind", ["constant", "linear", "reverse_linear"])
def test_every_schedule_hits_the_total_exactly(kind):
    r = merges_per_layer(12, kind, r=11)
    assert sum(r) == 12 * 11 and len(r) == 12 and min(r) >= 0


def test_linear_merges_early_and_reverse_linear_late():
    linear = merges_per_layer(12, "linear", r=8)
    reverse = merges_per_layer(12, "reverse_linear", r=8)
    assert linear == sorted(linear, reverse=True) and linear[0] > 8 > linear[-1]
    assert reverse == sorted(reverse) and reverse[-1] > 8 > reverse[0]


def test_tokens_left_target():
    # the reference code's "72out": 576 patches + CLS, 72 left after 24 layers
    r = merges_per_layer(24, tokens_left=73, tokens=577)
    assert sum(r) == 504 and set(r) == {21}
    assert sum(merges_per_layer(12, tokens_left=100, tokens=257)) == 157


def test_bad_targets_are_clear_errors():
    with pytest.raises(ValueError, match="exactly one of r"):
        merges_per_layer(12, r=4, tokens_left=10, tokens=257)
    with pytest.raises(ValueError, match="unknown schedule 'cubic'"):
        merges_per_layer(12, "cubic", r=4)
    with pytest.raises(ValueError, match=r"tokens_left must be in 1..257, got 300"):
        merges_per_layer(12, tokens_left=300, tokens=257)
