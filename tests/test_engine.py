"""The capacity-buffer engine against today's padded engine, and its sync-free and batch-invariant
properties (CPU; the CUDA kernels are checked by tests/test_gpu.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from dymu_lightning.backbones.thresholds import batch_thresholds
from dymu_lightning.core import MergePolicy, TokenLayout, TokenState, attention, merge_tokens
from dymu_lightning.core.capacity import CapacityState, LaggedCounts, merge_step
from dymu_lightning.core.encoder import STATIC_BATCH_CUTOFF, choose_path, run_blocks, run_capacity_blocks
from dymu_lightning.core.packed_attention import DEAD_LOGIT, widen_heads, widened_dense_attention, widened_head_dim
from dymu_lightning.core.padded_engine import run_blocks_padded


@pytest.fixture(scope="module")
def tiny():
    """A 3-block timm ViT (64 patches + CLS), 6 images (smooth ones merge a lot, noisy ones little),
    and thresholds calibrated on them."""
    from tests_support import tiny_timm

    backbone, model, pixels = tiny_timm(batch=6)
    with torch.no_grad():
        thresholds = batch_thresholds(backbone, model, pixels, 6)
    return backbone, model, pixels, thresholds


def _policies(thresholds: list[float]) -> dict[str, MergePolicy]:
    return {
        "threshold": MergePolicy(thresholds=thresholds),
        "fixed_r": MergePolicy(mode="fixed_r", r=5),
        "capped": MergePolicy(thresholds=thresholds, max_merges=7, min_tokens=20),
        "batch_topk": MergePolicy(mode="batch_topk", r=7),
    }


def _run(engine, backbone, model, pixels, policy, **kwargs):
    x = backbone.embed(model, pixels)
    return engine(x, backbone.blocks(model), policy, num_prefix=1, final=model.norm, **kwargs)


# 1. Equal to today's engine in float64. -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["threshold", "fixed_r", "capped", "batch_topk"])
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_engine_equals_padded_engine_in_float64(tiny, mode, path):
    backbone, model, pixels, thresholds = tiny
    model, pixels = model.double(), pixels.double()
    policy = _policies(thresholds)[mode]
    try:
        with torch.no_grad():
            new = _run(run_blocks, backbone, model, pixels, policy, path=path)
            old = _run(run_blocks_padded, backbone, model, pixels, policy)
    finally:
        model.float()
    assert torch.equal(new.tokens_per_layer, old.tokens_per_layer)
    assert torch.equal(new.group, old.group)
    assert torch.equal(new.sizes, old.sizes) and torch.equal(new.mask, old.mask)
    assert new.tokens.shape == old.tokens.shape
    assert (new.tokens - old.tokens).abs().max() <= 1e-12
    assert torch.equal(new.layout.batch_index, old.layout.batch_index)
    assert torch.equal(new.layout.pos_index, old.layout.pos_index)
    assert len(set(new.lengths.tolist())) > 1 or mode == "fixed_r"  # really variable-length


def test_gradients_equal_padded_engine(tiny):
    """The fine-tune recipe backpropagates through the size-weighted merges."""
    backbone, model, pixels, thresholds = tiny
    model, pixels = model.double(), pixels.double()
    policy = MergePolicy(thresholds=thresholds)
    grads = []
    try:
        for engine in (run_blocks, run_blocks_padded):
            model.zero_grad()
            out = _run(engine, backbone, model, pixels, policy)
            (out.tokens * out.sizes[..., None]).square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        model.zero_grad()
        model.float()
    assert len(grads[0]) == len(grads[1]) > 0
    for new, old in zip(*grads, strict=True):
        torch.testing.assert_close(new, old, rtol=1e-10, atol=1e-12)


# 2. The merge step on capacity buffers equals the exact-size merge. ---------------------------------------
def test_merge_step_with_dead_rows_equals_exact_merge():
    torch.manual_seed(0)
    lengths, channels, spare = [9, 5, 8], 4, 7
    layout = TokenLayout.from_lengths(torch.tensor(lengths), max(lengths), sum(lengths))
    sizes = torch.randint(1, 4, (layout.total,)).double()
    x = torch.randn(layout.total, channels, dtype=torch.float64)
    group = torch.randint(0, 5, (3, 12))  # positions; the capacity state keeps buffer rows
    exact = TokenState(x, sizes.float(), layout, group)
    # The same batch in a buffer with spare dead rows (garbage values, size 0) and a wider grid.
    capacity = CapacityState.from_rows(
        x=torch.cat([x, torch.full((spare, channels), float("nan"), dtype=torch.float64)]),
        sizes=torch.cat([sizes.float(), torch.zeros(spare)]),
        image=torch.cat([layout.batch_index, torch.full((spare,), 3)]),
        position=torch.cat([layout.pos_index, torch.arange(spare)]),
        lengths=layout.lengths,
        group=group + layout.starts()[:, None],
        max_len=11,
    )
    # Per image: A tokens at even positions, partners among its own B tokens (odd positions).
    num_a = torch.tensor([(n + 1) // 2 for n in lengths])
    num_b = torch.tensor([n // 2 for n in lengths])
    partner = torch.randint(0, 100, (3, 5)) % num_b[:, None]
    merge = (torch.rand(3, 5) < 0.5) & (torch.arange(5) < num_a[:, None])
    reference = merge_tokens(exact, partner, merge)
    wide = torch.zeros(3, 1, dtype=torch.long)  # the grid of width 11 has 6 A columns
    after = merge_step(capacity, torch.cat([partner, wide], 1), torch.cat([merge, wide.bool()], 1))
    total = reference.layout.total
    assert torch.equal(after.lengths, reference.layout.lengths)
    assert torch.equal(after.group_positions(), reference.group)
    assert torch.equal(after.sizes[:total], reference.sizes)
    assert (after.x[:total] - reference.x).abs().max() <= 1e-15
    assert (after.sizes[total:] == 0).all() and (after.image[total:] == 3).all()  # dead rows stay dead
    # the boundaries the merge keeps as a view of its cumsum are varlen's cu_seqlens
    assert torch.equal(after.cu_seqlens(), torch.cat([torch.zeros(1), reference.layout.lengths.cumsum(0)]).int())
    assert torch.equal(replace(after, bounds=None).cu_seqlens(), after.cu_seqlens())
    assert torch.equal(after.image[:total], reference.layout.batch_index)
    assert torch.equal(after.position[:total], reference.layout.pos_index)


# 3. Widened heads equal the bias path. --------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_widened_heads_equal_bias_path(dtype, tolerance):
    torch.manual_seed(0)
    length, heads, head_dim = 11, 3, 16
    q, k, v = (torch.randn(length, heads, head_dim, dtype=dtype) for _ in range(3))
    sizes = torch.tensor([1, 3, 2, 1, 7, 1, 0, 4, 1, 0, 2], dtype=torch.float32)  # two dead keys
    scale = head_dim**-0.5
    bias = sizes.to(dtype).log()[None, None, None, :]  # log 0 = -inf
    expected = attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), scale, bias, "eager")[0].transpose(0, 1)
    widened = widened_dense_attention(q, k, v, sizes, scale)
    assert (widened - expected).abs().max() <= tolerance
    q_w, k_w, v_w = widen_heads(q, k, v, sizes, scale)
    assert q_w.shape[-1] == widened_head_dim(head_dim) == 24 and widened_head_dim(64) == 72
    assert (k_w[6, :, head_dim] == torch.tensor(DEAD_LOGIT / scale, dtype=dtype)).all()  # finite, not -inf
    assert (v_w[..., head_dim:] == 0).all()


# 4. Batch invariance: an image's counts and group map never depend on its batch-mates. -----------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_image_result_is_independent_of_batch_mates(tiny, dtype, path):
    """Counts and group maps identical; features bitwise on the static path (every grid has the full
    width). On the dynamic path the CPU reference attention runs on a grid as wide as the batch's
    longest image, and the CPU SDPA kernel rounds differently for other widths: bounded below."""
    backbone, model, pixels, thresholds = tiny
    model, pixels = model.to(dtype), pixels.to(dtype)
    policy = MergePolicy(thresholds=thresholds)
    bound = {torch.float32: 1e-5, torch.bfloat16: 2**-5}[dtype]
    try:
        with torch.no_grad():
            batch = _run(run_blocks, backbone, model, pixels, policy, path=path)
            assert len(set(batch.lengths.tolist())) > 1
            for b in range(pixels.shape[0]):
                alone = _run(run_blocks, backbone, model, pixels[b : b + 1], policy, path=path)
                n = int(batch.lengths[b])
                assert torch.equal(batch.tokens_per_layer[b], alone.tokens_per_layer[0])
                assert torch.equal(batch.group[b], alone.group[0])
                assert torch.equal(batch.sizes[b, :n], alone.sizes[0, :n])
                difference = (batch.tokens[b, :n] - alone.tokens[0, :n]).abs().max()
                assert difference == 0 if path == "static" else difference <= bound
    finally:
        model.float()


# 5. The static path equals the dynamic one; lagged shrinking changes nothing. ----------------------------
def test_static_and_lagged_paths_equal_dynamic(tiny):
    backbone, model, pixels, thresholds = tiny
    policy = MergePolicy(thresholds=thresholds)
    never = LaggedCounts(ready=lambda request: False)
    late = LaggedCounts(every=2, ready=lambda request: request % 2 == 0)
    with torch.no_grad():
        dynamic = _run(run_blocks, backbone, model, pixels, policy, path="dynamic")
        for kwargs in ({"path": "static"}, {"path": "dynamic", "counts_reader": never}, {"counts_reader": late}):
            other = _run(run_blocks, backbone, model, pixels, policy, **kwargs)
            assert torch.equal(other.tokens_per_layer, dynamic.tokens_per_layer)
            assert torch.equal(other.group, dynamic.group)
            assert torch.equal(other.sizes, dynamic.sizes)
            torch.testing.assert_close(other.tokens, dynamic.tokens, rtol=0, atol=1e-5)
    assert never.reads == 0 and late.reads >= 1


def test_auto_path_is_static_only_for_small_cuda_batches():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_path("auto", 1, cpu) == "dynamic"
    assert choose_path("auto", STATIC_BATCH_CUTOFF, cuda) == "static"
    assert choose_path("auto", STATIC_BATCH_CUTOFF + 1, cuda) == "dynamic"
    assert choose_path("static", 64, cpu) == "static"
    with pytest.raises(ValueError, match="unknown engine path 'fast'"):
        choose_path("fast", 1, cpu)


# 6. Lagged shrinking: bookkeeping with a fake "copy finished" predicate. ----------------------------------
def test_lagged_counts_return_the_newest_finished_copy():
    finished = set()
    reader = LaggedCounts(every=2, ready=lambda request: request in finished)
    for lengths in ([4, 4, 2], [3, 3, 2], [3, 2, 1]):  # (total, longest): (10, 4), (8, 3), (6, 3)
        reader.request(torch.tensor(lengths))
    assert reader.poll() is None  # no copy has finished
    finished.update({0, 1})
    assert reader.poll() == (8, 3)  # the newest finished copy wins; the older one is dropped
    assert reader.poll() is None  # and too soon: fewer than `every` merges since the last shrink
    reader.request(torch.tensor([2, 3]))
    finished.update({2, 3})
    assert reader.poll() is None  # one merge since the shrink: still too soon
    reader.request(torch.tensor([2, 2]))
    finished.add(4)
    assert reader.poll() == (4, 2) and reader.reads == 2 and not reader.pending


# 7. Sync-free: no data-dependent host read anywhere in the block loop. ----------------------------------
def test_static_block_loop_runs_under_fake_tensor_mode(tiny):
    """FakeTensorMode raises on .item()/.tolist()/bool masks/nonzero: the whole loop reads nothing."""
    backbone, model, pixels, thresholds = tiny
    for policy in (MergePolicy(thresholds=thresholds), MergePolicy(mode="fixed_r", r=5, min_tokens=30)):
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
            x = backbone.embed(model, pixels)
            state, counts = run_capacity_blocks(x, backbone.blocks(model), policy, num_prefix=1, static=True)
        assert counts.shape == (6, 4) and state.x.shape == (6 * 65, 48)


def test_merge_step_runs_under_fake_tensor_mode():
    with FakeTensorMode():
        state = CapacityState.start(torch.randn(3, 9, 4), num_prefix=1)
        after = merge_step(state, torch.randint(0, 4, (3, 5)), torch.rand(3, 5) < 0.5)
    assert after.x.shape == (27, 4) and after.lengths.shape == (3,)


# 8. The CUDA-only pieces' logic, on the CPU. --------------------------------------------------------------
def _fake_varlen(with_scale: bool):
    """A CPU stand-in for ``varlen_attn``: bias-free SDPA per segment of ``cu_seqlens`` (with the
    kernel's default scale ``dw ** -0.5`` when, as before torch 2.12, it takes no ``scale``)."""

    def attend(q, k, v, cu_q, cu_k, max_q, max_k, scale=None):
        out = torch.zeros_like(q)
        bounds = cu_q.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            segment = [t[start:end].transpose(0, 1) for t in (q, k, v)]
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(*segment, scale=scale).transpose(0, 1)
        return out

    if with_scale:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, num_splits=None):
            return attend(q, k, v, cu_q, cu_k, max_q, max_k, scale)

    else:

        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k):
            return attend(q, k, v, cu_q, cu_k, max_q, max_k)

    return varlen_attn


