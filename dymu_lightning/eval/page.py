"""docs/results.md from a recorded work folder: files in, markdown out; nothing is measured here.

:func:`collect` reads the work folder's ``results.json`` and the ``metrics.json`` files it names
(:mod:`~dymu_lightning.eval.schema`); :func:`markdown` turns them into the page, one section per
function of :data:`SECTIONS`; :func:`render` does both and copies the plots next to the page.
Sentences that state a conclusion are generated from the numbers (the target verdicts, how many
series follow complexity within them), so a new measurement cannot leave a stale claim behind.

Adding a study section (say a fine-tune study whose eval run writes ``eval/finetune/metrics.json``):

1. in :mod:`~dymu_lightning.eval.studies`, its runs (a ``_finetune_study``) and its name in ``STUDIES``;
2. here, a ``_finetune_section(c: Collected) -> str`` that returns "" when
   ``"finetune" not in c.studies`` and otherwise reads ``c.studies["finetune"]`` (an
   :class:`~dymu_lightning.eval.schema.EvalMetrics`), and its place in :data:`SECTIONS`;
3. its plots are linked when :func:`_plotted` names it;
4. a fixture run that has it (tests/fixtures/results/record.py) and the golden page.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dymu_lightning.eval.schema import (
    RECORD,
    EvalMetrics,
    NextTokenMetrics,
    PairedDifference,
    ProbeScores,
    RecordedInvocation,
    ResultsRecord,
    VariantMetrics,
)
from dymu_lightning.files import write_text_atomic

VARIANTS = ("low", "mid", "high")
WEAK = 0.4  # Spearman below this within a series: the counts follow complexity weakly or not at all


@dataclass
class NextTokenStudy:
    """The small LLaVA's next-token study as recorded: its command line and its metrics."""

    command: str
    metrics: NextTokenMetrics


@dataclass
class Collected:
    """Everything the page is written from."""

    invocations: list[RecordedInvocation]
    studies: dict[str, EvalMetrics]  # eval folder name (probe_112, photos, ...) -> its metrics.json
    plots: dict[str, list[str]] = field(default_factory=dict)  # study -> PNG paths relative to the page
    next_token: NextTokenStudy | None = None  # the last recorded next-token study, when one ran
    # study page stem (finetune_results, vlm_results) -> what it shows on this page: the summary and
    # plot that its command wrote into the folder of that name next to the page
    study_summaries: dict[str, str] = field(default_factory=dict)


def collect(work: Path) -> Collected:
    """The invocations recorded in ``work`` and the metrics their steps wrote (no plots yet)."""
    work = Path(work)
    path = work / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no {RECORD} in {work}: run `python -m dymu_lightning results` first")
    raw = json.loads(path.read_text())
    if "invocations" not in raw:
        raise ValueError(f"{path} was written by an earlier version of this command: run it again")
    record = ResultsRecord.from_json(raw)
    next_token = None
    for invocation in record.invocations:
        if invocation.next_token is not None:
            metrics = NextTokenMetrics.load(work / invocation.next_token.output)
            next_token = NextTokenStudy(invocation.next_token.command, metrics)
    studies = {
        (work / step.output).parent.name: EvalMetrics.load(work / step.output)
        for invocation in record.invocations
        for step in invocation.steps
        if step.recipe == "eval_encoder"
    }
    return Collected(record.invocations, studies, {}, next_token)


def render(work: Path, page: Path) -> Path:
    """Write ``page`` (and its plots) from the runs recorded in ``work``, without running anything:
    a change to the page's layout, or a new section, needs no new measurements."""
    collected = collect(work)
    collected.plots = copy_plots(Path(work), collected, page)
    collected.study_summaries = study_summaries(page.parent)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(markdown(collected))
    return page


def markdown(c: Collected) -> str:
    """The page: every section of :data:`SECTIONS`, in order."""
    return "\n".join(section(c) for section in SECTIONS)


def _plotted(study: str) -> bool:
    """Whether the page shows a study's plots (not those of the in-sample ``photos_calibration``)."""
    return study == "photos" or study.startswith("probe")


def copy_plots(work: Path, c: Collected, page: Path) -> dict[str, list[str]]:
    """The eval runs' PNGs, copied next to the page as ``{page stem}/{study}_{name}.png`` (replacing
    the PNGs there, so that none outlives the study that made it)."""
    folder = page.parent / page.stem
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    plots: dict[str, list[str]] = {}
    for invocation in c.invocations:
        for step in invocation.steps:
            output = work / step.output
            study = output.parent.name
            if step.recipe != "eval_encoder" or not _plotted(study):
                continue
            for png in sorted(output.parent.glob("*.png")):
                target = folder / f"{study}_{png.name}"
                shutil.copyfile(png, target)
                plots.setdefault(study, []).append(f"{page.stem}/{target.name}")
    return plots


