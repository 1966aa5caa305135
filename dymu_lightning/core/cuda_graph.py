"""The static path's block loop captured as one CUDA graph, replayed per batch.

Small batches are bound by kernel launches: a DToMe forward launches several times the stock
encoder's kernels. On the static path every shape is fixed and nothing reads the device from the
host (tests/test_engine.py runs it under FakeTensorMode), so the whole block loop can be captured
once per (model, policy, batch shape, dtype) and replayed with one launch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import fields, replace

import torch
from torch import Tensor

from dymu_lightning.core.capacity import CapacityState
from dymu_lightning.core.policy import MergePolicy

# (x [B, N, C]) -> (final state, counts [B, num_blocks + 1]): the static block loop.
StaticLoop = Callable[[Tensor], tuple[CapacityState, Tensor]]


def can_capture(policy: MergePolicy, x: Tensor) -> bool:
    """Whether a forward may replay a graph: CUDA, no autograd, and a policy with no host callbacks
    (calibration's ``on_layer``/``batch_cut`` run Python per layer and gather across processes)."""
    return (
        x.device.type == "cuda"
        and not (torch.is_grad_enabled() and x.requires_grad)
        and policy.on_layer is None
        and policy.batch_cut is None
    )


class GraphedLoop:
    """One captured static block loop: fixed input buffer, fixed output buffers.

    Args:
        loop: the static block loop to capture.
        example: ``[B, N, C]`` input of the shape, dtype and device to capture for.
        warmup: eager runs on a side stream before capture (kernel selection, allocator, cuDNN
            plans happen there, not inside the graph).
    """

    def __init__(self, loop: StaticLoop, example: Tensor, warmup: int = 2) -> None:
        self.input = example.detach().clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                loop(self.input)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.state, self.counts = loop(self.input)

    def __call__(self, x: Tensor) -> tuple[CapacityState, Tensor]:
        """Replay on ``x``; returns copies (the next replay overwrites the graph's buffers)."""
        self.input.copy_(x)
        self.graph.replay()
        return copy_state(self.state), self.counts.clone()


def copy_state(state: CapacityState) -> CapacityState:
    """A :class:`CapacityState` whose tensors are fresh copies."""
    tensors = {
        f.name: getattr(state, f.name).clone() for f in fields(state) if isinstance(getattr(state, f.name), Tensor)
    }
    return replace(state, **tensors)


class GraphCache:
    """Captured loops keyed by whatever fixes a graph: the caller's key (model, policy, blocks run)
    plus the input's shape, dtype and device. Capture happens on the first call with a new key.

    ``capture`` is injectable so the keying is testable without a GPU.
    """

    def __init__(self, capture: Callable[[StaticLoop, Tensor], Callable] = GraphedLoop) -> None:
        self.capture = capture
        self.graphs: dict[Hashable, Callable[[Tensor], tuple[CapacityState, Tensor]]] = {}

    def run(self, key: Hashable, loop: StaticLoop, x: Tensor) -> tuple[CapacityState, Tensor]:
        # Buffers made in inference mode cannot be written outside it: one graph per mode.
        full_key = (key, tuple(x.shape), x.dtype, x.device, torch.is_inference_mode_enabled())
        if full_key not in self.graphs:
            try:
                self.graphs[full_key] = self.capture(loop, x)
            except RuntimeError as error:  # e.g. a kernel this torch cannot capture: stay correct, eager
                warnings.warn(f"CUDA graph capture failed, the static path runs eagerly: {error}", stacklevel=2)
                self.graphs[full_key] = loop
        return self.graphs[full_key](x)


def policy_key(policy: MergePolicy, extra: Sequence[Hashable] = ()) -> Hashable:
    """A hashable summary of everything in ``policy`` a captured graph bakes in."""
    thresholds = None if policy.thresholds is None else tuple(policy.thresholds)
    r = policy.r if isinstance(policy.r, int) or policy.r is None else tuple(policy.r)
    return (policy.mode, thresholds, r, policy.max_merges, policy.min_tokens, *extra)