@pytest.mark.parametrize("with_scale", [True, False])
def test_varlen_call_with_widened_heads_equals_grid_reference(monkeypatch, with_scale):
    import torch.nn.attention.varlen as varlen_module

    from dymu_lightning.core import packed_attention
    from dymu_lightning.core.packed_attention import grid_attention, varlen_attention

    monkeypatch.setattr(varlen_module, "varlen_attn", _fake_varlen(with_scale))
    packed_attention._varlen_options.cache_clear()
    try:
        torch.manual_seed(0)
        lengths, spare, heads, head_dim = [5, 9, 2], 4, 2, 8
        state = CapacityState.from_rows(
            x=torch.zeros(16 + spare, 1),
            sizes=torch.cat([torch.randint(1, 5, (16,)).float(), torch.zeros(spare)]),
            image=torch.cat([torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)), torch.full((spare,), 3)]),
            position=torch.cat([torch.arange(n) for n in lengths] + [torch.arange(spare)]),
            lengths=torch.tensor(lengths),
            group=torch.zeros(3, 1, dtype=torch.long),
            max_len=11,  # an upper bound, as after a lagged shrink
        )
        q, k, v = (torch.randn(state.capacity, heads, head_dim, dtype=torch.float64) for _ in range(3))
        scale = head_dim**-0.5
        args = (state.sizes, state.slot, state.batch, state.max_len, scale)
        expected = grid_attention(q, k, v, *args)
        out = varlen_attention(q, k, v, state.sizes, state.cu_seqlens(), state.max_len, scale)
        assert (out[:16] - expected[:16]).abs().max() <= 1e-12
    finally:
        packed_attention._varlen_options.cache_clear()


