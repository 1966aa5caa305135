"""VTU over M-RoPE: Qwen2-VL's language model (``Qwen2VLTextModel``), where every visual position has a
(t, h, w) position and a merged visual token stands for several of them.

The positions are the host's own (``get_rope_index`` on the full, unmerged prompt: text after an
image continues after the image's largest grid coordinate, not after its token count). A
:class:`VirtualLayout` then carries them as ``[3, B, N]``; each row's members keep their own (t, h, w)
position. Tiny random models, float64.
"""

from __future__ import annotations

import pytest
import torch
from tests_support import naive_reference
from transformers import Cache, Qwen2VLConfig, Qwen2VLForConditionalGeneration

from dymu_lightning.backbones.hf_llm import vtu_decode, vtu_forward, vtu_prefill
from dymu_lightning.core.vtu import VirtualLayout

IMAGE = 60  # the image placeholder token id
HIDDEN = 32
# text 2, an image of 2 x 4 cells, text 2, an image of 2 x 3 cells, text 1: 19 positions
PIECES = [("text", 2), ("image", (1, 4, 8)), ("text", 2), ("image", (1, 4, 6)), ("text", 1)]


def build(attn: str = "sdpa") -> Qwen2VLForConditionalGeneration:
    text = {
        "vocab_size": 64,
        "hidden_size": HIDDEN,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0},
    }
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": HIDDEN, "num_heads": 2, "patch_size": 4}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).double().eval()


def mrope_positions(model, batch: int) -> torch.Tensor:
    """``[3, B, 19]``: the host's M-RoPE positions of the full prompt (every cell a placeholder)."""
    ids, types, grids = [], [], []
    for kind, what in PIECES:
        if kind == "text":
            ids += [1] * what
            types += [0] * what
        else:
            cells = what[1] * what[2] // 4
            ids += [IMAGE] * cells
            types += [1] * cells
            grids.append(what)
    input_ids = torch.tensor([ids] * batch)
    positions, _ = model.model.get_rope_index(
        input_ids, torch.tensor([types] * batch), image_grid_thw=torch.tensor(grids * batch)
    )
    return positions


def random_layout(model, pads: list[int], seed: int = 0) -> VirtualLayout:
    """Text singletons; the 8-cell image merged into 3 rows and the 6-cell one into 2, at random
    (different per sample); the last ``pad`` positions of a sample are padding."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for pad in pads:
        pieces, row = [], 0
        for kind, what in PIECES:
            size = what if kind == "text" else what[1] * what[2] // 4
            groups = size if kind == "text" else {8: 3, 6: 2}[size]
            if kind == "text":
                pieces.append(torch.arange(row, row + size))
            else:
                assignment = torch.cat(
                    [torch.arange(groups), torch.randint(0, groups, (size - groups,), generator=generator)]
                )
                pieces.append(row + assignment[torch.randperm(size, generator=generator)])
            row += groups
        expand = torch.cat(pieces)
        valid = torch.arange(expand.numel()) < expand.numel() - pad
        expand[~valid] = row
        samples.append((expand, valid, row + 1))
    expand = torch.stack([e for e, _, _ in samples])
    valid = torch.stack([v for _, v, _ in samples])
    return VirtualLayout(expand, mrope_positions(model, len(pads)), valid, max(n for _, _, n in samples))


def test_mrope_positions_are_grids_and_text_continues_after_the_largest_coordinate():
    positions = mrope_positions(build(), 1)[:, 0]  # [3, 19]
    # the first image (cells 2 x 4) starts at 2: t = 2, h = 2..3, w = 2..5
    assert positions[:, 2:10].tolist() == [[2] * 8, [2, 2, 2, 2, 3, 3, 3, 3], [2, 3, 4, 5, 2, 3, 4, 5]]
    assert positions[:, 10].tolist() == [6, 6, 6]  # 2 + max(2, 4) cells: not 2 + 8 tokens


def test_singleton_groups_equal_the_stock_language_model():
    model = build().model.language_model
    positions = mrope_positions(build(), 2)
    embeds = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    layout = VirtualLayout(torch.arange(19).expand(2, -1), positions, torch.ones(2, 19, dtype=torch.bool), 19)
    with torch.no_grad():
        stock = model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        ours = vtu_forward(model, embeds, layout)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-10)


def test_vtu_over_mrope_equals_the_naive_reference():
    """Random group maps, batch 2 with different maps, two images per sample, padding: every layer
    (the first included) equals expanding the rows to the full sequence, the host's attention at the
    members' own (t, h, w) positions, and the mean over each row's positions."""
    full = build(attn="eager")
    model = full.model.language_model
    layout = random_layout(full, pads=[0, 3])
    assert not torch.equal(layout.expand[0, :16], layout.expand[1, :16])
    rows = torch.randn(2, layout.num_rows, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        ours = vtu_forward(model, rows, layout)
        reference = naive_reference(model, rows, layout)
        # the same rows with 1D positions (every axis the sequence index) are another model input
        flat = VirtualLayout(layout.expand, torch.arange(19).expand(2, -1), layout.valid, layout.num_rows)
        one_d = vtu_forward(model, rows, flat)
    used = layout.counts() > 0
    torch.testing.assert_close(ours[used], reference[used], rtol=0, atol=1e-5)
    assert (one_d[used] - ours[used]).abs().max() > 1e-6


def test_compact_decoding_over_mrope_equals_the_expanded_cache():
    """After a merged prefill, new text tokens (positions after the prompt's largest, on all three
    axes) decode with the compact cache exactly as the stock model decodes on the expanded cache."""
    full = build()
    model = full.model.language_model
    layout = random_layout(full, pads=[0, 0], seed=3)
    rows = torch.randn(2, layout.num_rows, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        _, compact = vtu_prefill(model, rows, layout, cache="compact")
        _, expanded = vtu_prefill(model, rows, layout, cache="expanded")
        assert isinstance(compact, Cache)
        for new in (2, 1):
            embeds = torch.randn(2, new, HIDDEN, dtype=torch.float64)
            start = layout.positions.amax(dim=(0, 2))[:, None] + 1  # [B, 1]
            positions = (start + torch.arange(new)).expand(3, -1, -1)  # [3, B, t]
            valid = torch.cat([layout.valid, torch.ones(2, new, dtype=torch.bool)], dim=1)
            ours = vtu_decode(model, embeds, compact, positions, valid)
            stock = model(
                inputs_embeds=embeds, position_ids=positions, attention_mask=valid.long(), cache=expanded
            ).last_hidden_state
            torch.testing.assert_close(ours, stock, rtol=0, atol=1e-10)
            layout = layout.extend(positions, valid)
    assert compact.layout.positions.shape == (3, 2, 19 + 3)


def test_mrope_layouts_select_samples_on_the_batch_axis():
    layout = random_layout(build(), pads=[0, 2, 1])
    picked = layout.select(torch.tensor([2, 0]))
    assert torch.equal(picked.positions, layout.positions[:, [2, 0]])
    assert torch.equal(picked.expand, layout.expand[[2, 0]])


@pytest.mark.parametrize("pads", [[0, 3]])
def test_padding_rows_get_no_positions_of_their_own(pads):
    layout = random_layout(build(), pads=pads)
    assert layout.positions.shape == (3, 2, 19) and layout.counts()[1, -1] == 0
