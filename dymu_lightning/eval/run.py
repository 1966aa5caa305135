"""The ``eval_encoder`` task: one encoder, the full model and its DyMU and ToMe variants, over shards.

For every image of ``data.shards`` and every variant it records the tokens left at the encoder
output and the pooled features; from those it reports token statistics, the cosine of each variant's
features with the full model's, the accuracy of probes fitted on the full model's features of
``probe.train_shards`` (the LLaVA setting: the head downstream was trained on unmerged features),
and Spearman's correlation between token count and JPEG bytes per pixel.

Variants:

- ``full``: merging off (the stock encoder's output);
- each entry of ``variants``: DyMU thresholds from a thresholds.json;
- ``tome@NAME`` for each of them (``tome: true``): fixed r per layer, chosen so that every image keeps
  the mean token count DyMU ``NAME`` reached on these images (:func:`matched_fixed_r`).

Single process: the work is a few forward passes per image, and the outputs are per image.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from dymu_lightning.backbones import Backbone, get_backbone
from dymu_lightning.backbones.registry import import_plugins
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.config.recipes import ConfigError, Recipe
from dymu_lightning.config.schema import EvalEncoderRecipe
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.schedule import fixed_r_lengths, matched_fixed_r
from dymu_lightning.data import GlobalBatchShards, read_index
from dymu_lightning.data.source import labels_from_keys, prepare_shards
from dymu_lightning.eval import metrics, schema
from dymu_lightning.loading import DTYPES, check_model_and_data, check_pattern, load_encoder
from dymu_lightning.plots import draw_token_histogram, pyplot

log = logging.getLogger(__name__)

FEATURES = ("cls", "mean")


@dataclass
class Encoded:
    """What one variant produced on a set of images (rows in global sample order).

    Attributes:
        lengths: ``[n]`` long, tokens per image at the output.
        features: ``{"cls" | "mean": [n, C]}`` float32 (see :func:`metrics.pooled_features`).
        index: ``[n]`` long, global sample index of each row.
        seconds: wall time of the pass.
    """

    lengths: Tensor
    features: dict[str, Tensor]
    index: Tensor
    seconds: float


@dataclass(frozen=True)
class Images:
    """The images one pass reads: the dataset (keys, decoded images) and how many loader workers."""

    dataset: GlobalBatchShards
    num_workers: int

    @property
    def shards(self) -> Path:
        return self.dataset.index.root

    def batches(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers)


def check(recipe: Recipe) -> EvalEncoderRecipe:
    """Validate an ``eval_encoder`` recipe beyond its types, without loading a model."""
    cfg: EvalEncoderRecipe = recipe.to_object()
    import_plugins(cfg.plugins, f"{recipe.path}: plugins")
    get_backbone(cfg.model.backbone)
    if cfg.scene_pattern is not None:
        check_pattern(recipe.path, "scene_pattern", cfg.scene_pattern)
    _check_device(recipe, cfg.device)
    if cfg.probe.feature not in FEATURES:
        raise ConfigError(f"{recipe.path}: probe.feature={cfg.probe.feature!r}; expected one of {FEATURES}")
    check_model_and_data(
        recipe.path, cfg.model, cfg.data, [("probe.max_images", cfg.probe.max_images, 1), ("probe.k", cfg.probe.k, 1)]
    )
    if cfg.data.crops != "whole" or cfg.data.processor is not None:
        # the evaluated images go through the backbone's preprocessing whole; crops are a calibration input
        raise ConfigError(
            f"{recipe.path}: data.crops and data.processor are calibration settings; eval_encoder feeds whole images"
        )
    check_pattern(recipe.path, "probe.label_pattern", cfg.probe.label_pattern)
    for name, path in cfg.variants.items():
        if name == "full" or name.startswith("tome@"):
            raise ConfigError(f"{recipe.path}: variants.{name}: 'full' and 'tome@...' are reserved names")
        if not Path(path).expanduser().is_file():
            raise ConfigError(f"{recipe.path}: variants.{name}: no thresholds file at {path}")
    return cfg


def _check_device(recipe: Recipe, device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"{recipe.path}: device={device!r}; expected cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{recipe.path}: device={device!r}, but torch sees no CUDA device here")


def evaluate(recipe: Recipe) -> Path:
    """Run the recipe; returns the path of ``metrics.json`` in ``out_dir``."""
    cfg = check(recipe)
    torch.manual_seed(cfg.seed)  # a random_init model is then the one calibration built with this seed
    backbone, model, transform = load_encoder(cfg.model)
    device = torch.device(cfg.device)
    model = model.to(device)
    dtype = DTYPES[cfg.model.dtype]
    probe_pixels = transform(Image.new("RGB", (64, 64)))[None].to(device, dtype)
    image_size = int(probe_pixels.shape[-1])
    with torch.no_grad():
        full_tokens = backbone.embed(model, probe_pixels).shape[1]
    num_prefix = backbone.num_prefix_tokens(model)
    num_layers = backbone.num_layers(model)

    dymu = {name: _load_thresholds(path, name, backbone, model, image_size, cfg) for name, path in cfg.variants.items()}
    data = _shards(cfg.data.shards, cfg.data.images, cfg, transform, cfg.data.max_images)

    runs = {"full": encode(backbone, model, data, MergePolicy.off(), cfg.model.num_blocks, dtype, "full")}
    schedules: dict[str, list[int]] = {}
    for name, thresholds in dymu.items():
        runs[name] = encode(backbone, model, data, thresholds.policy(), cfg.model.num_blocks, dtype, name)
    if cfg.tome:
        for name in dymu:
            target = float(runs[name].lengths.double().mean())
            r = matched_fixed_r(num_layers, full_tokens, target, num_prefix, cfg.model.num_blocks)
            schedules[f"tome@{name}"] = r
            policy = MergePolicy(mode="fixed_r", r=r)
            runs[f"tome@{name}"] = encode(backbone, model, data, policy, cfg.model.num_blocks, dtype, f"tome@{name}")

    source = cfg.model.source or getattr(backbone, "default_source", "")
    result = schema.EvalMetrics(
        backbone=backbone.name,
        source="random" if cfg.model.random_init else str(source),
        image_size=image_size,
        full_tokens=full_tokens,
        images=int(runs["full"].lengths.numel()),
        shards=str(Path(cfg.data.shards).expanduser()),
        recipe=str(recipe.path),
        overrides=list(recipe.overrides),
        variants={},
    )
    histograms: dict[str, Tensor] = {}
    for name, run in runs.items():
        summary, histograms[name] = metrics.token_summary(run.lengths, full_tokens)
        cosine = {}
        for feature, values in run.features.items():
            per_image = metrics.per_image_cosine(values, runs["full"].features[feature])
            cosine[feature] = schema.Cosine(mean=float(per_image.mean()), min=float(per_image.min()))
        result.variants[name] = schema.VariantMetrics(
            kind="full" if name == "full" else "tome" if name.startswith("tome@") else "dymu",
            tokens=schema.TokenSummary(**summary),
            images_per_second=run.lengths.numel() / max(run.seconds, 1e-9),
            cosine_cls=cosine.get("cls"),
            cosine_mean=cosine.get("mean"),
            thresholds=str(Path(cfg.variants[name]).expanduser()) if name in dymu else None,
            r=schedules.get(name),
            expected_tokens=_final_count(schedules.get(name), full_tokens, num_prefix),
        )

    keys = [data.dataset.key(int(i)) for i in runs["full"].index]
    columns: dict[str, list[Any]] = {}  # extra per-image columns of per_image.csv
    if cfg.probe.train_shards is not None:
        result.probe = _probe(cfg, backbone, model, transform, dtype, runs, keys, result.variants, columns)
    complexity = None
    if cfg.complexity:
        complexity = torch.tensor(
            [metrics.jpeg_bytes_per_pixel(data.dataset.image(int(i)), image_size) for i in runs["full"].index]
        )
        scenes = None if cfg.scene_pattern is None else [metrics.scene_of(k, cfg.scene_pattern) for k in keys]
        if scenes is not None:
            largest = dict(Counter(scenes).most_common(4))
            result.scenes = schema.Scenes(count=len(set(scenes)), largest=largest, within={})
            columns["scene"] = scenes
        for name, run in runs.items():
            if run.lengths.unique().numel() > 1:  # a constant count (full, ToMe) has no rank correlation
                _complexity_correlation(result.variants[name], run.lengths, complexity, scenes)
                if scenes is not None:
                    result.scenes.within[name] = _within_scenes(run.lengths, complexity, scenes, largest)

    out_dir = Path(cfg.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_per_image(out_dir / "per_image.csv", keys, runs, complexity, columns)
    write_plots(out_dir, result, histograms, runs, complexity)
    path = result.save(out_dir / "metrics.json")
    _print_summary(result, path)
    return path


def _final_count(r: list[int] | None, full_tokens: int, num_prefix: int) -> int | None:
    """The tokens every image keeps under ToMe's ``r`` per layer (None: not a ToMe variant)."""
    return None if r is None else fixed_r_lengths(r, full_tokens, num_prefix)[-1]