def test_graph_cache_captures_once_per_policy_and_shape():
    from dymu_lightning.core.cuda_graph import GraphCache, can_capture, policy_key

    captured = []

    def capture(loop, example):
        captured.append(tuple(example.shape))
        return loop

    cache = GraphCache(capture=capture)
    loop = lambda x: (x, x.sum())  # noqa: E731
    a, b = MergePolicy(thresholds=[0.5, 0.7]), MergePolicy(thresholds=[0.5, 0.8])
    for policy, shape in [(a, (1, 5, 3)), (a, (1, 5, 3)), (b, (1, 5, 3)), (a, (2, 5, 3))]:
        cache.run(policy_key(policy, ("model",)), loop, torch.zeros(shape))
    assert captured == [(1, 5, 3), (1, 5, 3), (2, 5, 3)]
    assert not can_capture(a, torch.zeros(1, 5, 3))  # CPU: never


def test_merged_forward_names_an_unknown_path(tiny):
    backbone, model, pixels, thresholds = tiny
    with pytest.raises(ValueError, match=r"unknown engine path 'fast'; expected one of \('auto', 'dynamic'"):
        backbone.merged_forward(model, pixels[:1], MergePolicy(thresholds=thresholds), path="fast")


def test_a_reused_reader_forgets_the_previous_forward(tiny):
    """Counts still pending from another batch must not shrink this one's buffers."""
    backbone, model, pixels, thresholds = tiny
    policy = MergePolicy(thresholds=thresholds)
    reader = LaggedCounts()
    reader.request(torch.tensor([1, 1]))  # a stale (total 2, longest 1) that would cut every image
    with torch.no_grad():
        reused = _run(run_blocks, backbone, model, pixels, policy, counts_reader=reader)
        fresh = _run(run_blocks, backbone, model, pixels, policy)
    assert torch.equal(reused.tokens_per_layer, fresh.tokens_per_layer)
    assert torch.equal(reused.tokens, fresh.tokens)


