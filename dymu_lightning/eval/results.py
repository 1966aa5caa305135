"""``python -m dymu_lightning results``: calibrate, evaluate, and write docs/results.md with its plots.

Two studies, each a calibration of DyMU low / mid / high followed by one ``eval_encoder`` run:

- **probe**: Fashion-MNIST (real, labelled). Thresholds are calibrated on the first training images
  (labels unused), probes are fitted on the full model's features of the training images, and every
  variant is scored on the test images.
- **photos**: natural photos. Thresholds are calibrated on the scikit-image photos and evaluated on
  the mvtb-data photos (held out), for token counts, fidelity and the complexity correlation; the
  correlation is also reported on the calibration photos themselves (in-sample).

Every step is an ordinary recipe run (``calibrate`` or ``eval_encoder`` with overrides); the page lists
them as command lines, so any number on it can be reproduced on its own. The page is a list of
sections, each a function of the collected results: a later study (next-token fidelity of a small
LLaVA) adds its runs to :func:`generate` and one more section to :data:`SECTIONS`.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dymu_lightning.eval.metrics import SCENE_PATTERN

VARIANTS = ("low", "mid", "high")
RECORD = "results.json"  # in the work folder: the steps run, their outputs, the wall time


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
        probe_image_size: side the probe images are fed at (Fashion-MNIST is 28 px: 112 loses nothing).
        probe_calibration_images: calibrate on the first N Fashion-MNIST training images (all of
            ``probe_train`` when that is given).
        probe_tokens_left: DyMU calibration targets at ``probe_image_size``.
        batch_size: images per forward pass (and per calibration global batch).
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
    probe_image_size: int | None = 112
    probe_calibration_images: int = 1000
    probe_tokens_left: dict[str, int] = field(default_factory=lambda: {"low": 10, "mid": 22, "high": 44})
    batch_size: int = 16
    next_token_source: str = "assets:mvtb"
    next_token_images: int = 24  # 0 skips the small LLaVA's next-token study


@dataclass
class Step:
    """One recipe run: its command line and the file it produced."""

    recipe: str
    overrides: list[str]
    output: Path

    def command(self) -> str:
        return " ".join(["python -m dymu_lightning", f"recipe={self.recipe}", *map(shlex.quote, self.overrides)])


@dataclass
class Collected:
    """Everything the page is written from."""

    steps: list[Step]
    studies: dict[str, dict[str, Any]]  # study name -> metrics.json contents
    plots: dict[str, list[str]]  # study name -> PNG paths relative to the page
    seconds: float
    command: str
    next_token: dict[str, Any] | None = None  # the small LLaVA's next-token study, when it was run


def generate(setting: Setting, work: Path, page: Path, command: str = "python -m dymu_lightning results") -> Path:
    """Run both studies under ``work`` and write ``page`` with its plots in ``page.parent / page.stem``."""
    from dymu_lightning.config.recipes import load_recipe
    from dymu_lightning.eval.run import evaluate
    from dymu_lightning.lit.run import calibrate

    started = time.perf_counter()
    work = Path(work)
    steps: list[Step] = []

    def run(recipe: str, overrides: list[str]) -> Path:
        loaded = load_recipe(recipe, overrides)
        output = evaluate(loaded) if loaded.config.task == "eval_encoder" else calibrate(loaded)
        steps.append(Step(recipe, overrides, output))
        return output

    common = [*setting.model, "trainer.progress_bar=false", "trainer.accelerator=cpu", "resume=false"]
    studies: dict[str, dict[str, Any]] = {}

    # Fashion-MNIST: calibrate on training images, probe with the full model's training features.
    train, test, calibration = _probe_folders(setting)
    size = [f"model.image_size={setting.probe_image_size}"] if setting.probe_image_size else []
    thresholds = {}
    for variant in VARIANTS:
        thresholds[variant] = run(
            "quickstart",
            [
                f"out_dir={work}/calibrate/probe_{variant}",
                f"data.images={calibration}",
                f"data.shards={_shards(work, calibration)}",
                f"data.global_batch_size={setting.batch_size}",
                "schedule.r=null",
                f"schedule.tokens_left={setting.probe_tokens_left[variant]}",
                *size,
                *common,
            ],
        )
    studies["probe"] = _metrics(
        run(
            "eval_encoder",
            [
                f"out_dir={work}/eval/probe",
                f"data.images={test}",
                f"data.shards={_shards(work, test)}",
                f"data.global_batch_size={setting.batch_size}",
                f"probe.train_images={train}",
                f"probe.train_shards={_shards(work, train)}",
                *(f"variants.{v}={thresholds[v]}" for v in VARIANTS),
                *size,
                *setting.model,
            ],
        )
    )

    # Natural photos: calibrate on one set, measure on another.
    scenes = [f"scene_pattern={setting.scene_pattern}"] if setting.scene_pattern else []
    for variant in VARIANTS:
        thresholds[variant] = run(
            "quickstart",
            [
                f"out_dir={work}/calibrate/photos_{variant}",
                f"data.images={setting.photos_calibrate}",
                f"data.shards={_shards(work, setting.photos_calibrate)}",
                f"data.global_batch_size={setting.batch_size}",
                "schedule.r=null",
                f"schedule.tokens_left={setting.photos_tokens_left[variant]}",
                *common,
            ],
        )
    studies["photos"] = _metrics(
        run(
            "eval_encoder",
            [
                f"out_dir={work}/eval/photos",
                f"data.images={setting.photos_evaluate}",
                f"data.shards={_shards(work, setting.photos_evaluate)}",
                f"data.global_batch_size={setting.batch_size}",
                *(f"variants.{v}={thresholds[v]}" for v in VARIANTS),
                *scenes,
                *setting.model,
            ],
        )
    )

    # The same thresholds on their own calibration photos: in-sample, but a more varied set.
    studies["photos_calibration"] = _metrics(
        run(
            "eval_encoder",
            [
                f"out_dir={work}/eval/photos_calibration",
                f"data.images={setting.photos_calibrate}",
                f"data.shards={_shards(work, setting.photos_calibrate)}",
                f"data.global_batch_size={setting.batch_size}",
                *(f"variants.{v}={thresholds[v]}" for v in VARIANTS),
                "tome=false",
                *setting.model,
            ],
        )
    )

    next_token = _next_token_study(setting, work, run) if setting.next_token_images else None

    record = {
        "command": command,
        "seconds": time.perf_counter() - started,
        "steps": [{"recipe": t.recipe, "overrides": t.overrides, "output": str(t.output)} for t in steps],
        "next_token": next_token,
    }
    (work / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return render(work, page)


def render(work: Path, page: Path) -> Path:
    """Write ``page`` (and its plots) from the runs recorded in ``work`` by :func:`generate`, without
    running anything: a change to the page's layout, or a new section, needs no new measurements."""
    path = Path(work) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no {RECORD} in {work}: run `python -m dymu_lightning results` first")
    record = json.loads(path.read_text())
    steps = [Step(s["recipe"], s["overrides"], Path(s["output"])) for s in record["steps"]]
    studies = {t.output.parent.name: _metrics(t.output) for t in steps if t.recipe == "eval_encoder"}
    plots = _copy_plots(steps, page)
    next_token = record.get("next_token")
    if next_token is not None:
        next_token = {**next_token, "metrics": _metrics(Path(next_token["output"]))}
    collected = Collected(steps, studies, plots, record["seconds"], record["command"], next_token)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(section(collected) for section in SECTIONS))
    return page