def with_cache_variable(text: str) -> str:
    """``text`` with the cache folder written as ``$DYMU_CACHE``, so it reads the same anywhere."""
    from dymu_lightning.assets.paths import cache_dir

    return text.replace(str(cache_dir()), "$DYMU_CACHE")


# --------------------------------------------------------------------------------------------------
# sections: each takes the collected results and returns markdown ("" when its study is not on record)
# --------------------------------------------------------------------------------------------------


def _probe_names(c: Collected) -> list[str]:
    """The probe studies on record, smallest image side first."""
    names = [name for name in c.studies if name.startswith("probe")]
    return sorted(names, key=lambda name: c.studies[name].image_size)


def _header(c: Collected) -> str:
    backbone, source = "–", "–"
    if c.studies:
        first = next(iter(c.studies.values()))
        backbone, source = first.backbone, first.source
    bullets = []
    probes = [c.studies[name] for name in _probe_names(c)]
    if probes:
        probe, setup = probes[0], probes[0].probe
        sides = " and ".join(f"{p.image_size} px ({p.full_tokens} tokens unmerged)" for p in probes)
        bullets.append(
            f"""- **probe study**, at {sides}: {setup.classes} classes; thresholds calibrated on the
  first training images (labels unused); probes fitted on the full model's `{setup.feature}`
  features of {setup.train_images} training images; every variant scored on {probe.images} test
  images."""
        )
    if "photos" in c.studies:
        photos = c.studies["photos"]
        bullets.append(
            f"""- **photos study**: thresholds calibrated on one photo set, measured on {photos.images} other photos
  at {photos.image_size} px ({photos.full_tokens} tokens unmerged)."""
        )
    runs = "; ".join(f"`{i.command}` ({i.seconds / 60:.1f} min, {', '.join(i.studies)})" for i in c.invocations)
    return f"""# Results: DyMU on {backbone}

Generated by {runs}; do not edit by hand ([evaluation.md](evaluation.md) explains every metric and how to
rerun). Weights: `{with_cache_variable(source)}`. Where each part ran: [Machine](#machine).

{chr(10).join(bullets)}
- ToMe rows (`tome@X`) merge a fixed r per layer, chosen so that every image keeps DyMU-X's mean token
  count on the same images (the per-layer r is listed under the tables).
"""


def _targets_section(c: Collected) -> str:
    rows = []
    for name in _probe_names(c):
        rows += _probe_targets(c.studies[name].variants, f"{c.studies[name].image_size} px")
    if "photos" in c.studies:
        photos = c.studies["photos"]
        mid = photos.variants["mid"]
        rho = _or_nan(mid.spearman_tokens_complexity)
        rows.append(
            f"| Spearman(tokens, complexity) ≥ 0.6 on natural photos (DyMU-mid, {photos.images} held-out photos) "
            f"| {_rho(mid)} | {verdict(rho, 0.6, mid.spearman_interval)} |"
        )
        if mid.spearman_scenes is not None:
            scenes = photos.scenes.count
            met = verdict(mid.spearman_scenes, 0.6, mid.spearman_scenes_interval)
            rows.append(
                f"| the same, each scene counted once (DyMU-mid, {scenes} scenes) | {_rho_scenes(mid)} | {met} |"
            )
    return f"""
## Targets

| target | measured | met |
|---|---|---|
{chr(10).join(rows)}
"""


def _probe_targets(variants: dict[str, VariantMetrics], where: str) -> list[str]:
    """The targets table's rows for one probe study (``where``: its image side)."""
    rows = []
    for kind in ("knn", "linear"):
        mid, full = variants["mid"].probe, getattr(variants["full"].probe, kind)
        share = getattr(mid, kind) / max(full, 1e-12)
        shown, interval = f"{share:.2%}", None
        if mid.vs_full is not None:
            pair = mid.vs_full[kind]
            interval = (full + pair.low) / full, (full + pair.high) / full
            shown += f" [{interval[0]:.2%}, {interval[1]:.2%}]; mid − full {_points(pair)} pts"
        target = f"DyMU-mid keeps ≥ 99% of the full model's {kind} probe accuracy ({where})"
        rows.append(f"| {target} | {shown} | {verdict(share, 0.99, interval)} |")
    for kind in ("knn", "linear"):
        pairs = [(v, variants[v].probe, variants[f"tome@{v}"].probe) for v in VARIANTS if f"tome@{v}" in variants]
        shown = "; ".join(
            f"{v}: {getattr(p, kind):.4f} vs {getattr(tome, kind):.4f}"
            + (f", {_points(p.vs_tome[kind])} pts" if p.vs_tome is not None else "")
            for v, p, tome in pairs
        )
        rows.append(
            f"| DyMU's {kind} accuracy ≥ ToMe's at every matched count ({where}) | {shown} "
            f"| {not_behind_tome(pairs, kind)} |"
        )
    return rows


