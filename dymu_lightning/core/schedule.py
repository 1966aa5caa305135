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


def fixed_r_lengths(r: list[int], tokens: int, num_prefix: int) -> list[int]:
    """Tokens per image after each layer when every layer merges its ``r_l`` best edges (ToMe).

    A layer can merge at most one edge per eligible A token (the even positions past the prefix, see
    :mod:`dymu_lightning.core.matching`), so a large ``r_l`` on a short sequence merges less than asked.
    Every image of a batch has the same count in this mode, so the result is exact for each image.
    """
    lengths, n = [], tokens
    for r_l in r:
        eligible_a = max(0, (n + 1) // 2 - (num_prefix + 1) // 2)
        eligible_b = max(0, n // 2 - num_prefix // 2)
        n -= min(r_l, eligible_a if eligible_b else 0)
        lengths.append(n)
    return lengths


def matched_fixed_r(
    num_layers: int,
    tokens: int,
    target: float,
    num_prefix: int,
    merging_layers: int | None = None,
) -> list[int]:
    """Per-layer r for ToMe whose tokens per image land nearest ``target`` (e.g. a DyMU variant's mean).

    The total number of merges is ``round(tokens - target)`` spread evenly over the merging layers
    (the constant schedule with a non-integer mean r: the remainder goes to the earliest layers). If a
    late layer cannot merge its share (too few tokens left), the shortfall moves to earlier layers,
    so the final count is within 0.5 of ``target``; a target no schedule reaches is a ValueError.

    Args:
        num_layers: blocks in the encoder.
        tokens: tokens per image entering the first block, prefix included.
        target: wanted tokens per image at the output, in ``[num_prefix + 1, tokens]``.
        num_prefix: leading tokens that never merge.
        merging_layers: how many leading layers merge (default all).
    """
    if not num_prefix < target <= tokens:
        raise ValueError(f"target must be in ({num_prefix}, {tokens}] tokens, got {target}")
    merging = num_layers if merging_layers is None else merging_layers
    total = tokens - round(target)
    if total <= 0:
        return [0] * num_layers
    r = merges_per_layer(num_layers, "constant", tokens_left=tokens - total, tokens=tokens, merging_layers=merging)
    # Move whatever a layer cannot merge to the layer before it (which has more tokens); repeat until
    # nothing is short. Every move keeps the total asked for, so the loop ends within total x layers.
    for _ in range(total * num_layers):
        lengths = fixed_r_lengths(r, tokens, num_prefix)
        done = [b - a for b, a in zip([tokens, *lengths[:-1]], lengths, strict=True)]
        short = [i for i in range(1, merging) if done[i] < r[i]]
        if not short:
            break
        late = short[-1]
        r[late - 1] += r[late] - done[late]
        r[late] = done[late]
    reached = fixed_r_lengths(r, tokens, num_prefix)[-1]
    if abs(reached - target) > 0.5:
        raise ValueError(
            f"{num_layers} layers of bipartite merging from {tokens} tokens cannot end at {target:g} per image "
            f"(at best {reached})"
        )
    return r