def encode(
    backbone: Backbone,
    model: torch.nn.Module,
    data: Images,
    policy: MergePolicy,
    num_blocks: int | None,
    dtype: torch.dtype,
    label: str = "",
) -> Encoded:
    """Run one variant over every image of ``data`` on the model's device; the outputs are on the CPU.
    Prints one progress line when ``label`` is given."""
    device = next(model.parameters()).device
    lengths, index, features = [], [], {name: [] for name in FEATURES}
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in data.batches():
            valid = batch["valid"].bool()
            if not valid.any():
                continue
            pixels = batch["pixels"][valid].to(device, dtype)
            out = backbone.merged_forward(model, pixels, policy, num_blocks=num_blocks)
            lengths.append(out.lengths.cpu())
            index.append(batch["index"][valid])
            for name, value in metrics.pooled_features(out.tokens, out.sizes, out.num_prefix).items():
                features[name].append(value.cpu())
    seconds = time.perf_counter() - start
    if not lengths:
        raise ValueError(f"no decodable image in the shards at {data.shards}")
    if label:
        print(f"  {label}: {sum(len(x) for x in lengths)} images in {seconds:.1f} s", flush=True)
    # Rows in global sample order whatever the loader's interleaving, so variants align row by row.
    order = torch.cat(index).argsort()
    return Encoded(
        lengths=torch.cat(lengths)[order],
        features={name: torch.cat(values)[order] for name, values in features.items() if values},
        index=torch.cat(index)[order],
        seconds=seconds,
    )