# 9. Fewer kernels: the op-count proxy of a merging block, and the compiled merge. ----------------------
class _OpCounter(TorchDispatchMode):
    """Counts non-view aten ops: roughly the kernels an eager GPU forward launches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def _loop_ops(x, blocks, policy, widened=False) -> int:
    counter = _OpCounter()
    with torch.no_grad(), counter:
        run_capacity_blocks(x, blocks, policy, num_prefix=1, static=True, widened=widened)
    return counter.ops


#: Non-view ops of one merging block on the static path (CPU grid attention), the host's own block
#: included (HOST_BLOCK_OPS: 2 norms, 4 linears, GELU, attention, 2 residual adds). 71 before the
#: 2026-12-01 pass that cut DToMe's share from 61 to 43 ops, 53 before the merge's new rows became a
#: view of its one flattened cumsum (docs/benchmarks.md lists them), 52 before the grid's index rows
#: (positions, protected prefix, image offsets) were made once per forward. With widened heads folded
#: into the projections (the CPU grid reference of what varlen runs on a GPU): one more.
MERGING_BLOCK_OPS = {False: 49, True: 50}
HOST_BLOCK_OPS = 10


@pytest.mark.parametrize("widened", [False, True])
def test_merging_block_op_count_ceiling(tiny, widened):
    """A regression ceiling on the launch proxy: a merging block (not the first, which runs on the
    dense layout) costs at most MERGING_BLOCK_OPS non-view ops."""
    backbone, model, pixels, _ = tiny
    blocks = backbone.blocks(model)
    merging = MergePolicy(thresholds=[-1.0] * 3)  # every eligible edge merges at every layer
    never = MergePolicy(thresholds=[float("inf")] * 3)
    with torch.no_grad():
        x = backbone.embed(model, pixels)
    _loop_ops(x, blocks, merging, widened)  # folds the weights once: later forwards read them cached
    block = _loop_ops(x, blocks, merging, widened) - _loop_ops(x, blocks[:2], merging, widened)
    host = _loop_ops(x, blocks, never, widened) - _loop_ops(x, blocks[:2], never, widened)
    assert host == HOST_BLOCK_OPS
    ceiling = MERGING_BLOCK_OPS[widened]
    assert block <= ceiling, f"a merging block now costs {block} ops (ceiling {ceiling})"


@pytest.mark.slow
@pytest.mark.parametrize("path", ["dynamic", "static"])
def test_compiled_merge_equals_eager(tiny, path):
    """``compile_merge`` (Inductor on matching and the merge step) computes what eager does: counts,
    group maps and sizes identical, features within float64 rounding. Compiling takes about a minute
    on 2 CPU cores."""
    backbone, model, pixels, thresholds = tiny
    model, pixels = model.double(), pixels.double()
    policy = MergePolicy(thresholds=thresholds)
    try:
        with torch.no_grad():
            eager = _run(run_blocks, backbone, model, pixels, policy, path=path)
            compiled = _run(run_blocks, backbone, model, pixels, policy, path=path, compile_merge=True)
    finally:
        model.float()
    assert torch.equal(compiled.tokens_per_layer, eager.tokens_per_layer)
    assert torch.equal(compiled.group, eager.group)
    assert torch.equal(compiled.sizes, eager.sizes)
    assert (compiled.tokens - eager.tokens).abs().max() <= 1e-12


#: Compiled blocks against eager in float32: Inductor reorders and fuses the float arithmetic (norms,
#: GELU, the weighted merge's division), so features agree to float32 rounding, not bit for bit.
COMPILED_FP32_ATOL = 1e-5


@pytest.mark.slow
def test_compiled_blocks_equal_eager(tiny):
    """``compile_blocks`` (every block through Inductor, host layers included) merges as eager does:
    counts, group maps and sizes identical, features within COMPILED_FP32_ATOL, on both paths. The
    graphs serve every block (no recompilation per block). Compiling takes minutes on 2 busy CPU
    cores; the dynamic path reuses the static path's graphs (dynamic shapes)."""
    from torch._dynamo.utils import counters

    backbone, model, pixels, thresholds = tiny
    policy = MergePolicy(thresholds=thresholds)
    graphs_before = counters["stats"]["unique_graphs"]  # the counters are the session's: other tests compile too
    for path in ("static", "dynamic"):
        with torch.no_grad():
            eager = _run(run_blocks, backbone, model, pixels, policy, path=path)
            compiled = _run(run_blocks, backbone, model, pixels, policy, path=path, compile_blocks=True)
        assert torch.equal(compiled.tokens_per_layer, eager.tokens_per_layer)
        assert torch.equal(compiled.group, eager.group)
        assert torch.equal(compiled.sizes, eager.sizes)
        assert (compiled.tokens - eager.tokens).abs().max() <= COMPILED_FP32_ATOL
    # attention dense / merging, merge (twice: the first merge's sizes are strided), MLP: never per block
    assert counters["stats"]["unique_graphs"] - graphs_before <= 6


