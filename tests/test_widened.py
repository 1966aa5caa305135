"""Proportional attention as widened heads folded into the projection weights
(``dymu_lightning.core.widened``): equal to the bias path, to the stock model when nothing merges, and
batch-invariant; the folded weights follow the host's. CPU: the widened grid reference and a
stand-in for ``varlen_attn`` (tests/test_gpu.py runs the real kernel)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.capacity import CapacityState
from dymu_lightning.core.encoder import run_blocks, widened_attention
from dymu_lightning.core.packed_attention import widened_head_dim
from dymu_lightning.core.widened import fold_weights, folded_weights

#: Cosine similarity never exceeds 1: every layer runs matching and the merge step (so every block
#: after the first runs the widened heads, with sizes 1) and nothing merges.
NOTHING_MERGES = 2.0


def _run(backbone, model, pixels, policy, **kwargs):
    with torch.no_grad():
        x = backbone.embed(model, pixels)
        blocks = backbone.blocks(model)
        return run_blocks(x, blocks, policy, backbone.num_prefix_tokens(model), backbone.final_norm(model), **kwargs)


def _without_linears(backbone):
    """The same adapter with per-call widening (as for a host whose projections cannot be folded)."""

    class PerCall(type(backbone)):
        def blocks(self, model):
            return [dataclasses.replace(parts, linears=None) for parts in super().blocks(model)]

    clone = object.__new__(PerCall)
    clone.__dict__.update(vars(backbone))
    return clone


# 1. Widened heads equal the bias path, for every registered adapter. ------------------------------------
def test_widened_heads_equal_bias_path_in_float64(tiny64):
    if not tiny64.backbone.plain_blocks:
        pytest.skip("rotary towers run their own attention (dymu_lightning.core.rotary_units)")
    backbone, model = tiny64.backbone, tiny64.model
    pixels = tiny64.images(4)
    policy = MergePolicy(thresholds=tiny64.thresholds(pixels))
    bias = _run(backbone, model, pixels, policy, widened=False)
    assert len(set(bias.lengths.tolist())) > 1  # really variable-length
    if tiny64.backbone.name in {"timm_vit", "hf_clip", "hf_siglip", "hf_dinov2", "dinov2_vits14_offline"}:
        assert all(parts.linears is not None for parts in backbone.blocks(model))  # built-ins fold
    for widened in (_run(backbone, model, pixels, policy, widened=True),
                    _run(_without_linears(backbone), model, pixels, policy, widened=True)):  # fmt: skip
        assert torch.equal(widened.tokens_per_layer, bias.tokens_per_layer)
        assert torch.equal(widened.group, bias.group)
        assert torch.equal(widened.sizes, bias.sizes)
        assert (widened.tokens - bias.tokens).abs().max() <= 1e-12


def test_widened_heads_equal_stock_when_nothing_merges(tiny64):
    if not tiny64.backbone.plain_blocks:
        pytest.skip("rotary towers run their own attention (dymu_lightning.core.rotary_units)")
    pixels = tiny64.images(3)
    policy = MergePolicy(thresholds=[NOTHING_MERGES] * tiny64.num_layers)
    merged = _run(tiny64.backbone, tiny64.model, pixels, policy, widened=True)
    with torch.no_grad():
        stock = tiny64.backbone.stock_features(tiny64.model, pixels)
    assert (merged.tokens_per_layer == stock.shape[1]).all()
    assert (merged.tokens - stock).abs().max() <= 1e-12


# 2. Batch invariance in float32 and bfloat16 on the widened path. -----------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tests_support import tiny_timm

    backbone, model, pixels = tiny_timm(batch=6)
    with torch.no_grad():
        thresholds = batch_thresholds(backbone, model, pixels, 6)
    return backbone, model, pixels, thresholds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_widened_image_result_is_independent_of_batch_mates(tiny, dtype, path):
    """Counts, group maps and sizes identical alone and in the batch; features bitwise on the static
    path (every grid has the full width), within the CPU SDPA kernel's rounding on the dynamic one."""
    backbone, model, pixels, thresholds = tiny
    model, pixels = model.to(dtype), pixels.to(dtype)
    policy = MergePolicy(thresholds=thresholds)
    bound = {torch.float32: 1e-5, torch.bfloat16: 2**-5}[dtype]
    try:
        batch = _run(backbone, model, pixels, policy, path=path, widened=True)
        assert len(set(batch.lengths.tolist())) > 1
        for b in range(pixels.shape[0]):
            alone = _run(backbone, model, pixels[b : b + 1], policy, path=path, widened=True)
            n = int(batch.lengths[b])
            assert torch.equal(batch.tokens_per_layer[b], alone.tokens_per_layer[0])
            assert torch.equal(batch.group[b], alone.group[0])
            assert torch.equal(batch.sizes[b, :n], alone.sizes[0, :n])
            difference = (batch.tokens[b, :n] - alone.tokens[0, :n]).abs().max()
            assert difference == 0 if path == "static" else difference <= bound
    finally:
        model.float()


# 3. No per-call copy of q, k and v: the projections emit the widened heads. ----------------------------
class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func).removeprefix("aten.").split(".")[0])
        return func(*args, **(kwargs or {}))


