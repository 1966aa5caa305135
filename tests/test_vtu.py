"""VTU in Llama-family models against the stock model and a naive reference."""

from __future__ import annotations

import pytest
import torch
from tests_support import FAMILIES, TINY, naive_reference

from dymu_lightning.backbones.hf_llm import vtu_forward
from dymu_lightning.core.vtu import VirtualLayout


def build(family: str, attn: str = "sdpa") -> torch.nn.Module:
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(**TINY, attn_implementation=attn)
    return model_class(config).double().eval()


def random_layout(generator: torch.Generator, pad: int = 0) -> VirtualLayout:
    """Two text tokens, an image of 8 patches merged into 3 rows, two text tokens, a second image of
    6 patches merged into 2 rows, one text token (19 positions, 10 rows); the last ``pad`` positions
    are then turned into padding, pointing at an extra padding row."""
    pieces, row = [], 0
    for kind, size, groups in (("text", 2, 2), ("image", 8, 3), ("text", 2, 2), ("image", 6, 2), ("text", 1, 1)):
        if kind == "text":
            pieces.append(torch.arange(row, row + size))
        else:
            # every group gets at least one patch, the rest land at random
            assignment = torch.cat(
                [torch.arange(groups), torch.randint(0, groups, (size - groups,), generator=generator)]
            )
            pieces.append(row + assignment[torch.randperm(size, generator=generator)])
        row += groups
    expand = torch.cat(pieces)
    valid = torch.arange(expand.numel()) < expand.numel() - pad
    expand[~valid] = row
    return expand, valid, row + 1


def batch_layout(pads: list[int], seed: int = 0) -> VirtualLayout:
    generator = torch.Generator().manual_seed(seed)
    samples = [random_layout(generator, pad) for pad in pads]
    num_rows = max(n for _, _, n in samples)
    expand = torch.stack([e for e, _, _ in samples])
    valid = torch.stack([v for _, v, _ in samples])
    positions = torch.arange(expand.shape[1]).expand_as(expand)
    return VirtualLayout(expand, positions, valid, num_rows)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_singleton_groups_equal_the_stock_model(family):
    model = build(family)
    embeds = torch.randn(2, 11, TINY["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        stock = model(inputs_embeds=embeds).last_hidden_state
        ours = vtu_forward(model, embeds, VirtualLayout.singletons(2, 11))
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vtu_equals_the_naive_reference(family):
    """Random group maps, batch 2 with different maps, two images per sample, and padding."""
    model = build(family, attn="eager")
    layout = batch_layout(pads=[0, 3])
    assert not torch.equal(layout.expand[0, :16], layout.expand[1, :16])
    rows = torch.randn(2, layout.num_rows, TINY["hidden_size"], dtype=torch.float64)
    with torch.no_grad():
        ours = vtu_forward(model, rows, layout)
        reference = naive_reference(model, rows, layout)
    used = layout.counts() > 0
    torch.testing.assert_close(ours[used], reference[used], rtol=0, atol=1e-5)
    # a merged row differs from running the same rows as if they were plain tokens
    plain = vtu_forward(model, rows, VirtualLayout.singletons(2, layout.num_rows))
    assert (plain[used] - ours[used]).abs().max() > 1e-3


def test_rows_round_trip():
    layout = batch_layout(pads=[0, 2], seed=1)
    rows = torch.randn(2, layout.num_rows, 3, dtype=torch.float64)
    back = layout.to_rows(layout.to_positions(rows))
    used = layout.counts() > 0
    torch.testing.assert_close(back[used], rows[used])
    assert torch.equal(layout.counts().sum(dim=1), layout.valid.sum(dim=1).float())