def _next_token_study(setting: Setting, work: Path, run: Callable[[str, list[str]], Path]) -> dict[str, str]:
    """Calibrate the small LLaVA's tower (DyMU low / mid / high), then run the next-token study."""
    from dymu_lightning.eval.next_token import main as next_token_main

    named = []
    for variant in VARIANTS:
        path = run(
            "small_llava_calib",
            [
                f"out_dir={work}/calibrate/llava_{variant}",
                f"schedule.variant={variant}",
                "trainer.progress_bar=false",
                "resume=false",
            ],
        )
        named.append(f"{variant}={path}")
    out = work / "next_token"
    arguments = [*named, f"--images={setting.next_token_source}", f"--max-images={setting.next_token_images}"]
    next_token_main([*arguments, f"--out={out}"])
    command = " ".join(["python -m dymu_lightning.eval.next_token", *arguments, f"--out={out}"])
    return {"command": command, "output": str(out / "metrics.json")}


def _probe_folders(setting: Setting) -> tuple[str, str, str]:
    """(train, test, calibration) image folders. Calibration takes the first training images by their
    index in the data set (a folder of its own: shards sort files by name, which leads with the label)."""
    if setting.probe_train is not None and setting.probe_test is not None:
        return setting.probe_train, setting.probe_test, setting.probe_train
    from dymu_lightning import assets

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
    """The eval runs' PNGs, copied next to the page as ``{page stem}/{study}_{name}.png``."""
    folder = page.parent / page.stem
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, list[str]] = {}
    for step in steps:
        if step.recipe != "eval_encoder":
            continue
        study = step.output.parent.name
        if study not in ("probe", "photos"):
            continue
        for png in sorted(step.output.parent.glob("*.png")):
            target = folder / f"{study}_{png.name}"
            shutil.copyfile(png, target)
            plots.setdefault(study, []).append(f"{page.stem}/{target.name}")
    return plots