def test_folded_heads_make_no_copy_of_q_k_v(tiny):
    backbone, model, pixels, _ = tiny
    parts = backbone.blocks(model)[1]
    x, sizes = torch.randn(20, 48), torch.rand(20) * 4
    ops = {}
    with torch.no_grad():
        for name, attention in (("folded", widened_attention(parts)),
                                ("per call", widened_attention(dataclasses.replace(parts, linears=None)))):  # fmt: skip
            with _Ops() as counter:
                h, d = attention.qkv(x, sizes)
                out = attention.out(h[:, 0])
            ops[name] = counter.ops
            assert h.shape == (20, 3, 3, widened_head_dim(16)) and d == 16 and out.shape == (20, 48)
    # norm, one GEMM into [T, 3, H, dw], three ops for log(s)/scale and one strided write of it; one
    # GEMM out of [T, H * dw]
    assert ops["folded"] == ["native_layer_norm", "addmm", "log", "clamp_", "div_", "copy_", "addmm"]
    assert {"stack", "constant_pad_nd"} <= set(ops["per call"])
    assert len(ops["per call"]) - len(ops["folded"]) >= 4


# 4. The folded weights follow the host's weights. --------------------------------------------------------
def test_folded_weights_are_cached_and_follow_the_host(tiny):
    backbone, model, pixels, thresholds = tiny
    linears = backbone.blocks(model)[1].linears
    with torch.no_grad():
        first = folded_weights(linears)
        assert folded_weights(linears) is first  # cached
        assert first.qkv_weight.shape == (3 * 3 * widened_head_dim(16), 48)
        assert first.out_weight.shape == (48, 3 * widened_head_dim(16))
        address = first.qkv_weight.data_ptr()
        linears.qkv[0].weight.mul_(0.5)  # an in-place update (an optimiser step, load_state_dict)
        updated = folded_weights(linears)
        # refreshed in place: a captured CUDA graph that holds the folded tensors sees the new weights
        assert updated.qkv_weight.data_ptr() == address
        assert torch.equal(updated.qkv_weight, fold_weights(linears).qkv_weight)
        linears.qkv[0].weight.mul_(2.0)
    try:
        # float -> bfloat16 -> float rounds the weights, keeps their version and may hand the freed
        # float storage's address back: a cache keyed on address and version would go stale here
        model.bfloat16()
        model.float()
        linears = backbone.blocks(model)[1].linears
        with torch.no_grad():
            assert torch.equal(folded_weights(linears).qkv_weight, fold_weights(linears).qkv_weight)
    finally:
        model.float()


def test_widened_gradients_equal_bias_path(tiny):
    """Under autograd the fold is made per call, differentiably: the host's weights get the bias
    path's gradients."""
    backbone, model, pixels, thresholds = tiny
    model, pixels = model.double(), pixels.double()
    policy = MergePolicy(thresholds=thresholds)
    grads = []
    try:
        for widened in (False, True):
            model.zero_grad()
            x = backbone.embed(model, pixels)
            out = run_blocks(x, backbone.blocks(model), policy, 1, model.norm, widened=widened)
            (out.tokens * out.sizes[..., None]).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        model.zero_grad()
        model.float()
    assert len(grads[0]) == len(grads[1]) > 0
    for widened, bias in zip(*grads, strict=True):
        torch.testing.assert_close(widened, bias, rtol=1e-10, atol=1e-12)


# 5. The CUDA branch (varlen_attn on the folded heads), on the CPU with a stand-in kernel. ---------------
def test_engine_varlen_branch_equals_bias_path(tiny, monkeypatch):
    import torch.nn.attention.varlen as varlen_module
    from test_engine import _fake_varlen

    from dymu_lightning.core import encoder, packed_attention

    backbone, model, pixels, thresholds = tiny
    model, pixels = model.double(), pixels.double()
    policy = MergePolicy(thresholds=thresholds)
    try:
        bias = _run(backbone, model, pixels, policy, widened=False)
        monkeypatch.setattr(varlen_module, "varlen_attn", _fake_varlen(with_scale=True))
        monkeypatch.setattr(encoder, "varlen_available", lambda device, dtype: True)
        packed_attention._varlen_options.cache_clear()
        varlen = _run(backbone, model, pixels, policy, path="dynamic")  # widened: the default where varlen runs
    finally:
        packed_attention._varlen_options.cache_clear()
        model.float()
    assert torch.equal(varlen.tokens_per_layer, bias.tokens_per_layer)
    assert torch.equal(varlen.group, bias.group)
    assert (varlen.tokens - bias.tokens).abs().max() <= 1e-12


def test_dead_rows_draw_no_attention_on_the_widened_grid():
    """A capacity buffer with dead rows at its tail and a grid wider than any image (after a lagged
    shrink): the live rows' widened attention equals the bias path's."""
    from dymu_lightning.core.packed_attention import grid_attention, widen_heads, widened_grid_attention

    torch.manual_seed(0)
    lengths, spare, heads, d = [5, 9, 2], 4, 2, 8
    state = CapacityState.from_rows(
        x=torch.zeros(16 + spare, 1),
        sizes=torch.cat([torch.randint(1, 5, (16,)).float(), torch.zeros(spare)]),
        image=torch.cat([torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)), torch.full((spare,), 3)]),
        position=torch.cat([torch.arange(n) for n in lengths] + [torch.arange(spare)]),
        lengths=torch.tensor(lengths),
        group=torch.zeros(3, 1, dtype=torch.long),
        max_len=11,
    )
    q, k, v = (torch.randn(state.capacity, heads, d, dtype=torch.float64) for _ in range(3))
    scale = d**-0.5
    expected = grid_attention(q, k, v, state.sizes, state.slot, 3, 11, scale)
    h = torch.stack(widen_heads(q, k, v, state.sizes, scale), dim=1)
    out, _ = widened_grid_attention(h, d, state.slot, 3, 11, scale)
    assert (out[:16, :, :d] - expected[:16]).abs().max() <= 1e-12
    assert (out[:16, :, d:] == 0).all()
