"""``python -m dymu_lightning results``: run the studies, record them, and render docs/results.md.

Three studies, each of calibrations (DyMU low / mid / high) followed by evaluation:

- **probe**: Fashion-MNIST (real, labelled), at each side of ``Setting.probe_sizes``. Thresholds are
  calibrated on the first training images (labels unused), probes are fitted on the full model's
  features of the training images, and every variant is scored on the test images.
- **photos**: natural photos. Thresholds are calibrated on the scikit-image photos and evaluated on
  the mvtb-data photos (held out), for token counts, fidelity and the complexity correlation; the
  correlation is also reported on the calibration photos themselves (in-sample).
- **next_token**: the small LLaVA's next-token fidelity (:mod:`dymu_lightning.eval.next_token`).

Every step is an ordinary recipe run (``calibrate`` or ``eval_encoder`` with overrides); the page lists
them as command lines, so any number on it can be reproduced on its own. The work folder's record
(``results.json``, :class:`~dymu_lightning.eval.schema.ResultsRecord`) keeps every invocation of the
command with the machine it ran on; an invocation that runs some of the studies (``--studies probe
--accelerator cuda`` on a GPU machine, say) replaces those and keeps the others, so one page can
combine studies measured on different machines and says which ran where. The page itself is
:mod:`~dymu_lightning.eval.page`'s, rendered from the record alone.

Adding a study: a ``_NAME_study(setting, work, run)`` here that makes its runs through ``run`` (an
``eval_encoder`` run writing ``{work}/eval/NAME``), its name in :data:`STUDIES` and a call in
:func:`generate`; then its section in :mod:`~dymu_lightning.eval.page` (see there).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from dymu_lightning.eval.metrics import SCENE_PATTERN
from dymu_lightning.eval.page import VARIANTS, render, with_cache_variable
from dymu_lightning.eval.schema import RECORD, RecordedInvocation, RecordedNextToken, RecordedStep, ResultsRecord

STUDIES = ("probe", "photos", "next_token")


@dataclass
class Setting:
    """What the results command measures. The defaults are the published run on real DINOv2-S.

    Attributes:
        model: overrides for the ``model`` section of both recipes (backbone, random weights, ...).
        photos_calibrate / photos_evaluate: image folders, or ``assets:skimage`` / ``assets:mvtb``.
        scene_pattern: how the photos' file names name their scene (burst frames), for the per-scene
            correlation; None: images only.
        photos_tokens_left: DyMU low / mid / high calibration targets at the photos' size.
        probe_train / probe_test: folders of labelled images named ``{label}_...``; None: Fashion-MNIST
            subsets of ``probe_train_images`` / ``probe_test_images`` images from ``dymu_lightning.assets.fetch``.
        probe_sizes: side the probe images are fed at -> DyMU low / mid / high calibration targets at
            that side; one probe study per side (None: the backbone's own size). Fashion-MNIST is
            28 px: 112 loses nothing, and 224 (DINOv2's native side) is an 8x upsampling, so redundant
            that every reduction loses little.
        probe_calibration_images: calibrate on the first N Fashion-MNIST training images (all of
            ``probe_train`` when that is given).
        batch_size: images per calibration step (ranked together: it shapes the thresholds).
        eval_batch_size: images per evaluation forward pass (the results do not depend on it).
        num_workers: data-loader workers of the evaluations.
        accelerator: ``cpu`` or ``cuda``: where calibrations and evaluations run. On ``cuda``, float32
            stays IEEE float32 (TF32 off), as on the CPU.
        studies: which of :data:`STUDIES` to run.
    """

    model: tuple[str, ...] = ("model.backbone=dinov2_vits14_offline",)
    photos_calibrate: str = "assets:skimage"
    photos_evaluate: str = "assets:mvtb"
    photos_tokens_left: dict[str, int] = field(default_factory=lambda: {"low": 40, "mid": 87, "high": 176})
    scene_pattern: str | None = SCENE_PATTERN
    probe_train: str | None = None
    probe_test: str | None = None
    probe_train_images: int = 10000
    probe_test_images: int = 10000
    probe_sizes: dict[int | None, dict[str, int]] = field(
        default_factory=lambda: {112: {"low": 10, "mid": 22, "high": 44}, 224: {"low": 40, "mid": 87, "high": 176}}
    )
    probe_calibration_images: int = 1000
    batch_size: int = 16
    eval_batch_size: int = 16
    num_workers: int = 0
    accelerator: str = "cpu"
    studies: tuple[str, ...] = STUDIES
    next_token_source: str = "assets:mvtb"
    next_token_images: int = 24  # 0 skips the small LLaVA's next-token study


@dataclass
class Step:
    """One recipe run: the study it belongs to, its command line and the file it produced."""

    study: str
    recipe: str
    overrides: list[str]
    output: Path

    def command(self) -> str:
        return " ".join(["python -m dymu_lightning", f"recipe={self.recipe}", *map(shlex.quote, self.overrides)])


@dataclass
class NextTokenRun:
    """The next-token study's command line and the metrics.json it wrote."""

    command: str
    output: Path


@dataclass
class Invocation:
    """One run of the results command: what it ran, where, and for how long."""

    command: str
    seconds: float
    machine: str
    studies: list[str]
    steps: list[Step]
    next_token: NextTokenRun | None = None  # when the study ran


def generate(setting: Setting, work: Path, page: Path, command: str = "python -m dymu_lightning results") -> Path:
    """Run ``setting.studies`` under ``work``, add them to its record (replacing earlier runs of the
    same studies) and write ``page`` with its plots in ``page.parent / page.stem``."""
    from dymu_lightning.config.recipes import load_recipe
    from dymu_lightning.eval.run import evaluate
    from dymu_lightning.lit.run import calibrate

    unknown = sorted(set(setting.studies) - set(STUDIES))
    if unknown:
        raise ValueError(f"unknown studies {unknown}; expected some of {list(STUDIES)}")
    started = time.perf_counter()
    work = Path(work)
    steps: list[Step] = []

    def run(study: str, recipe: str, overrides: list[str]) -> Path:
        loaded = load_recipe(recipe, overrides)
        output = evaluate(loaded) if loaded.config.task == "eval_encoder" else calibrate(loaded)
        steps.append(Step(study, recipe, overrides, output))
        return output

    with ieee_float32():
        if "probe" in setting.studies:
            for size, tokens_left in setting.probe_sizes.items():
                _probe_study(setting, work, run, size, tokens_left)
        if "photos" in setting.studies:
            _photos_study(setting, work, run)
        next_token = None
        if "next_token" in setting.studies and setting.next_token_images:
            next_token = _next_token_study(setting, work, run)

    invocation = Invocation(
        command, time.perf_counter() - started, _machine(setting.accelerator), list(setting.studies), steps, next_token
    )
    record_invocation(work, invocation)
    return render(work, page)


def _calibrate_overrides(setting: Setting) -> list[str]:
    return [*setting.model, f"trainer.accelerator={setting.accelerator}", "trainer.progress_bar=false", "resume=false"]


def _evaluate_overrides(setting: Setting) -> list[str]:
    device = "cuda" if setting.accelerator in ("cuda", "gpu") else "cpu"
    return [
        *setting.model,
        f"data.global_batch_size={setting.eval_batch_size}",
        f"data.num_workers={setting.num_workers}",
        f"device={device}",
    ]


def _probe_study(
    setting: Setting, work: Path, run: Callable[..., Path], size: int | None, tokens_left: dict[str, int]
) -> None:
    """Fashion-MNIST at ``size`` px: calibrate on training images, probe with the full model's training
    features, score every variant on the test images (``eval/probe_{size}``)."""
    train, test, calibration = _probe_folders(setting)
    name = "probe" if size is None else f"probe_{size}"
    resize = [] if size is None else [f"model.image_size={size}"]
    thresholds = {}
    for variant in VARIANTS:
        thresholds[variant] = run(
            "probe",
            "quickstart",
            [
                f"out_dir={work}/calibrate/{name}_{variant}",
                f"data.images={calibration}",
                f"data.shards={_shards(work, calibration)}",
                f"data.global_batch_size={setting.batch_size}",
                "schedule.r=null",
                f"schedule.tokens_left={tokens_left[variant]}",
                *resize,
                *_calibrate_overrides(setting),
            ],
        )
    run(
        "probe",
        "eval_encoder",
        [
            f"out_dir={work}/eval/{name}",
            f"data.images={test}",
            f"data.shards={_shards(work, test)}",
            f"probe.train_images={train}",
            f"probe.train_shards={_shards(work, train)}",
            *(f"variants.{v}={thresholds[v]}" for v in VARIANTS),
            *resize,
            *_evaluate_overrides(setting),
        ],
    )


def _photos_study(setting: Setting, work: Path, run: Callable[..., Path]) -> None:
    """Natural photos: calibrate on one set, measure on another (``eval/photos``); the same thresholds
    on their own calibration photos too (``eval/photos_calibration``: in-sample, but more varied)."""
    scenes = [f"scene_pattern={setting.scene_pattern}"] if setting.scene_pattern else []
    thresholds = {}
    for variant in VARIANTS:
        thresholds[variant] = run(
            "photos",
            "quickstart",
            [
                f"out_dir={work}/calibrate/photos_{variant}",
                f"data.images={setting.photos_calibrate}",
                f"data.shards={_shards(work, setting.photos_calibrate)}",
                f"data.global_batch_size={setting.batch_size}",
                "schedule.r=null",
                f"schedule.tokens_left={setting.photos_tokens_left[variant]}",
                *_calibrate_overrides(setting),
            ],
        )
    for name, images, extra in (
        ("photos", setting.photos_evaluate, scenes),
        ("photos_calibration", setting.photos_calibrate, ["tome=false"]),
    ):
        run(
            "photos",
            "eval_encoder",
            [
                f"out_dir={work}/eval/{name}",
                f"data.images={images}",
                f"data.shards={_shards(work, images)}",
                *(f"variants.{v}={thresholds[v]}" for v in VARIANTS),
                *extra,
                *_evaluate_overrides(setting),
            ],
        )


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Float32 without TF32 on CUDA for the duration (PyTorch lets cuDNN convolutions, the patch
    embeddings, use TF32 by default: about 1e-3 off, where the CPU computes in float32)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _machine(accelerator: str) -> str:
    """One line: where this invocation ran."""
    import timm
    import torch
    import transformers

    gpu = "no GPU used"
    if accelerator in ("cuda", "gpu") and torch.cuda.is_available():
        gpu = f"GPU: {torch.cuda.get_device_name()} (float32, TF32 off)"
    return (
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads; {gpu}; "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, timm {timm.__version__}"
    )


def record_invocation(work: Path, invocation: Invocation) -> None:
    """Add ``invocation`` to the work folder's record. Earlier invocations keep the studies it did not
    run; one left with none is dropped. Outputs are stored relative to the work folder (which can move)."""
    path = work / RECORD
    kept: list[RecordedInvocation] = []
    if path.is_file():
        raw = json.loads(path.read_text())
        if "invocations" not in raw:
            print(f"{path}: written by an earlier version of this command; its runs are not kept", flush=True)
        for earlier in ResultsRecord.from_json(raw).invocations if "invocations" in raw else []:
            studies = [s for s in earlier.studies if s not in invocation.studies]
            if studies:
                steps = [t for t in earlier.steps if t.study in studies]
                next_token = earlier.next_token if "next_token" in studies else None
                kept.append(replace(earlier, studies=studies, steps=steps, next_token=next_token))
    steps = [
        RecordedStep(t.study, t.recipe, t.overrides, os.path.relpath(t.output, work), with_cache_variable(t.command()))
        for t in invocation.steps
    ]
    next_token = None
    if invocation.next_token is not None:
        next_token = RecordedNextToken(
            with_cache_variable(invocation.next_token.command), os.path.relpath(invocation.next_token.output, work)
        )
    entry = RecordedInvocation(
        invocation.command, invocation.seconds, invocation.machine, invocation.studies, steps, next_token
    )
    work.mkdir(parents=True, exist_ok=True)
    ResultsRecord([*kept, entry]).save(path)


def _next_token_study(setting: Setting, work: Path, run: Callable[..., Path]) -> NextTokenRun:
    """Calibrate the small LLaVA's tower (DyMU low / mid / high), then run the next-token study."""
    from dymu_lightning.eval.next_token import run_command as next_token

    named = []
    for variant in VARIANTS:
        path = run(
            "next_token",
            "small_llava_calib",
            [
                f"out_dir={work}/calibrate/llava_{variant}",
                f"schedule.variant={variant}",
                f"trainer.accelerator={setting.accelerator}",
                "trainer.progress_bar=false",
                "resume=false",
            ],
        )
        named.append(f"{variant}={path}")
    out = work / "next_token"
    arguments = [*named, f"--images={setting.next_token_source}", f"--max-images={setting.next_token_images}"]
    next_token(named, setting.next_token_source, setting.next_token_images, batch_size=4, out=out)
    command = " ".join(["python -m dymu_lightning next_token", *arguments, f"--out={out}"])
    return NextTokenRun(command, out / "metrics.json")


def _probe_folders(setting: Setting) -> tuple[str, str, str]:
    """(train, test, calibration) image folders. Calibration takes the first training images by their
    index in the data set (a folder of its own: shards sort files by name, which leads with the label)."""
    if setting.probe_train is not None and setting.probe_test is not None:
        return setting.probe_train, setting.probe_test, setting.probe_train
    from dymu_lightning.data.fashion_mnist import fashion_mnist_images

    return (
        str(fashion_mnist_images("train", setting.probe_train_images)),
        str(fashion_mnist_images("test", setting.probe_test_images)),
        str(fashion_mnist_images("train", setting.probe_calibration_images)),
    )


def _shards(work: Path, images: str) -> str:
    """The shard folder of an image folder. Named after it: shards are written once, on first use, so
    a folder shared by two image sets (500 then 1000 training images) would silently keep the first."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(images).name or images)
    return f"{work}/shards/{name}-{hashlib.sha1(images.encode()).hexdigest()[:8]}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_command(
    page: Path,
    work: Path,
    studies: list[str] | None = None,
    train: int | None = None,
    test: int | None = None,
    next_token_images: int | None = None,
    accelerator: str | None = None,
    eval_batch: int | None = None,
    workers: int | None = None,
    render_only: bool = False,
) -> int:
    """The ``results`` command. Options left at None keep the published setting (:class:`Setting`);
    the page records the command with the options that were given."""
    if render_only:
        print(f"wrote {render(work, page)}")
        return 0
    unknown = sorted(set(studies or ()) - set(STUDIES))
    if unknown:
        raise ValueError(f"--studies: unknown {', '.join(unknown)}; expected some of {', '.join(STUDIES)}")
    given = {
        "studies": studies,
        "train": train,
        "test": test,
        "next_token_images": next_token_images,
        "accelerator": accelerator,
        "eval_batch": eval_batch,
        "workers": workers,
    }
    fields = {
        "studies": "studies",
        "train": "probe_train_images",
        "test": "probe_test_images",
        "next_token_images": "next_token_images",
        "accelerator": "accelerator",
        "eval_batch": "eval_batch_size",
        "workers": "num_workers",
    }
    values = {fields[name]: tuple(v) if name == "studies" else v for name, v in given.items() if v is not None}
    setting = Setting(**values)
    flags = [
        f"--{name.replace('_', '-')} {' '.join(value) if isinstance(value, list) else value}"
        for name, value in given.items()
        if value is not None
    ]
    written = generate(setting, work, page, " ".join(["python -m dymu_lightning results", *flags]))
    print(f"wrote {written}")
    return 0
