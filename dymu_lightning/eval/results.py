"""``python -m dymu_lightning results``: calibrate, evaluate, and write docs/results.md with its plots.

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
(``results.json``) keeps every invocation of the command with the machine it ran on; an invocation
that runs some of the studies (``--studies probe --accelerator cuda`` on a GPU machine, say) replaces
those and keeps the others, so one page can combine studies measured on different machines and says
which ran where. The page is a list of sections, each a function of the collected results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dymu_lightning.eval.metrics import SCENE_PATTERN

VARIANTS = ("low", "mid", "high")
STUDIES = ("probe", "photos", "next_token")
RECORD = "results.json"  # in the work folder: each invocation, its machine, its steps and their outputs


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
            subsets of ``probe_train_images`` / ``probe_test_images`` images from ``dymu_lightning.assets``.
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
    shown: str = ""  # the command as the page shows it (the cache folder as $DYMU_CACHE); set when recorded

    def command(self) -> str:
        return " ".join(["python -m dymu_lightning", f"recipe={self.recipe}", *map(shlex.quote, self.overrides)])


@dataclass
class Invocation:
    """One run of the results command: what it ran, where, and for how long."""

    command: str
    seconds: float
    machine: str
    studies: list[str]
    steps: list[Step]
    next_token: dict[str, Any] | None = None  # the next-token study's command and output, when it ran


@dataclass
class Collected:
    """Everything the page is written from."""

    invocations: list[Invocation]
    studies: dict[str, dict[str, Any]]  # study name -> metrics.json contents
    plots: dict[str, list[str]]  # study name -> PNG paths relative to the page
    next_token: dict[str, Any] | None = None  # the small LLaVA's next-token study, when it was run


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
    _record(work, invocation)
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


def _record(work: Path, invocation: Invocation) -> None:
    """Add ``invocation`` to the work folder's record. Earlier invocations keep the studies it did not
    run; one left with none is dropped. Outputs are stored relative to the work folder (which can move)."""
    path = work / RECORD
    kept: list[dict[str, Any]] = []
    if path.is_file():
        record = json.loads(path.read_text())
        if "invocations" not in record:
            print(f"{path}: written by an earlier version of this command; its runs are not kept", flush=True)
        for earlier in record.get("invocations", []):
            studies = [s for s in earlier["studies"] if s not in invocation.studies]
            if studies:
                steps = [t for t in earlier["steps"] if t["study"] in studies]
                next_token = earlier.get("next_token") if "next_token" in studies else None
                kept.append({**earlier, "studies": studies, "steps": steps, "next_token": next_token})
    steps = [
        {
            "study": t.study,
            "recipe": t.recipe,
            "overrides": t.overrides,
            "output": os.path.relpath(t.output, work),
            "command": _display(t.command()),
        }
        for t in invocation.steps
    ]
    next_token = None
    if invocation.next_token is not None:
        next_token = {
            "command": _display(invocation.next_token["command"]),
            "output": os.path.relpath(invocation.next_token["output"], work),
        }
    entry = {
        "command": invocation.command,
        "seconds": invocation.seconds,
        "machine": invocation.machine,
        "studies": invocation.studies,
        "steps": steps,
        "next_token": next_token,
    }
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"invocations": [*kept, entry]}, indent=2) + "\n")


def render(work: Path, page: Path) -> Path:
    """Write ``page`` (and its plots) from the runs recorded in ``work`` by :func:`generate`, without
    running anything: a change to the page's layout, or a new section, needs no new measurements."""
    work = Path(work)
    path = work / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no {RECORD} in {work}: run `python -m dymu_lightning results` first")
    record = json.loads(path.read_text())
    if "invocations" not in record:
        raise ValueError(f"{path} was written by an earlier version of this command: run it again")
    invocations, next_token = [], None
    for entry in record["invocations"]:
        steps = [
            Step(t["study"], t["recipe"], t["overrides"], work / t["output"], t["command"]) for t in entry["steps"]
        ]
        nt = entry.get("next_token")
        if nt is not None:
            next_token = {"command": nt["command"], "metrics": _metrics(work / nt["output"])}
        invocations.append(
            Invocation(entry["command"], entry["seconds"], entry["machine"], entry["studies"], steps, nt)
        )
    steps = [t for i in invocations for t in i.steps]
    studies = {t.output.parent.name: _metrics(t.output) for t in steps if t.recipe == "eval_encoder"}
    collected = Collected(invocations, studies, _copy_plots(steps, page), next_token)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(section(collected) for section in SECTIONS))
    return page