def _complexity_correlation(
    entry: schema.VariantMetrics, lengths: Tensor, complexity: Tensor, scenes: list[str] | None
) -> None:
    """Into ``entry``: Spearman(tokens, complexity) over images with its bootstrap interval and, given
    each image's scene, over scene means, so that a series of frames of one view counts once, like one photo."""
    entry.spearman_tokens_complexity = metrics.spearman(lengths, complexity)
    entry.spearman_interval = metrics.spearman_interval(lengths, complexity)
    if scenes is not None and len(set(scenes)) > 2:
        scene_lengths, scene_complexity = metrics.group_means(lengths, scenes), metrics.group_means(complexity, scenes)
        entry.spearman_scenes = metrics.spearman(scene_lengths, scene_complexity)
        # resampling scenes, not images: the scenes are the independent units here
        entry.spearman_scenes_interval = metrics.spearman_interval(scene_lengths, scene_complexity)


def _within_scenes(lengths: Tensor, complexity: Tensor, scenes: list[str], names: dict[str, int]) -> dict[str, float]:
    """Spearman(tokens, complexity) among the images of each named scene of three images or more."""
    out = {}
    for name, count in names.items():
        if count >= 3:
            rows = torch.tensor([i for i, scene in enumerate(scenes) if scene == name])
            if lengths[rows].unique().numel() > 1:
                out[name] = metrics.spearman(lengths[rows], complexity[rows])
    return out


