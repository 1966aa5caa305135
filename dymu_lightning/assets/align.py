"""``dymu align_small_llava``: train the small LLaVA's projector so that it answers about images.

``make assets`` runs it after ``small_llava``. It aligns the projector on captioned Fashion-MNIST
training images ("What is in this picture?" -> "A photo of a sneaker.", the scoring template only),
the DINOv2-S tower and SmolLM2 frozen, on the CPU with a fixed seed, and writes the trained projector
into the small-LLaVA folder with its provenance (``dymu_alignment.json``: command, seed, data, test
accuracy). The loss is the caption loss plus a class loss (``--class-loss``: the cross-entropy of the
image's class among the ten names' first tokens after "A photo of a", the zero-shot scoring's decision).
The tower reads the images at 112 px (8 x 8 = 64 patches) once (cached features), which keeps the
language model's sequences short: the whole build takes a few minutes on 2 cores. The projector acts
on each visual token alone, so the folder's 336-px processor feeds it unchanged.

Its run folder, ``$DYMU_CACHE/align-small-llava/``, holds ``checkpoints/last.ckpt`` (an interrupted
build resumes), CSV logs, ``results.json`` and ``report.md``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dymu_lightning.assets.paths import cache_dir, small_llava_dir
from dymu_lightning.files import install_dir_atomically, make_staging_dir, write_text_atomic

ALIGNMENT_FILE = "dymu_alignment.json"
#: The default recipe's version, recorded in ALIGNMENT_FILE. Bump it with any change of the defaults
#: below: a projector aligned by another version is aligned again (``make assets`` reruns the command
#: whenever this file is newer than the cache's ALIGNMENT_FILE), so a cache never keeps a projector
#: that the docs' numbers no longer describe. 1: four templates, 17.0%; 2: fitted start, class loss.
RECIPE_VERSION = 2
SEED = 0
TRAIN_IMAGES = 384  # the first N training images of Fashion-MNIST
TEST_IMAGES = 200  # the first N test images, for the recorded accuracy
IMAGE_SIZE = 112
BATCH_SIZE = 8
LEARNING_RATE = 1e-4
SCHEDULE = "cosine"  # to 0 over the run, after WARMUP_STEPS of linear warm-up (or constant)
WARMUP_STEPS = 4
CLASS_LOSS = 1.0  # weight of the class loss added to the caption loss (0: captions only)
CAPTIONS = "scoring"  # the scoring template only ("A photo of a {}."), or "all" four templates
INIT = "names"  # the projector's last layer fitted to the class names' embeddings first, or "random"


def align_dir() -> Path:
    """The alignment run's folder (checkpoints, logs, results)."""
    return cache_dir() / "align-small-llava"


def is_aligned(directory: Path | None = None) -> bool:
    """Whether the folder holds a projector aligned by this :data:`RECIPE_VERSION`."""
    return aligned_version(directory) == RECIPE_VERSION


def aligned_version(directory: Path | None = None) -> int | None:
    """The recipe version the folder's projector was aligned by: None where it was never aligned, 1
    for files written before versions were recorded, 0 where the record cannot be read (the projector
    is then of no known recipe, and is aligned again)."""
    path = (directory or small_llava_dir()) / ALIGNMENT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return 0
    version = record.get("recipe_version", 1) if isinstance(record, dict) else 0
    return version if isinstance(version, int) else 0