def not_behind_tome(pairs: list[tuple[str, ProbeScores, ProbeScores]], kind: str) -> str:
    """Met when DyMU's ``kind`` accuracy is at least ToMe's at every count of ``pairs``
    ((variant, DyMU scores, ToMe scores)); when it is behind only where the paired 95% interval
    includes 0, says so, naming those counts."""
    behind = [(v, p) for v, p, tome in pairs if getattr(p, kind) < getattr(tome, kind)]
    shown = _met(not behind)
    ties = [v for v, p in behind if p.vs_tome is not None and p.vs_tome[kind].high >= 0]
    if behind and len(ties) == len(behind):
        shown += f" ({', '.join(ties)}: behind by less than the noise, the 95% interval includes 0)"
    return shown


def _probe_sections(c: Collected) -> str:
    return "".join(_probe_section(c, name) for name in _probe_names(c))


def _probe_section(c: Collected, name: str) -> str:
    study = c.studies[name]
    full = study.variants["full"].probe
    rows, pairs = [], []
    for variant, entry in study.variants.items():
        p = entry.probe
        rows.append(
            f"| {variant} | {_tokens(entry)} | {_cosine(entry)} | {p.knn:.4f} ({_share(p.knn, full.knn)}) "
            f"| {p.linear:.4f} ({_share(p.linear, full.linear)}) |"
        )
        for differences, other in ((p.vs_full, "full"), (p.vs_tome, f"tome@{variant}")):
            if differences is not None:
                cells = " | ".join(
                    f"{_points(differences[kind])} ({_disagree(differences[kind])})" for kind in ("knn", "linear")
                )
                pairs.append(f"| {variant} − {other} | {cells} |")
    setup = study.probe
    folds = ", ".join(f"{float(d):g}: {a:.4f}" for d, a in (setup.linear_cross_validation or {}).items())
    decay = (
        f"The linear probe is a logistic regression on standardised features; its L2 weight decay "
        f"({setup.linear_weight_decay:g}) was chosen by 5-fold cross-validation on the full model's "
        f"training features alone (fold accuracy by decay: {folds})."
        if setup.linear_weight_decay is not None
        else ""
    )
    return f"""
## Probe accuracy and fidelity (Fashion-MNIST at {study.image_size} px)

{_table_head("kNN accuracy (of full)", "linear accuracy (of full)")}
{chr(10).join(rows)}

Paired differences on the same {setup.test_images} test images, in accuracy points, with a 95%
interval (normal, on the per-image differences); in brackets, the images only the first variant gets
right / only the second:

| pair | kNN | linear |
|---|---|---|
{chr(10).join(pairs)}

{decay}

{_schedules(study)}

{_images(c, name)}
"""


def _photos_section(c: Collected) -> str:
    if "photos" not in c.studies:
        return ""
    study, inside = c.studies["photos"], c.studies["photos_calibration"]
    in_sample = ", ".join(f"{v} {_or_nan(inside.variants[v].spearman_tokens_complexity):.3f}" for v in VARIANTS)
    rows = [
        f"| {name} | {_tokens(entry)} | {_cosine(entry)} | {_rho(entry)} | {_rho_scenes(entry)} |"
        for name, entry in study.variants.items()
    ]
    scenes = study.scenes.count if study.scenes is not None else None
    per_scene = ""
    if scenes:
        largest = ", ".join(f"{frames} of `{name}`" for name, frames in study.scenes.largest.items())
        per_scene = f"""A scene here is a file-name series: the images whose names differ only in a trailing number
(`scene_pattern` in the eval recipe). The {study.images} photos form {scenes} of them; the largest
hold {largest} images: burst frames of one view, overlapping tiles, or a photo series of one place.
{within_series(study.scenes.within.get("mid", {}))} The
last column counts each scene once: its mean token count against its mean complexity."""
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

On the {inside.images} calibration photos themselves (in-sample; a more varied set: text, coins, sky,
grass, portraits), Spearman(tokens, complexity) is {in_sample}.