def _next_token_study(setting: Setting, work: Path, run: Callable[..., Path]) -> dict[str, Any]:
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
    return {"command": command, "output": out / "metrics.json"}


def _probe_folders(setting: Setting) -> tuple[str, str, str]:
    """(train, test, calibration) image folders. Calibration takes the first training images by their
    index in the data set (a folder of its own: shards sort files by name, which leads with the label)."""
    if setting.probe_train is not None and setting.probe_test is not None:
        return setting.probe_train, setting.probe_test, setting.probe_train
    from dymu_lightning.assets import fetch as assets

    return (
        str(assets.fashion_mnist_images("train", setting.probe_train_images)),
        str(assets.fashion_mnist_images("test", setting.probe_test_images)),
        str(assets.fashion_mnist_images("train", setting.probe_calibration_images)),
    )


def _shards(work: Path, images: str) -> str:
    """The shard folder of an image folder. Named after it: shards are written once, on first use, so
    a folder shared by two image sets (500 then 1000 training images) would silently keep the first."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(images).name or images)
    return f"{work}/shards/{name}-{hashlib.sha1(images.encode()).hexdigest()[:8]}"


def _metrics(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _copy_plots(steps: list[Step], page: Path) -> dict[str, list[str]]:
    """The eval runs' PNGs, copied next to the page as ``{page stem}/{study}_{name}.png`` (replacing
    the PNGs there, so that none outlives the study that made it)."""
    folder = page.parent / page.stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    plots: dict[str, list[str]] = {}
    for step in steps:
        if step.recipe != "eval_encoder":
            continue
        study = step.output.parent.name
        if study != "photos" and not study.startswith("probe"):
            continue
        for png in sorted(step.output.parent.glob("*.png")):
            target = folder / f"{study}_{png.name}"
            shutil.copyfile(png, target)
            plots.setdefault(study, []).append(f"{page.stem}/{target.name}")
    return plots


# --------------------------------------------------------------------------------------------------
# page sections: each takes the collected results and returns markdown
# --------------------------------------------------------------------------------------------------


def _probe_names(c: Collected) -> list[str]:
    """The probe studies on record, smallest image side first."""
    names = [name for name in c.studies if name.startswith("probe")]
    return sorted(names, key=lambda name: c.studies[name]["image_size"])


def _header(c: Collected) -> str:
    first = c.studies[next(iter(c.studies))] if c.studies else {"backbone": "–", "source": "–"}
    bullets = []
    probes = [c.studies[name] for name in _probe_names(c)]
    if probes:
        probe = probes[0]
        sides = " and ".join(f"{p['image_size']} px ({p['full_tokens']} tokens unmerged)" for p in probes)
        bullets.append(
            f"""- **probe study**, at {sides}: {probe["probe"]["classes"]} classes; thresholds calibrated on the
  first training images (labels unused); probes fitted on the full model's `{probe["probe"]["feature"]}`
  features of {probe["probe"]["train_images"]} training images; every variant scored on {probe["images"]} test
  images."""
        )
    if "photos" in c.studies:
        photos = c.studies["photos"]
        bullets.append(
            f"""- **photos study**: thresholds calibrated on one photo set, measured on {photos["images"]} other photos
  at {photos["image_size"]} px ({photos["full_tokens"]} tokens unmerged)."""
        )
    runs = "; ".join(f"`{i.command}` ({i.seconds / 60:.1f} min, {', '.join(i.studies)})" for i in c.invocations)
    return f"""# Results: DyMU on {first["backbone"]}