def test_compiled_steps_fall_back_to_eager_with_a_warning(monkeypatch, tiny):
    """Where torch.compile cannot run (here: said so), ``compile_blocks`` warns once per step and
    computes exactly what eager does."""
    from dymu_lightning.core import encoder

    backbone, model, pixels, thresholds = tiny
    policy = MergePolicy(thresholds=thresholds)
    monkeypatch.setattr(encoder, "compile_unavailable", lambda: "no compiler on this test's machine")
    encoder.compiled_block_steps.cache_clear()
    try:
        warning = "torch.compile is unavailable for merge_step, running it eagerly: no"
        with pytest.warns(UserWarning, match=warning), torch.no_grad():
            compiled = _run(run_blocks, backbone, model, pixels, policy, compile_blocks=True)
    finally:
        encoder.compiled_block_steps.cache_clear()
    with torch.no_grad():
        eager = _run(run_blocks, backbone, model, pixels, policy)
    assert torch.equal(compiled.tokens, eager.tokens) and torch.equal(compiled.group, eager.group)


def test_a_failing_compiler_falls_back_but_a_real_error_propagates():
    from dymu_lightning.core.encoder import CompiledOrEager

    def double(x):
        return 2 * x

    step = CompiledOrEager(double)

    def broken_compiler(*args):
        raise RuntimeError("InductorError: no C++ compiler\nmore lines")

    step.compiled = broken_compiler
    with pytest.warns(UserWarning, match=r"running it eagerly: RuntimeError: InductorError: no C\+\+ compiler$"):
        assert step(torch.ones(2)).tolist() == [2.0, 2.0]
    assert step.compiled is None  # from now on eager, without trying again
    step.compiled = broken_compiler
    with pytest.raises(TypeError):  # eager fails as well: the caller's error, not the compiler's
        step("not a tensor", "too many")