{_images(c, "photos")}
"""


def within_series(within: dict[str, float]) -> str:
    """The sentence on the correlation inside the largest series (DyMU-mid's ``{scene: Spearman}``):
    how many of them follow complexity only weakly, counted from the numbers."""
    shown = ", ".join(f"`{name}` {rho:.2f}" for name, rho in within.items())
    if not within:
        return (
            "None of the largest series has three images or more whose counts vary, so none has a correlation "
            "within it; each image counts as much as a photo of its own."
        )
    weak = sum(rho < WEAK for rho in within.values())
    if weak == 0:
        return (
            f"Within each of these {len(within)} series the token counts follow complexity (Spearman {WEAK:g} "
            f"or more; DyMU-mid, within each: {shown}), and each image counts as much as a photo of its own."
        )
    return (
        f"Within {weak} of these {len(within)} series the token counts follow complexity weakly or not at all "
        f"(Spearman below {WEAK:g}; DyMU-mid, within each: {shown}), yet each image counts as much as a photo "
        "of its own."
    )


def _next_token_section(c: Collected) -> str:
    if c.next_token is None:
        return ""
    metrics = c.next_token.metrics
    rows = [
        f"| {name} | {e.visual_rows_mean:.1f} | {e.kl_mean:.4f} ± {e.kl_std:.4f} | {e.kl_median:.4f} "
        f"| {e.top1_agreement:.0%} |"
        for name, e in metrics.variants.items()
    ]
    tome = "\n".join(f"- {name}: r = {r}" for name, r in metrics.tome_r.items())
    if metrics.projector is None:
        projector = "untrained projector"
        caveat = """The projector is untrained, so these distributions are those of a model that does not yet use the
image well: the KL measures how much each reduction perturbs the language model, not answer quality."""
    else:
        projector = f"projector aligned by {metrics.projector}"
        caveat = """The projector was aligned at 112 px (64 visual tokens) on Fashion-MNIST captions; these photos
run at 336 px, a scale it has not seen. The KL measures how much each reduction perturbs the language
model's next token, not answer quality ([vlm_results.md](vlm_results.md) scores answers)."""
    return f"""
## Next-token fidelity (small LLaVA)

The small real LLaVA (DINOv2-S tower at 336 px, 576 visual tokens; SmolLM2-135M; {projector},
see [assets.md](assets.md)) on {metrics.images} held-out photos ({metrics.image_source}), one prompt
each: "{metrics.prompt.removeprefix("<image>").strip()}". Each variant's distribution of the token after the
prompt is compared with the full model's: KL(p_full ‖ p_variant) in nats, and whether the most likely
token is the same. "no VTU" feeds the same merged rows as a shorter sequence, one position per row.
ToMe's r is matched to DyMU's mean visual token count on these photos. The thresholds were calibrated
on the bundled photos (`recipe=small_llava_calib`).

| variant | visual tokens (mean) | KL mean ± std | KL median | top-1 agreement |
|---|---|---|---|---|
{chr(10).join(rows)}

ToMe schedules (per layer of the tower):

{tome}

{caveat}
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


# tests/test_docs_cli.py runs the commands of the docs' bash blocks; these are a record of hours of runs.
RECORDED_COMMANDS = (
    "<!-- docs-test: skip (the record of a study's runs, hours of compute; the study's command reruns them) -->"
)


def _commands_section(c: Collected) -> str:
    blocks = []
    for i in c.invocations:
        commands = [t.command for t in i.steps]
        if i.next_token is not None:
            commands.append(i.next_token.command)
        lines = "\n".join(commands)
        ran = f"`{i.command}` ({', '.join(i.studies)}) ran these recipe runs, in order:"
        blocks.append(f"{ran}\n\n{RECORDED_COMMANDS}\n```bash\n{lines}\n```")
    return f"""
## Commands

Each recipe run reproduces its numbers alone. `python -m dymu_lightning results --render-only` rewrites
the page from their outputs without measuring.

{chr(10).join(blocks)}
"""


def _finetune_section(c: Collected) -> str:
    shown = "".join(f"\n{c.study_summaries[stem]}" for stem in STUDY_PAGES if stem in c.study_summaries)
    return f"""
## Fine-tuning

Training-free DyMU against light adaptation (head, LoRA, BitFit, with DyMU or ToMe during training) is
a study of its own: [finetune_results.md](finetune_results.md), generated by
`python -m dymu_lightning finetune_study` ([finetune.md](finetune.md)). Study 2, DyMU with and without
VTU in the small LLaVA once its projector is aligned (zero-shot classification by class-name
likelihood), is on [vlm_results.md](vlm_results.md) (`python -m dymu_lightning vlm_study`).
{shown}"""


# The study pages whose summary and plot the fine-tuning section shows, in this order.
STUDY_PAGES = {"finetune_results": "Study 1", "vlm_results": "Study 2"}
# A markdown fragment, not a page: .txt keeps the docs site from building it as one.
SUMMARY = "summary.txt"
STUDY_PLOT = "accuracy_tokens.png"


def study_summaries(docs: Path) -> dict[str, str]:
    """What each study page in ``docs`` contributes to the fine-tuning section: the ``summary.txt`` its
    command wrote next to its plot (paths in it relative to ``docs``), else only the plot, else nothing."""
    summaries = {}
    for stem in STUDY_PAGES:
        summary, plot = docs / stem / SUMMARY, docs / stem / STUDY_PLOT
        if summary.is_file():
            summaries[stem] = summary.read_text()
        elif plot.is_file():
            summaries[stem] = (
                f"**{STUDY_PAGES[stem]}** ([{stem}.md]({stem}.md)): its table is on that page.\n\n"
                f"![{stem}: accuracy against tokens]({stem}/{STUDY_PLOT})\n"
            )
    return summaries


def refresh_finetune_section(page: Path) -> Path | None:
    """Rewrite the fine-tuning section of the results ``page`` from the study summaries next to it,
    leaving every other section as it is (they need the results command's work folder; this does
    not). Returns the page, or None when there is no page or no such section."""
    if not page.is_file():
        return None
    text = page.read_text()
    start = text.find("\n## Fine-tuning\n")
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    section = _finetune_section(Collected([], {}, study_summaries=study_summaries(page.parent)))
    rest = text[end:] if end >= 0 else ""
    return write_text_atomic(page, text[:start] + section + ("\n" if rest else "") + rest)  # markdown's join


SECTIONS: list[Callable[[Collected], str]] = [
    _header,
    _targets_section,
    _probe_sections,
    _photos_section,
    _next_token_section,
    _finetune_section,
    _machine_section,
    _commands_section,
]


# --------------------------------------------------------------------------------------------------
# cells and verdicts
# --------------------------------------------------------------------------------------------------


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _tokens(entry: VariantMetrics) -> str:
    t = entry.tokens
    return f"{t.mean:.1f} ± {t.std:.1f} ({t.min}–{t.max})"


def _cosine(entry: VariantMetrics) -> str:
    mean = f"{entry.cosine_mean.mean:.4f} (min {entry.cosine_mean.min:.3f})"
    if entry.cosine_cls is None:
        return f"– | {mean}"
    return f"{entry.cosine_cls.mean:.4f} (min {entry.cosine_cls.min:.3f}) | {mean}"


def _points(pair: PairedDifference) -> str:
    return f"{100 * pair.difference:+.2f} [{100 * pair.low:+.2f}, {100 * pair.high:+.2f}]"


def _disagree(pair: PairedDifference) -> str:
    return f"{pair.only_a} / {pair.only_b}"


def _rho(entry: VariantMetrics) -> str:
    if entry.spearman_tokens_complexity is None:
        return "–"
    interval = entry.spearman_interval
    return f"{entry.spearman_tokens_complexity:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _rho_scenes(entry: VariantMetrics) -> str:
    if entry.spearman_scenes is None:
        return "–"
    interval = entry.spearman_scenes_interval
    return f"{entry.spearman_scenes:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def _table_head(*columns: str) -> str:
    names = ["variant", "tokens: mean ± std (min–max)", "cosine to full, CLS", "cosine to full, mean-pooled"]
    names += columns
    return f"| {' | '.join(names)} |\n|{'---|' * len(names)}"


def _share(value: float, full: float) -> str:
    return f"{value / full:.1%}" if full > 0 else "–"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def verdict(value: float, target: float, interval: Sequence[float] | None) -> str:
    """Met or not by the estimate, saying so when the target lies inside its 95% interval: then the
    data cannot tell which side of the target the truth is on."""
    shown = _met(value >= target)
    if interval is not None and interval[0] <= target <= interval[1]:
        shown += " (the target lies inside the 95% interval)"
    return shown


def _schedules(study: EvalMetrics) -> str:
    lines = [
        f"- `{name}`: r = {entry.r} → {entry.expected_tokens} tokens per image"
        for name, entry in study.variants.items()
        if entry.r is not None
    ]
    return "ToMe schedules:\n\n" + "\n".join(lines) if lines else ""


def _images(c: Collected, study: str) -> str:
    return "\n\n".join(f"![{Path(p).stem}]({p})" for p in c.plots.get(study, []))