def align_small_llava(
    force: bool = False,
    train: int = TRAIN_IMAGES,
    test: int = TEST_IMAGES,
    lr: float = LEARNING_RATE,
    schedule: str = SCHEDULE,
    warmup: int = WARMUP_STEPS,
    class_loss: float = CLASS_LOSS,
    captions: str = CAPTIONS,
    init: str = INIT,
    progress_bar: bool = True,
) -> int:
    """The ``align_small_llava`` command: align the projector (once) and install it in the cache."""
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    if warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {warmup}")
    if not class_loss >= 0:
        raise ValueError(f"--class-loss must be >= 0, got {class_loss}")
    if captions not in ("scoring", "all"):
        raise ValueError(f"--captions must be scoring or all, got {captions!r}")
    if init not in ("names", "random"):
        raise ValueError(f"--init must be names or random, got {init!r}")
    if class_loss and captions != "scoring":
        raise ValueError("--class-loss reads the name after 'A photo of a': it needs --captions scoring")
    target = small_llava_dir()
    if is_aligned(target) and not force:
        print(f"small llava: already aligned ({target / ALIGNMENT_FILE})")
        return 0
    version = aligned_version(target)
    if version is not None and not force:  # rebuilt, as with --force: the older projector is not a start
        done_by = f"recipe version {version}" if version else f"an unknown recipe ({ALIGNMENT_FILE} is not readable)"
        print(f"small llava: its projector was aligned by {done_by}; aligning it with version {RECIPE_VERSION}")
        force = True
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from dymu_lightning.assets.small_llava import materialise_small_llava
    from dymu_lightning.backbones.hf_vit import dinov2_image_processor
    from dymu_lightning.vlm.align import (
        AlignConfig,
        CaptionedImages,
        fit_align,
        fit_projector_to_names,
        init_projector,
        pixel_tensor,
        tower_features,
    )
    from dymu_lightning.vlm.captions import (
        SCORING_TEMPLATES,
        TEMPLATES,
        answer_ids,
        caption_set,
        class_first_ids,
        prompt_ids,
        scoring_prefix_ids,
    )
    from dymu_lightning.vlm.evaluate import Reduction, classify

    started = time.perf_counter()
    # --force rebuilds the folder first; either way the projector is drawn afresh from the seed, so the
    # alignment never starts from the projector an earlier alignment left there.
    source = materialise_small_llava(force=force)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    init_projector(model, SEED)
    processor = dinov2_image_processor(IMAGE_SIZE, shortest_edge=IMAGE_SIZE)
    patches = (IMAGE_SIZE // model.config.vision_config.patch_size) ** 2
    prompt = prompt_ids(tokenizer, model.config.image_token_id, patches)
    templates = SCORING_TEMPLATES if captions == "scoring" else TEMPLATES
    train_set = caption_set(f"fashion_mnist:train:{train}", seed=SEED, templates=templates)
    train_set.require("train", "alignment")
    # The tower is frozen and does not merge here: read it once, train on its features.
    dataset = CaptionedImages(
        tower_features(model, pixel_tensor(train_set.paths, processor)),
        answer_ids(tokenizer, train_set.captions, prompt.end),
        features=True,
        labels=train_set.labels,
    )
    if init == "names":  # a least-squares start: each image's visual tokens near its class name's first token
        fit_projector_to_names(model, dataset.images, train_set.labels, class_first_ids(tokenizer))
    work = align_dir()
    cfg = AlignConfig(
        out_dir=work,
        seed=SEED,
        batch_size=BATCH_SIZE,
        lr=lr,
        schedule=schedule,
        warmup_steps=warmup,
        class_loss=class_loss,
        class_first_ids=class_first_ids(tokenizer),
        class_prefix=len(scoring_prefix_ids(tokenizer)),
        progress_bar=progress_bar,
        resume=not force,
    )
    if force:
        shutil.rmtree(work, ignore_errors=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    module, _, facts = fit_align(model, dataset, prompt, tokenizer.pad_token_id, cfg)

    evaluation = caption_set(f"fashion_mnist:test:{test}").require("test", "evaluation")
    found = classify(model, tokenizer, pixel_tensor(evaluation.paths, processor), [Reduction("full")])["full"]
    accuracy = float((found["predicted"] == evaluation.labels).double().mean())
    options = ["--force"] * force + ["--train", str(train)] * (train != TRAIN_IMAGES)
    options += ["--test", str(test)] * (test != TEST_IMAGES) + ["--lr", str(lr)] * (lr != LEARNING_RATE)
    options += ["--schedule", schedule] * (schedule != SCHEDULE) + ["--warmup", str(warmup)] * (warmup != WARMUP_STEPS)
    options += ["--class-loss", str(class_loss)] * (class_loss != CLASS_LOSS)
    options += ["--captions", captions] * (captions != CAPTIONS) + ["--init", init] * (init != INIT)
    command = shlex.join(["python", "-m", "dymu_lightning", "align_small_llava", *options])
    result: dict[str, Any] = {
        "task": "align_small_llava",
        "recipe_version": RECIPE_VERSION,
        "command": command,
        "seed": SEED,
        "train": f"fashion_mnist:train:{train} (one caption each, "
        + ('"A photo of a {class}."' if captions == "scoring" else f"templates drawn with seed {SEED}")
        + ")",
        "captions": captions,
        "templates": list(templates),
        "class_loss": class_loss,
        "test": f"fashion_mnist:test:{test}",
        "image_size": IMAGE_SIZE,
        "batch_size": BATCH_SIZE,
        "learning_rate": lr,
        "schedule": f"{schedule}, {warmup} warm-up steps",
        "projector_init": f"normal, std 0.02, zero biases, drawn with seed {SEED} (init_projector)"
        + (
            "; then the last layer fitted by ridge regression to the class names' first-token embeddings "
            "(fit_projector_to_names)"
        )
        * (init == "names"),
        "epochs": cfg.epochs,
        "accuracy": accuracy,
        "tokens_mean": float(found["visual_rows"].double().mean()),
        **facts,
        "wall_seconds": time.perf_counter() - started,
        "machine": f"cpu, {torch.get_num_threads()} threads, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    write_text_atomic(work / "results.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(work / "report.md", report(result))
    _install(source, model, module.trainable_state(), result)
    print(
        f"aligned the small llava's projector: zero-shot accuracy {accuracy:.3f} on {test} Fashion-MNIST test "
        f"images; {facts['trainable_parameters']:,} trainable parameters; wrote {target / ALIGNMENT_FILE}"
    )
    return 0


def _install(source: Path, model: Any, trained: dict[str, torch.Tensor], result: dict[str, Any]) -> None:
    """Copy the small-LLaVA folder with the trained projector in it, then swap it in atomically."""
    staging = make_staging_dir(source)
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        model.save_pretrained(staging)
        provenance = json.loads((source / "dymu_provenance.json").read_text())
        provenance["projector"] = f"aligned on Fashion-MNIST captions, seed {SEED} ({ALIGNMENT_FILE})"
        (staging / "dymu_provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        alignment = {**result, "parameters": sorted(trained)}
        (staging / ALIGNMENT_FILE).write_text(json.dumps(alignment, indent=2) + "\n")
        for path in staging.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        install_dir_atomically(staging, source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def report(result: dict[str, Any]) -> str:
    """report.md of the alignment run."""
    speed = result["training_images_per_second"]
    return "\n".join(
        [
            "# Align: the small LLaVA's projector",
            "",
            f"Command: `{result['command']}` (seed {result['seed']})",
            "",
            f"- training: {result['train']}, {result['epochs']} epoch(s) at {result['image_size']} px, "
            f"{result['global_steps']} steps of {result['batch_size']}, AdamW lr {result['learning_rate']} "
            f"({result['schedule']}); class loss weight {result['class_loss']}; "
            + (f"{speed:.1f} images/s" if speed else "not run in this invocation"),
            f"- trainable parameters: {result['trainable_parameters']:,} of {result['total_parameters']:,}",
            f"- zero-shot accuracy on {result['test']}: {result['accuracy']:.4f} "
            f"at {result['tokens_mean']:.0f} visual tokens per image",
            f"- final training loss {result['final_train_loss']}; wall time {result['wall_seconds']:.0f} s "
            f"({result['machine']})",
            "",
        ]
    )
