"""report.md with two plots: the token-count histogram and the per-layer thresholds."""

from __future__ import annotations

from pathlib import Path

import torch

from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.plots import draw_token_histogram, pyplot


def write_report(result: ThresholdsFile, histogram: torch.Tensor, out_dir: Path, merges: Path | None = None) -> Path:
    """Write ``report.md``, ``tokens.png`` and ``thresholds.png`` into ``out_dir``; ``merges``: a panel of
    what merged (``merges.png``) to show in it."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 3))
    draw_token_histogram(axis, histogram)
    axis.set_title(f"{result.backbone}: {result.images_seen} calibration images")
    figure.tight_layout()
    figure.savefig(out_dir / "tokens.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 3))
    layers = [i for i, t in enumerate(result.thresholds) if t is not None]
    axis.plot(layers, [result.thresholds[i] for i in layers], marker="o")
    axis.set_xlabel("layer")
    axis.set_ylabel("threshold (cosine)")
    axis.set_title("per-layer thresholds")
    figure.tight_layout()
    figure.savefig(out_dir / "thresholds.png", dpi=100)
    plt.close(figure)

    tokens = result.tokens
    rows = "\n".join(
        f"| {layer} | {r} | {'never merges' if t is None else f'{t:.4f}'} |"
        for layer, (r, t) in enumerate(zip(result.r, result.thresholds, strict=True))
    )
    summary = (
        "no images"
        if tokens["mean"] is None
        else f"{tokens['mean']:.1f} ± {tokens['std']:.1f} (min {tokens['min']}, max {tokens['max']}) "
        f"of {tokens['full']} tokens per image"
    )
    extra = result.extra
    full = extra.get("full_tokens")
    if tokens["mean"] is not None and full is not None:  # data.crops=native: each image its own full count
        summary = (
            f"{tokens['mean']:.1f} ± {tokens['std']:.1f} (min {tokens['min']}, max {tokens['max']}) per image, "
            f"of {full['mean']:.1f} on average before merging (min {full['min']}, max {full['max']}: images at "
            "their native sizes)"
        )
    if result.partial:
        done = (
            f"**partial**: {extra.get('steps')} of {extra.get('total_steps')} global steps (trainer.max_steps); "
            "run the same command again to continue"
        )
    else:
        done = "complete: every image was used"
    merges_section = (
        ""
        if merges is None
        else f"""
What merged: each image beside its final groups (one colour, one token) under these thresholds,
from the simplest image to the busiest.

![what merged]({merges.name})
"""
    )
    text = f"""# Calibration report: {result.backbone}

- run: {done}
- images: {result.images_seen} in global batches of {result.global_batch_size}, world size {result.world_size}
- skipped images (undecodable): {extra.get("images_skipped", 0)}
- schedule: {result.schedule}
- tokens during calibration (merges ranked per global batch): {summary}

![token counts](tokens.png)

![thresholds](thresholds.png)
{merges_section}
| layer | r | threshold |
|---|---|---|
{rows}
"""
    path = out_dir / "report.md"
    path.write_text(text)
    return path