# --------------------------------------------------------------------------------------------------
# page sections: each takes the collected results and returns markdown
# --------------------------------------------------------------------------------------------------


def _header(c: Collected) -> str:
    probe, photos = c.studies["probe"], c.studies["photos"]
    return f"""# Results: DyMU on {probe["backbone"]}

Generated by `{c.command}` in {c.seconds / 60:.1f} min; do not edit by hand ([evaluation.md](evaluation.md)
explains every metric and how to rerun). Weights: `{_display(probe["source"])}`.

- **probe study**: {probe["probe"]["classes"]} classes; thresholds calibrated on the first training
  images (labels unused); probes fitted on the full model's `{probe["probe"]["feature"]}` features of
  {probe["probe"]["train_images"]} training images; every variant scored on {probe["images"]} test images at
  {probe["image_size"]} px ({probe["full_tokens"]} tokens unmerged).
- **photos study**: thresholds calibrated on one photo set, measured on {photos["images"]} other photos at
  {photos["image_size"]} px ({photos["full_tokens"]} tokens unmerged).
- ToMe rows (`tome@X`) merge a fixed r per layer, chosen so that every image keeps DyMU-X's mean token
  count on the same images (the per-layer r is listed under the tables).
"""


def _tokens(entry: dict[str, Any]) -> str:
    t = entry["tokens"]
    return f"{t['mean']:.1f} ± {t['std']:.1f} ({t['min']}–{t['max']})"


def _cosine(entry: dict[str, Any]) -> str:
    parts = [f"{entry[f'cosine_{f}']['mean']:.4f} (min {entry[f'cosine_{f}']['min']:.3f})" for f in ("cls", "mean")]
    return " | ".join(parts) if "cosine_cls" in entry else f"– | {parts[-1]}"


def _probe_section(c: Collected) -> str:
    study = c.studies["probe"]
    full = study["variants"]["full"]["probe"]
    rows, pairs = [], []
    for name, entry in study["variants"].items():
        p = entry["probe"]
        rows.append(
            f"| {name} | {_tokens(entry)} | {_cosine(entry)} | {p['knn']:.4f} ({_share(p['knn'], full['knn'])}) "
            f"| {p['linear']:.4f} ({_share(p['linear'], full['linear'])}) |"
        )
        for key, other in (("vs_full", "full"), ("vs_tome", f"tome@{name}")):
            if key in p:
                cells = " | ".join(f"{_points(p[key][kind])} ({_disagree(p[key][kind])})" for kind in ("knn", "linear"))
                pairs.append(f"| {name} − {other} | {cells} |")
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
## Probe accuracy and fidelity (Fashion-MNIST)

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

{_images(c, "probe")}
"""


def _points(pair: dict[str, float]) -> str:
    return f"{100 * pair['difference']:+.2f} [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}]"


def _disagree(pair: dict[str, float]) -> str:
    return f"{pair['only_a']} / {pair['only_b']}"


def _photos_section(c: Collected) -> str:
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
Spearman per image comes with a 95% bootstrap interval (1000 resamples of the images).

{_table_head("Spearman(tokens, complexity), per image", f"per scene ({scenes or '–'} scenes)")}
{chr(10).join(rows)}

{per_scene}

{_schedules(study)}

On the {inside["images"]} calibration photos themselves (in-sample; a more varied set: text, coins, sky,
grass, portraits), Spearman(tokens, complexity) is {in_sample}.

{_images(c, "photos")}
"""


