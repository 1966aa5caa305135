"""Per-layer merge targets r_l: constant (the paper's choice), linear or reverse-linear (ablations).

A target is given either as r per layer, or as the tokens left per image after the merging layers
(the DyMU reference code's "72out" = 576 - 504 merges over 24 layers). Layers at or past
``merging_layers`` get r = 0: their merges would be unused (LLaVA reads the penultimate layer).
"""

from __future__ import annotations

from typing import Literal

Schedule = Literal["constant", "linear", "reverse_linear"]
SCHEDULES: tuple[str, ...] = ("constant", "linear", "reverse_linear")


def merges_per_layer(
    num_layers: int,
    schedule: Schedule = "constant",
    r: int | None = None,
    tokens_left: int | None = None,
    tokens: int | None = None,
    merging_layers: int | None = None,
) -> list[int]:
    """r_l for every layer; the total over layers equals the target exactly.

    Args:
        num_layers: blocks in the encoder.
        schedule: ``constant`` (r everywhere), ``linear`` (from about 2r down to 0: merge early) or
            ``reverse_linear`` (from 0 up to about 2r: merge late).
        r: mean merges per merging layer. Exactly one of ``r`` and ``tokens_left`` is given.
        tokens_left: target tokens per image after the merging layers (needs ``tokens``).
        tokens: tokens per image entering the first block, protected ones included.
        merging_layers: how many leading layers merge (default all).
    """
    merging = num_layers if merging_layers is None else merging_layers
    if not 0 < merging <= num_layers:
        raise ValueError(f"merging_layers must be in 1..{num_layers}, got {merging_layers}")
    if (r is None) == (tokens_left is None):
        raise ValueError("give exactly one of r (merges per layer) and tokens_left (tokens after merging)")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if tokens_left is not None:
        if tokens is None:
            raise ValueError("tokens_left needs the encoder's token count (tokens)")
        if not 0 < tokens_left <= tokens:
            raise ValueError(f"tokens_left must be in 1..{tokens}, got {tokens_left}")
        total = tokens - tokens_left
    else:
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        total = r * merging

    weights = {
        "constant": [1.0] * merging,
        "linear": [float(merging - i) for i in range(merging)],
        "reverse_linear": [float(i + 1) for i in range(merging)],
    }[schedule]
    per_layer = _apportion(total, weights)
    return per_layer + [0] * (num_layers - merging)


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Integers proportional to ``weights`` that sum to ``total`` (largest remainders first, ties to
    earlier layers, so the result is deterministic)."""
    scale = total / sum(weights)
    exact = [w * scale for w in weights]
    floors = [int(x) for x in exact]
    remainder = total - sum(floors)
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[:remainder]:
        floors[i] += 1
    return floors
