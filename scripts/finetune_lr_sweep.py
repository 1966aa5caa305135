"""The encoder learning rates of Study 1 (``finetune_study --encoder-lr``), chosen on validation images.

The full DINOv2-S at 112 px, trained as the study trains (the first 256 Fashion-MNIST training images,
2 epochs of batches of 8, the head at lr 3e-3), with LoRA or BitFit at each encoder learning rate,
scored on **training** images 256 to 555: images the fits never see, and never the test split the
study reports on. The head alone is the reference. Every fit is an ordinary ``finetune_encoder``
recipe run; the table gives accuracy, wall seconds and the command's ``out_dir``.

    python scripts/finetune_lr_sweep.py runs/lr_sweep     # 10 fits, 6.5 min on 2 idle CPU cores
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from dymu_lightning.config.recipes import load_recipe
from dymu_lightning.data.fashion_mnist import fashion_mnist_images
from dymu_lightning.finetune.run import finetune

RATES = {"lora": (1e-4, 3e-4, 1e-3, 2e-3, 3e-3), "bitfit": (1e-4, 3e-4, 1e-3, 3e-3)}
VALIDATION = range(256, 556)  # training images after the 256 the fits train on


def validation_folder(work: Path) -> Path:
    """Training images 256..555, as ``{label}_{index}.png`` (the fits' label pattern)."""
    folder = work / "val"
    if not folder.is_dir():
        source = fashion_mnist_images("train", VALIDATION.stop)
        staging = work / "val.partial"
        staging.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            if int(path.stem.split("_")[1]) in VALIDATION:
                shutil.copy(path, staging / path.name)
        staging.rename(folder)
    return folder


def main(work: Path) -> None:
    val = validation_folder(work)
    train = fashion_mnist_images("train", 256)
    common = [
        f"data.train_images={train}",
        f"data.train_shards={work}/shards/train-256",
        f"data.val_images={val}",
        f"data.val_shards={work}/shards/val",
        "trainer.max_epochs=2",
        "trainer.progress_bar=false",
        "resume=false",
        "data.global_batch_size=8",
        "optimizer.lr=0.003",
    ]
    runs = {"head": []} | {
        f"{method}_{lr:g}": [f"adaptation.method={method}", f"optimizer.encoder_lr={lr}"]
        for method, rates in RATES.items()
        for lr in rates
    }
    rows = ["| fit | validation accuracy | wall s |", "|---|---|---|"]
    for name, overrides in runs.items():
        out = work / name
        done = out / "results.json"
        if not done.is_file():
            finetune(load_recipe("finetune_encoder", [f"out_dir={out}", *common, *overrides]))
        result = json.loads(done.read_text())
        rows.append(f"| {name} | {100 * result['accuracy']:.1f}% | {result['wall_seconds']:.0f} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lr_sweep"))
