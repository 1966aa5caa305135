"""Shared fixtures: every registered backbone, built tiny and random, and test images."""

from __future__ import annotations

import os

# Tests never reach a model hub: fail fast instead of waiting on a network that is not there.
# (Set before transformers or huggingface_hub is imported: both read it at import time.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

from dymu_lightning.backbones import get_backbone, list_backbones
from dymu_lightning.backbones.thresholds import batch_thresholds

# Property tests (tests/test_properties_*.py). "ci", the default, is reproducible: the same examples on
# every run and machine, no per-example deadline (a shared 2-core runner is slow in bursts). "thorough"
# draws 20 times as many fresh random examples; select it with HYPOTHESIS_PROFILE=thorough or pytest's
# --hypothesis-profile=thorough (docs/development.md). Neither writes an example database into the
# checkout: a failure prints the example and a @reproduce_failure blob instead.
settings.register_profile("ci", derandomize=True, database=None, max_examples=25, deadline=None, print_blob=True)
settings.register_profile("thorough", database=None, max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tiny_cases() -> list:
    """One pytest param per (registered backbone, tiny architecture): tests that take the
    ``tiny`` fixture run for every adapter the registry holds, third-party ones included."""
    cases = []
    for name in list_backbones():
        for tiny in get_backbone(name).tiny_configs():
            cases.append(pytest.param((name, tiny.name), id=f"{name}-{tiny.name}"))
    return cases


class Tiny:
    """A tiny random model of one backbone, with helpers to make inputs and thresholds."""

    def __init__(self, name: str, config_name: str, dtype: torch.dtype) -> None:
        self.backbone = get_backbone(name)
        config = {t.name: t.config for t in self.backbone.tiny_configs()}[config_name]
        torch.manual_seed(0)
        self.model = self.backbone.build(config).to(dtype)
        self.dtype = dtype
        self.num_layers = self.backbone.num_layers(self.model)
        self.image_size = int(getattr(getattr(self.model, "config", None), "image_size", 0) or config.get("img_size"))

    def images(self, count: int, seed: int = 0) -> torch.Tensor:
        """``[count, 3, S, S]``: alternately smooth (few distinct regions, many similar tokens) and
        noisy images, so that their token counts differ under one set of thresholds."""
        generator = torch.Generator().manual_seed(seed)
        size = self.image_size
        out = []
        for index in range(count):
            if index % 2 == 0:
                coarse = torch.randn(1, 3, 2, 2, generator=generator)
                out.append(F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0])
            else:
                out.append(torch.randn(3, size, size, generator=generator))
        return torch.stack(out).to(self.dtype)

    def thresholds(self, pixels: torch.Tensor, r: int = 6) -> list[float]:
        """Thresholds found on ``pixels`` by the batch top-k rule, nudged up by 1e-6: a batch
        threshold *is* an edge's score, and a tie at the threshold would let rounding decide."""
        return [t + 1e-6 for t in batch_thresholds(self.backbone, self.model, pixels, r)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module (the property tests opt in): tiny tensors gain nothing from
    threads, and on a loaded 2-core machine two spinning OpenMP threads per process made the property
    tests' forwards about 7x slower in wall-clock time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=tiny_cases())
def tiny(request) -> Tiny:
    name, config_name = request.param
    return Tiny(name, config_name, torch.float32)


@pytest.fixture(params=tiny_cases())
def tiny64(request) -> Tiny:
    """The same models in float64, where comparisons can be exact enough that no threshold
    decision flips on rounding."""
    name, config_name = request.param
    return Tiny(name, config_name, torch.float64)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """10 images in deliberately uneven shards (3, 3, 3, 1), for the calibration runs."""
    from tests_support import uneven_shards

    return uneven_shards(tmp_path_factory.mktemp("calib"))