def _probe(
    cfg: EvalEncoderRecipe,
    backbone: Backbone,
    model: torch.nn.Module,
    transform: Any,
    dtype: torch.dtype,
    runs: dict[str, Encoded],
    test_keys: list[str],
    variants: dict[str, schema.VariantMetrics],
    columns: dict[str, list[Any]],
) -> schema.ProbeSetup:
    """Fit a kNN and a linear probe on the full model's features of the training shards; score every
    variant's features of the evaluated images with them.

    Into ``variants[name].probe``: each accuracy, and its paired difference (95% interval) with the
    full model and, for a DyMU variant, with ToMe at its count. Into ``columns``: each image's label
    and every prediction. The linear probe's weight decay is chosen by cross-validation on the
    training features (:func:`metrics.choose_weight_decay`)."""
    train_data = _shards(cfg.probe.train_shards, cfg.probe.train_images, cfg, transform, cfg.probe.max_images)
    train = encode(backbone, model, train_data, MergePolicy.off(), cfg.model.num_blocks, dtype, "probe training set")
    feature = cfg.probe.feature
    if feature not in train.features:
        raise ValueError(f"probe.feature={feature!r}: backbone '{backbone.name}' has no CLS token; use mean")
    train_keys = [train_data.dataset.key(int(i)) for i in train.index]
    train_labels = labels_from_keys(train_keys, cfg.probe.label_pattern, f"probe.train_shards {train_data.shards}")
    test_labels = labels_from_keys(test_keys, cfg.probe.label_pattern, f"data.shards {cfg.data.shards}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight_decay, fold_accuracy = metrics.choose_weight_decay(train.features[feature], train_labels, num_classes)
    linear = metrics.fit_linear_probe(train.features[feature], train_labels, num_classes, weight_decay)
    columns["label"] = test_labels.tolist()
    correct: dict[str, dict[str, Tensor]] = {}
    for name, run in runs.items():
        test = run.features[feature]
        predicted = {
            "knn": metrics.knn_predict(train.features[feature], train_labels, test, num_classes, cfg.probe.k),
            "linear": linear(test),
        }
        correct[name] = {}
        for probe, labels in predicted.items():
            columns[f"{probe}:{name}"] = labels.tolist()
            correct[name][probe] = labels == test_labels
        variants[name].probe = schema.ProbeScores(
            knn=metrics.accuracy(predicted["knn"], test_labels, num_classes),
            linear=metrics.accuracy(predicted["linear"], test_labels, num_classes),
        )

    def differences(name: str, other: str) -> dict[str, schema.PairedDifference]:
        return {
            p: schema.PairedDifference(**metrics.paired_difference(correct[name][p], correct[other][p]))
            for p in correct[name]
        }

    for name in runs:
        scores = variants[name].probe
        if name != "full":
            scores.vs_full = differences(name, "full")
        if f"tome@{name}" in runs:
            scores.vs_tome = differences(name, f"tome@{name}")
    return schema.ProbeSetup(
        train_images=int(train.lengths.numel()),
        test_images=int(test_labels.numel()),
        classes=num_classes,
        feature=feature,
        k=cfg.probe.k,
        linear_weight_decay=weight_decay,
        linear_cross_validation={str(decay): accuracy for decay, accuracy in fold_accuracy.items()},
        train_shards=str(train_data.shards),
    )


def _shards(shards: str, images: str | None, cfg: EvalEncoderRecipe, transform: Any, max_images: int | None) -> Images:
    """A single-process view of a shard folder (written from ``images`` on first use)."""
    folder = prepare_shards(shards, images, cfg.data.shard_size)
    dataset = GlobalBatchShards(
        read_index(folder),
        global_batch_size=cfg.data.global_batch_size,
        transform=transform,
        strict=cfg.data.strict,
        max_samples=max_images,
    )
    return Images(dataset, cfg.data.num_workers)


def _load_thresholds(
    path: str, name: str, backbone: Backbone, model: torch.nn.Module, image_size: int, cfg: EvalEncoderRecipe
) -> ThresholdsFile:
    thresholds = ThresholdsFile.load(Path(path).expanduser())
    try:
        thresholds.check_fits(backbone, model, image_size, cfg.model.num_blocks)
    except ValueError as error:
        raise ValueError(f"variants.{name} ({path}): {str(error).removeprefix(thresholds.origin + ': ')}") from None
    return thresholds


def _write_per_image(
    path: Path, keys: list[str], runs: dict[str, Encoded], complexity: Tensor | None, columns: dict[str, list[Any]]
) -> None:
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["key", "jpeg_bytes_per_pixel", *(f"tokens:{name}" for name in runs), *columns])
        for row, key in enumerate(keys):
            bpp = "" if complexity is None else f"{float(complexity[row]):.5f}"
            extra = [values[row] for values in columns.values()]
            writer.writerow([key, bpp, *(int(run.lengths[row]) for run in runs.values()), *extra])