def _targets_section(c: Collected) -> str:
    probe, photos = c.studies["probe"]["variants"], c.studies["photos"]["variants"]
    rows = []
    for kind in ("knn", "linear"):
        mid, full = probe["mid"]["probe"], probe["full"]["probe"][kind]
        share = mid[kind] / max(full, 1e-12)
        shown, verdict = f"{share:.2%}", _met(share >= 0.99)
        if "vs_full" in mid:
            pair = mid["vs_full"][kind]
            low, high = (full + pair["low"]) / full, (full + pair["high"]) / full
            shown += f" [{low:.2%}, {high:.2%}]; mid − full {_points(pair)} pts"
            if share < 0.99 <= high:
                verdict += " (99% lies inside the 95% interval)"
        rows.append(f"| DyMU-mid keeps ≥ 99% of the full model's {kind} probe accuracy | {shown} | {verdict} |")
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
        rows.append(f"| DyMU's {kind} accuracy ≥ ToMe's at every matched count | {shown} | {verdict} |")
    rho = photos["mid"].get("spearman_tokens_complexity", float("nan"))
    images = c.studies["photos"]["images"]
    rows.append(
        f"| Spearman(tokens, complexity) ≥ 0.6 on natural photos (DyMU-mid, {images} held-out photos) "
        f"| {_rho(photos['mid'])} | {_met(rho >= 0.6)} |"
    )
    if "spearman_scenes" in photos["mid"]:
        scenes = c.studies["photos"]["scenes"]["count"]
        rho = photos["mid"]["spearman_scenes"]
        rows.append(
            f"| the same, each scene counted once (DyMU-mid, {scenes} scenes) | {rho:.3f} | {_met(rho >= 0.6)} |"
        )
    return f"""
## Targets

| target | measured | met |
|---|---|---|
{chr(10).join(rows)}
"""


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
    import torch

    cpu = _cpu_model()
    return f"""
## Machine

- CPU: {cpu}, {os.cpu_count()} logical cores visible, {torch.get_num_threads()} torch threads; no GPU used
- {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}
- the machine was shared with other jobs while this ran, so the wall times of the passes (in each
  `metrics.json`) are not comparable between variants; encoder speed is measured in
  [benchmarks.md](benchmarks.md)
"""


def _commands_section(c: Collected) -> str:
    commands = [step.command() for step in c.steps]
    if c.next_token is not None:
        commands.append(c.next_token["command"])
    lines = "\n".join(_display(command) for command in commands)
    return f"""
## Commands

The whole page: `{c.command}`. It ran these recipe runs, in order (each reproduces its numbers alone);
`python -m dymu_lightning results --render-only` rewrites the page from their outputs without measuring.

```bash
{lines}
```
"""


SECTIONS: list[Callable[[Collected], str]] = [
    _header,
    _targets_section,
    _probe_section,
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
    return f"{entry['spearman_scenes']:.3f}" if "spearman_scenes" in entry else "–"


def _table_head(*columns: str) -> str:
    names = ["variant", "tokens: mean ± std (min–max)", "cosine to full, CLS", "cosine to full, mean-pooled"]
    names += columns
    return f"| {' | '.join(names)} |\n|{'---|' * len(names)}"


def _share(value: float, full: float) -> str:
    return f"{value / full:.1%}" if full > 0 else "–"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


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
    from dymu_lightning import assets

    return command.replace(str(assets.cache_dir()), "$DYMU_CACHE")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dymu_lightning results",
        description="Calibrate and evaluate DyMU on real DINOv2-S; write docs/results.md (docs/evaluation.md).",
    )
    parser.add_argument("--page", type=Path, default=Path("docs/results.md"), help="the page to write")
    parser.add_argument("--work", type=Path, default=Path("runs/results"), help="calibration and eval outputs")
    parser.add_argument("--train", type=int, default=Setting.probe_train_images, help="Fashion-MNIST train images")
    parser.add_argument("--test", type=int, default=Setting.probe_test_images, help="Fashion-MNIST test images")
    parser.add_argument(
        "--next-token-images",
        type=int,
        default=Setting.next_token_images,
        help="photos for the small LLaVA's next-token study (0 skips it)",
    )
    parser.add_argument("--render-only", action="store_true", help="rewrite the page from --work, measuring nothing")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.render_only:
        print(f"wrote {render(args.work, args.page)}")
        return 0
    setting = Setting(
        probe_train_images=args.train, probe_test_images=args.test, next_token_images=args.next_token_images
    )
    defaults = {"train": Setting.probe_train_images, "test": Setting.probe_test_images}
    defaults["next_token_images"] = Setting.next_token_images
    flags = [
        f"--{name.replace('_', '-')} {getattr(args, name)}"
        for name, default in defaults.items()
        if getattr(args, name) != default
    ]
    page = generate(setting, args.work, args.page, " ".join(["python -m dymu_lightning results", *flags]))
    print(f"wrote {page}")
    return 0