Generated by {runs}; do not edit by hand ([evaluation.md](evaluation.md) explains every metric and how to
rerun). Weights: `{_display(first["source"])}`. Where each part ran: [Machine](#machine).

{chr(10).join(bullets)}
- ToMe rows (`tome@X`) merge a fixed r per layer, chosen so that every image keeps DyMU-X's mean token
  count on the same images (the per-layer r is listed under the tables).
"""


def _tokens(entry: dict[str, Any]) -> str:
    t = entry["tokens"]
    return f"{t['mean']:.1f} ± {t['std']:.1f} ({t['min']}–{t['max']})"


def _cosine(entry: dict[str, Any]) -> str:
    parts = [f"{entry[f'cosine_{f}']['mean']:.4f} (min {entry[f'cosine_{f}']['min']:.3f})" for f in ("cls", "mean")]
    return " | ".join(parts) if "cosine_cls" in entry else f"– | {parts[-1]}"


def _probe_sections(c: Collected) -> str:
    return "".join(_probe_section(c, name) for name in _probe_names(c))


def _probe_section(c: Collected, name: str) -> str:
    study = c.studies[name]
    full = study["variants"]["full"]["probe"]
    rows, pairs = [], []
    for variant, entry in study["variants"].items():
        p = entry["probe"]
        rows.append(
            f"| {variant} | {_tokens(entry)} | {_cosine(entry)} | {p['knn']:.4f} ({_share(p['knn'], full['knn'])}) "
            f"| {p['linear']:.4f} ({_share(p['linear'], full['linear'])}) |"
        )
        for key, other in (("vs_full", "full"), ("vs_tome", f"tome@{variant}")):
            if key in p:
                cells = " | ".join(f"{_points(p[key][kind])} ({_disagree(p[key][kind])})" for kind in ("knn", "linear"))
                pairs.append(f"| {variant} − {other} | {cells} |")
    probe = study["probe"]
    folds = ", ".join(f"{float(d):g}: {a:.4f}" for d, a in probe.get("linear_cross_validation", {}).items())
    decay = (
        f"The linear probe is a logistic regression on standardised features; its L2 weight decay "
        f"({probe['linear_weight_decay']:g}) was chosen by 5-fold cross-validation on the full model's "
        f"training features alone (fold accuracy by decay: {folds})."
        if "linear_weight_decay" in probe
        else ""
    )
    return f"""
## Probe accuracy and fidelity (Fashion-MNIST at {study["image_size"]} px)

{_table_head("kNN accuracy (of full)", "linear accuracy (of full)")}
{chr(10).join(rows)}

Paired differences on the same {probe["test_images"]} test images, in accuracy points, with a 95%
interval (normal, on the per-image differences); in brackets, the images only the first variant gets
right / only the second:

| pair | kNN | linear |
|---|---|---|
{chr(10).join(pairs)}

{decay}

{_schedules(study)}

{_images(c, name)}
"""


def _points(pair: dict[str, float]) -> str:
    return f"{100 * pair['difference']:+.2f} [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}]"


def _disagree(pair: dict[str, float]) -> str:
    return f"{pair['only_a']} / {pair['only_b']}"


def _photos_section(c: Collected) -> str:
    if "photos" not in c.studies:
        return ""
    study, inside = c.studies["photos"], c.studies["photos_calibration"]
    in_sample = ", ".join(
        f"{v} {inside['variants'][v].get('spearman_tokens_complexity', float('nan')):.3f}" for v in VARIANTS
    )
    rows = []
    for name, entry in study["variants"].items():
        rows.append(f"| {name} | {_tokens(entry)} | {_cosine(entry)} | {_rho(entry)} | {_rho_scenes(entry)} |")
    grouping = study.get("scenes", {})
    scenes = grouping.get("count")
    largest = ", ".join(f"{frames} of `{name}`" for name, frames in grouping.get("largest", {}).items())
    within = ", ".join(f"`{n}` {rho:.2f}" for n, rho in grouping.get("within", {}).get("mid", {}).items())
    per_scene = (
        f"""A scene here is a file-name series: the images whose names differ only in a trailing number
(`scene_pattern` in the eval recipe). The {study["images"]} photos form {scenes} of them; the largest
hold {largest} images: burst frames of one view, overlapping tiles, or a photo series of one place.
Within most of these series the token counts follow complexity weakly or not at all (DyMU-mid,
Spearman within each: {within or "–"}), yet each image counts as much as a photo of its own. The
last column counts each scene once: its mean token count against its mean complexity."""
        if scenes
        else ""
    )
    return f"""
## Token counts, fidelity and image complexity (natural photos)

Complexity is the JPEG size (quality 75) of the encoder's view of each image, in bytes per pixel: the
paper's Figure 2. Full and ToMe keep the same count for every image, so they have no rank correlation.
Spearman per image comes with a 95% bootstrap interval (1000 resamples of the images), and per scene
with one that resamples the scenes.

{_table_head("Spearman(tokens, complexity), per image", f"per scene ({scenes or '–'} scenes)")}
{chr(10).join(rows)}

{per_scene}

{_schedules(study)}

On the {inside["images"]} calibration photos themselves (in-sample; a more varied set: text, coins, sky,
grass, portraits), Spearman(tokens, complexity) is {in_sample}.

{_images(c, "photos")}
"""


def _targets_section(c: Collected) -> str:
    rows = []
    for name in _probe_names(c):
        rows += _probe_targets(c.studies[name]["variants"], f"{c.studies[name]['image_size']} px")
    if "photos" in c.studies:
        photos = c.studies["photos"]["variants"]
        rho = photos["mid"].get("spearman_tokens_complexity", float("nan"))
        images = c.studies["photos"]["images"]
        rows.append(
            f"| Spearman(tokens, complexity) ≥ 0.6 on natural photos (DyMU-mid, {images} held-out photos) "
            f"| {_rho(photos['mid'])} | {_verdict(rho, 0.6, photos['mid'].get('spearman_interval'))} |"
        )
        if "spearman_scenes" in photos["mid"]:
            scenes = c.studies["photos"]["scenes"]["count"]
            rho = photos["mid"]["spearman_scenes"]
            verdict = _verdict(rho, 0.6, photos["mid"].get("spearman_scenes_interval"))
            rows.append(
                f"| the same, each scene counted once (DyMU-mid, {scenes} scenes) | {_rho_scenes(photos['mid'])} "
                f"| {verdict} |"
            )
    return f"""
## Targets

| target | measured | met |
|---|---|---|
{chr(10).join(rows)}
"""


def _probe_targets(probe: dict[str, Any], where: str) -> list[str]:
    """The targets table's rows for one probe study (``where``: its image side)."""
    rows = []
    for kind in ("knn", "linear"):
        mid, full = probe["mid"]["probe"], probe["full"]["probe"][kind]
        share = mid[kind] / max(full, 1e-12)
        shown, interval = f"{share:.2%}", None
        if "vs_full" in mid:
            pair = mid["vs_full"][kind]
            interval = (full + pair["low"]) / full, (full + pair["high"]) / full
            shown += f" [{interval[0]:.2%}, {interval[1]:.2%}]; mid − full {_points(pair)} pts"
        verdict = _verdict(share, 0.99, interval)
        target = f"DyMU-mid keeps ≥ 99% of the full model's {kind} probe accuracy ({where})"
        rows.append(f"| {target} | {shown} | {verdict} |")
    for kind in ("knn", "linear"):
        pairs = [(v, probe[v]["probe"]) for v in VARIANTS if f"tome@{v}" in probe]
        shown = "; ".join(
            f"{v}: {p[kind]:.4f} vs {probe[f'tome@{v}']['probe'][kind]:.4f}"
            + (f", {_points(p['vs_tome'][kind])} pts" if "vs_tome" in p else "")
            for v, p in pairs
        )
        behind = [(v, p) for v, p in pairs if p[kind] < probe[f"tome@{v}"]["probe"][kind]]
        verdict = _met(not behind)
        ties = [v for v, p in behind if "vs_tome" in p and p["vs_tome"][kind]["high"] >= 0]
        if behind and len(ties) == len(behind):
            verdict += f" ({', '.join(ties)}: behind by less than the noise, the 95% interval includes 0)"
        rows.append(f"| DyMU's {kind} accuracy ≥ ToMe's at every matched count ({where}) | {shown} | {verdict} |")
    return rows


def _next_token_section(c: Collected) -> str:
    if c.next_token is None:
        return ""
    metrics = c.next_token["metrics"]
    rows = [
        f"| {name} | {e['visual_rows_mean']:.1f} | {e['kl_mean']:.4f} ± {e['kl_std']:.4f} | {e['kl_median']:.4f} "
        f"| {e['top1_agreement']:.0%} |"
        for name, e in metrics["variants"].items()
    ]
    tome = "\n".join(f"- {name}: r = {r}" for name, r in metrics["tome_r"].items())
    return f"""
## Next-token fidelity (small LLaVA)

The small real LLaVA (DINOv2-S tower at 336 px, 576 visual tokens; SmolLM2-135M; untrained projector,
see [assets.md](assets.md)) on {metrics["images"]} held-out photos ({metrics["image_source"]}), one prompt
each: "{metrics["prompt"].removeprefix("<image>").strip()}". Each variant's distribution of the token after the
prompt is compared with the full model's: KL(p_full ‖ p_variant) in nats, and whether the most likely
token is the same. "no VTU" feeds the same merged rows as a shorter sequence, one position per row.
ToMe's r is matched to DyMU's mean visual token count on these photos. The thresholds were calibrated
on the bundled photos (`recipe=small_llava_calib`); these held-out photos are busier, so every variant
keeps more tokens here than its calibration target.

| variant | visual tokens (mean) | KL mean ± std | KL median | top-1 agreement |
|---|---|---|---|---|
{chr(10).join(rows)}

ToMe schedules (per layer of the tower):

{tome}

The projector is untrained, so these distributions are those of a model that does not yet use the
image well: the KL measures how much each reduction perturbs the language model, not answer quality.
"""


def _machine_section(c: Collected) -> str:
    lines = "\n".join(f"- {', '.join(i.studies)} (`{i.command}`): {i.machine}" for i in c.invocations)
    return f"""
## Machine

{lines}

The wall times of the passes (in each `metrics.json`) include data loading and, on a shared machine,
other jobs, so they are not comparable between variants; encoder speed is measured in
[benchmarks.md](benchmarks.md).
"""


def _commands_section(c: Collected) -> str:
    blocks = []
    for i in c.invocations:
        commands = [t.shown for t in i.steps]
        if i.next_token is not None:
            commands.append(i.next_token["command"])
        lines = "\n".join(commands)
        ran = f"`{i.command}` ({', '.join(i.studies)}) ran these recipe runs, in order:"
        blocks.append(f"{ran}\n\n```bash\n{lines}\n```")
    return f"""
## Commands

Each recipe run reproduces its numbers alone. `python -m dymu_lightning results --render-only` rewrites
the page from their outputs without measuring.

{chr(10).join(blocks)}
"""


SECTIONS: list[Callable[[Collected], str]] = [
    _header,
    _targets_section,
    _probe_sections,
    _photos_section,
    _next_token_section,
    _machine_section,
    _commands_section,
]


def _rho(entry: dict[str, Any]) -> str:
    rho = entry.get("spearman_tokens_complexity")
    if rho is None:
        return "–"
    interval = entry.get("spearman_interval")
    return f"{rho:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _rho_scenes(entry: dict[str, Any]) -> str:
    if "spearman_scenes" not in entry:
        return "–"
    interval = entry.get("spearman_scenes_interval")
    return f"{entry['spearman_scenes']:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _table_head(*columns: str) -> str:
    names = ["variant", "tokens: mean ± std (min–max)", "cosine to full, CLS", "cosine to full, mean-pooled"]
    names += columns
    return f"| {' | '.join(names)} |\n|{'---|' * len(names)}"


def _share(value: float, full: float) -> str:
    return f"{value / full:.1%}" if full > 0 else "–"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _verdict(value: float, target: float, interval: Sequence[float] | None) -> str:
    """Met or not by the estimate, saying so when the target lies inside its 95% interval: then the
    data cannot tell which side of the target the truth is on."""
    verdict = _met(value >= target)
    if interval is not None and interval[0] <= target <= interval[1]:
        verdict += " (the target lies inside the 95% interval)"
    return verdict


def _schedules(study: dict[str, Any]) -> str:
    lines = [
        f"- `{name}`: r = {entry['r']} → {entry['expected_tokens']} tokens per image"
        for name, entry in study["variants"].items()
        if "r" in entry
    ]
    return "ToMe schedules:\n\n" + "\n".join(lines) if lines else ""


def _images(c: Collected, study: str) -> str:
    return "\n\n".join(f"![{Path(p).stem}]({p})" for p in c.plots.get(study, []))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _display(command: str) -> str:
    """A command line with the cache folder written as ``$DYMU_CACHE``, so it reads the same anywhere."""
    from dymu_lightning.assets import fetch as assets

    return command.replace(str(assets.cache_dir()), "$DYMU_CACHE")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dymu_lightning results",
        description="Calibrate and evaluate DyMU on real DINOv2-S; write docs/results.md (docs/evaluation.md).",
    )
    parser.add_argument("--page", type=Path, default=Path("docs/results.md"), help="the page to write")
    parser.add_argument("--work", type=Path, default=Path("runs/results"), help="calibration and eval outputs")
    parser.add_argument(
        "--studies",
        nargs="+",
        choices=STUDIES,
        default=list(STUDIES),
        help="run these studies; the others stay as recorded in --work (all: %(default)s)",
    )
    parser.add_argument("--train", type=int, default=Setting.probe_train_images, help="Fashion-MNIST train images")
    parser.add_argument("--test", type=int, default=Setting.probe_test_images, help="Fashion-MNIST test images")
    parser.add_argument(
        "--next-token-images",
        type=int,
        default=Setting.next_token_images,
        help="photos for the small LLaVA's next-token study (0 skips it)",
    )
    parser.add_argument(
        "--accelerator", choices=("cpu", "cuda"), default=Setting.accelerator, help="where the studies run"
    )
    parser.add_argument(
        "--eval-batch", type=int, default=Setting.eval_batch_size, help="images per evaluation forward pass"
    )
    parser.add_argument("--workers", type=int, default=Setting.num_workers, help="evaluation data-loader workers")
    parser.add_argument("--render-only", action="store_true", help="rewrite the page from --work, measuring nothing")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.render_only:
        print(f"wrote {render(args.work, args.page)}")
        return 0
    setting = Setting(
        probe_train_images=args.train,
        probe_test_images=args.test,
        next_token_images=args.next_token_images,
        accelerator=args.accelerator,
        eval_batch_size=args.eval_batch,
        num_workers=args.workers,
        studies=tuple(args.studies),
    )
    defaults = {
        "studies": list(STUDIES),
        "train": Setting.probe_train_images,
        "test": Setting.probe_test_images,
        "next_token_images": Setting.next_token_images,
        "accelerator": Setting.accelerator,
        "eval_batch": Setting.eval_batch_size,
        "workers": Setting.num_workers,
    }
    flags = []
    for name, default in defaults.items():
        value = getattr(args, name)
        if value != default:
            shown = " ".join(value) if isinstance(value, list) else value
            flags.append(f"--{name.replace('_', '-')} {shown}")
    page = generate(setting, args.work, args.page, " ".join(["python -m dymu_lightning results", *flags]))
    print(f"wrote {page}")
    return 0