def write_plots(
    out_dir: Path,
    result: schema.EvalMetrics,
    histograms: dict[str, Tensor],
    runs: dict[str, Encoded],
    complexity: Tensor | None,
) -> list[Path]:
    """``tokens.png`` (a token histogram per DyMU variant) and ``complexity.png`` (tokens against JPEG
    bytes per pixel, one colour per DyMU variant); returns the paths written."""
    plt = pyplot()
    written = []
    # Full and ToMe keep one count for every image: a single bar each, which the tables already say.
    dymu = [name for name in runs if result.variants[name].kind == "dymu"]
    if dymu:
        figure, axes = plt.subplots(len(dymu), 1, figsize=(6, 0.6 + 1.6 * len(dymu)), sharex=True, squeeze=False)
        for axis, name in zip(axes[:, 0], dymu, strict=True):
            draw_token_histogram(axis, histograms[name])
            tokens = result.variants[name].tokens
            axis.set_title(f"DyMU {name}: {tokens.mean:.1f} ± {tokens.std:.1f} tokens", fontsize=9)
            axis.set_xlim(0, result.full_tokens + 1)
            axis.set_xlabel("")
        axes[-1, 0].set_xlabel(f"tokens per image at the encoder output (of {result.full_tokens})")
        figure.tight_layout()
        written.append(out_dir / "tokens.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    if complexity is not None and dymu:
        figure, axis = plt.subplots(figsize=(6, 4))
        for name in dymu:
            rho = result.variants[name].spearman_tokens_complexity
            label = f"{name} (Spearman {rho:.2f})" if rho is not None else name
            axis.scatter(complexity.tolist(), runs[name].lengths.tolist(), s=10, label=label)
        axis.set_xlabel("JPEG bytes per pixel of the encoder's view (quality 75)")
        axis.set_ylabel("tokens per image at the encoder output")
        axis.set_title(f"{result.backbone}: {result.images} images at {result.image_size} px", fontsize=9)
        axis.legend(fontsize=8)
        figure.tight_layout()
        written.append(out_dir / "complexity.png")
        figure.savefig(written[-1], dpi=100)
        plt.close(figure)
    return written


def _print_summary(result: schema.EvalMetrics, path: Path) -> None:
    print(f"evaluated {result.backbone} on {result.images} images at {result.image_size} px")
    for name, entry in result.variants.items():
        tokens = entry.tokens
        line = f"  {name:<14} tokens {tokens.mean:6.1f} ± {tokens.std:5.1f}"
        line += f"  cos {(entry.cosine_cls or entry.cosine_mean).mean:.4f}"
        if entry.probe is not None:
            line += f"  kNN {entry.probe.knn:.3f}  linear {entry.probe.linear:.3f}"
        if entry.spearman_tokens_complexity is not None:
            line += f"  Spearman {entry.spearman_tokens_complexity:.3f}"
        print(line)
    print(f"wrote {path}")
