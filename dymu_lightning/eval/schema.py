"""The JSON files of the evaluation, as dataclasses that their writers and their readers share.

- :class:`EvalMetrics`: ``metrics.json`` of an ``eval_encoder`` run (written by :mod:`~dymu_lightning.eval.run`);
- :class:`NextTokenMetrics`: ``metrics.json`` of the small LLaVA's next-token study
  (:mod:`~dymu_lightning.eval.next_token`);
- :class:`ResultsRecord`: ``results.json``, the work folder's record of the results command
  (:mod:`~dymu_lightning.eval.studies`), which :mod:`~dymu_lightning.eval.page` renders from.

``to_json`` gives the plain object that is written (keys in field order; an optional field, one whose
default is None, is left out while None) and ``from_json`` reads it back, so a file written today
round-trips exactly. Reading ignores keys the dataclass does not declare, as a renderer of older or
newer files should; a missing key without a default is an error naming the class.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

from dymu_lightning.files import write_text_atomic

T = TypeVar("T", bound="JsonRecord")
RECORD = "results.json"  # the results command's record, in its work folder (:class:`ResultsRecord`)


class JsonRecord:
    """Mixin of the dataclasses below: conversion to and from their JSON objects, and files."""

    def to_json(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_json(cls: type[T], data: dict[str, Any]) -> T:
        return _decode(cls, data)

    def save(self, path: Path) -> Path:
        """Write ``path`` as the evaluation always has: two-space indents and a final newline."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls: type[T], path: Path) -> T:
        return cls.from_json(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------------------------------
# metrics.json of eval_encoder
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TokenSummary(JsonRecord):
    """Tokens per image at the encoder output, CLS included (:func:`metrics.token_summary`)."""

    mean: float
    std: float  # the population one (divides by n)
    min: int
    max: int
    images: int
    full: int  # tokens of the unmerged encoder


@dataclasses.dataclass
class Cosine(JsonRecord):
    """Per-image cosine of a variant's pooled feature with the full model's, over the images."""

    mean: float
    min: float


@dataclasses.dataclass
class PairedDifference(JsonRecord):
    """Accuracy of A minus B on the same images, with a 95% interval (:func:`metrics.paired_difference`)."""

    difference: float
    low: float
    high: float
    only_a: int  # images only A gets right
    only_b: int
    images: int


@dataclasses.dataclass
class ProbeScores(JsonRecord):
    """One variant's probe accuracies, and its paired differences with the full model and with ToMe
    at its count (keyed ``knn`` / ``linear``)."""

    knn: float
    linear: float
    vs_full: dict[str, PairedDifference] | None = None
    vs_tome: dict[str, PairedDifference] | None = None


@dataclasses.dataclass
class VariantMetrics(JsonRecord):
    """One variant of an evaluation: ``full``, a DyMU thresholds file, or ``tome@NAME``."""

    kind: str  # "full", "dymu" or "tome"
    tokens: TokenSummary
    images_per_second: float
    cosine_cls: Cosine | None = None  # backbones with a CLS token
    cosine_mean: Cosine | None = None
    thresholds: str | None = None  # DyMU: the thresholds file
    r: list[int] | None = None  # ToMe: merges per layer
    expected_tokens: int | None = None  # ToMe: the count r gives every image
    probe: ProbeScores | None = None
    spearman_tokens_complexity: float | None = None  # variants whose count varies
    spearman_interval: tuple[float, float] | None = None
    spearman_scenes: float | None = None  # with a scene_pattern: each scene counted once
    spearman_scenes_interval: tuple[float, float] | None = None


@dataclasses.dataclass
class ProbeSetup(JsonRecord):
    """How the probes were fitted: on the full model's features of the training shards."""

    train_images: int
    test_images: int
    classes: int
    feature: str  # "cls" or "mean"
    k: int
    linear_weight_decay: float | None = None  # chosen by cross-validation
    linear_cross_validation: dict[str, float] | None = None  # decay (as written by str()) -> fold accuracy
    train_shards: str | None = None


@dataclasses.dataclass
class Scenes(JsonRecord):
    """The evaluated images grouped into scenes by ``scene_pattern``."""

    count: int
    largest: dict[str, int]  # the four largest scenes -> their images
    within: dict[str, dict[str, float]]  # variant -> scene -> Spearman(tokens, complexity) inside it


@dataclasses.dataclass
class EvalMetrics(JsonRecord):
    """``metrics.json`` of an ``eval_encoder`` run."""

    backbone: str
    source: str  # the weights, or "random"
    image_size: int
    full_tokens: int
    images: int
    shards: str
    recipe: str
    overrides: list[str]
    variants: dict[str, VariantMetrics]
    probe: ProbeSetup | None = None
    scenes: Scenes | None = None


# --------------------------------------------------------------------------------------------------
# metrics.json of the next-token study
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NextTokenVariant(JsonRecord):
    """One variant's next-token fidelity over the images."""

    kl_mean: float  # KL(p_full || p_variant), nats
    kl_std: float
    kl_median: float
    top1_agreement: float  # share of images whose most likely token is the full model's
    visual_rows_mean: float


@dataclasses.dataclass
class NextTokenMetrics(JsonRecord):
    """``metrics.json`` of :func:`dymu_lightning.eval.next_token.study`.

    ``per_image`` is ``{"names": [file names], VARIANT: {"kl" | "top1" | "visual_rows": [per image]}}``."""

    images: int
    image_source: str
    prompt: str
    thresholds: dict[str, str]
    tome_r: dict[str, list[int]]
    variants: dict[str, NextTokenVariant]
    per_image: dict[str, Any]
    seconds: float
    # The projector's alignment command and seed (dymu_alignment.json); None: untrained (older files too).
    projector: str | None = None


# --------------------------------------------------------------------------------------------------
# results.json: the record of the results command
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecordedStep(JsonRecord):
    """One recipe run of the results command."""

    study: str
    recipe: str
    overrides: list[str]
    output: str  # relative to the work folder
    command: str  # as the page shows it (the cache folder as $DYMU_CACHE)


@dataclasses.dataclass
class RecordedNextToken(JsonRecord):
    """The next-token study's command and its metrics.json (relative to the work folder)."""

    command: str
    output: str


@dataclasses.dataclass
class RecordedInvocation(JsonRecord):
    """One run of the results command: what it ran, where, and for how long."""

    command: str
    seconds: float
    machine: str
    studies: list[str]
    steps: list[RecordedStep]
    next_token: RecordedNextToken | None  # written as null when the study did not run


@dataclasses.dataclass
class ResultsRecord(JsonRecord):
    """``results.json``: every invocation that still owns a study, oldest first."""

    invocations: list[RecordedInvocation]


# --------------------------------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.default is None:
                continue
            out[f.name] = _encode(item)
        return out
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    return value


def _decode(kind: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as ``kind``, a type hint of the dataclasses above. Plain values pass
    through unchanged (an int stays an int where a float is declared), so writing them back gives
    the same text."""
    if value is None:
        return None
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in arguments if a is not type(None)]
        return _decode(inner, value)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        found = {}
        for f in dataclasses.fields(kind):
            if f.name in value:
                found[f.name] = _decode(hints[f.name], value[f.name])
            elif f.default is dataclasses.MISSING:
                raise ValueError(f"{kind.__name__}: no {f.name!r} in {sorted(value)}")
        return kind(**found)
    if origin is dict:
        return {key: _decode(arguments[1], item) for key, item in value.items()}
    if origin is list:
        return [_decode(arguments[0], item) for item in value]
    if origin is tuple:
        return tuple(_decode(arguments[0], item) for item in value)
    return value
