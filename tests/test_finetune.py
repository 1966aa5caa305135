"""The finetune task on a tiny random timm ViT: what each adaptation trains, resume, DDP, errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from tests_support import TINY_TIMM_ARCH

from dymu_lightning import cli
from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile, batch_thresholds
from dymu_lightning.config.recipes import load_recipe
from dymu_lightning.data import write_shards
from dymu_lightning.finetune.data import EpochBatches
from dymu_lightning.finetune.run import build, check, finetune, make_trainer

REPO = Path(__file__).resolve().parents[1]


def labelled_images(folder: Path, count: int, seed: int) -> Path:
    """``count`` 64 px images named ``{label}_{i}.png``, 3 classes: one colour channel is brighter in
    a coarse pattern, under noise (learnable, but not at once)."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = i % 3
        coarse = torch.rand(3, 4, 4, generator=generator) * 0.5
        coarse[label] += 0.3
        image = torch.nn.functional.interpolate(coarse[None], size=64, mode="bilinear")[0]
        image = (image + 0.3 * torch.rand(3, 64, 64, generator=generator)).clamp(0, 1)
        Image.fromarray((image.permute(1, 2, 0) * 255).to(torch.uint8).numpy()).save(folder / f"{label}_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """24 training images (3 global batches of 8), 10 validation images, and DyMU thresholds for the
    tiny model that merge on these images."""
    root = tmp_path_factory.mktemp("finetune")
    write_shards(labelled_images(root / "train_images", 24, 0), root / "train", shard_size=10)
    write_shards(labelled_images(root / "val_images", 10, 1), root / "val", shard_size=4)
    backbone = get_backbone("timm_vit")
    torch.manual_seed(0)  # the model the recipes build (seed 0)
    model = backbone.build(TINY_TIMM_ARCH).eval()
    transform = backbone.image_transform(model)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted((root / "train_images").iterdir())])
    values = batch_thresholds(backbone, model, pixels[:8], r=6)
    ThresholdsFile(
        backbone="timm_vit",
        num_layers=backbone.num_layers(model),
        image_size=64,
        thresholds=values,
        r=[6] * len(values),
        schedule={"kind": "constant", "r": 6},
        images_seen=8,
        global_batch_size=8,
        world_size=1,
        tokens={"mean": 65.0 - 6 * len(values), "full": 65},
        source="random",
    ).save(root / "thresholds.json")
    return {"root": root, "train": root / "train", "val": root / "val", "thresholds": root / "thresholds.json"}


def recipe_file(data: dict[str, Path], folder: Path, **sections) -> Path:
    recipe = {
        "task": "finetune",
        "out_dir": str(folder / "out"),
        "model": {"backbone": "timm_vit", "random_init": True, "arch": TINY_TIMM_ARCH},
        "data": {"train_shards": str(data["train"]), "val_shards": str(data["val"]), "global_batch_size": 8},
        "optimizer": {"lr": 0.01},
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "progress_bar": False, "log_every_n_steps": 1},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def trainable_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


@pytest.mark.parametrize("method", ["head", "lora", "bitfit"])
def test_two_steps_change_only_what_the_adaptation_trains(data, tmp_path, method):
    """Two optimiser steps with DyMU merging on: every parameter the method trains has moved, every
    other one is bitwise unchanged, and the trainable set is exactly the method's."""
    path = recipe_file(
        data,
        tmp_path,
        adaptation={"method": method},
        reduction={"kind": "dymu", "thresholds": str(data["thresholds"])},
        trainer={"max_steps": 2, "check_val_every_n_epoch": None},
    )
    cfg = check(load_recipe(path))
    module, datamodule, facts = build(cfg)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    make_trainer(cfg).fit(module, datamodule=datamodule)
    assert module.trainer.global_step == 2
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, before[name])}

    expected = {"head.weight", "head.bias"}
    if method == "lora":
        lora = {name for name in before if "lora_" in name}
        assert lora and all(".attn." in name for name in lora)  # the attention projections only
        expected |= lora
    if method == "bitfit":
        expected |= {name for name in before if name.endswith(".bias") or ".norm" in name}
        expected.discard("encoder.head.bias")  # timm's own classifier: the features bypass it, so it stays frozen
    assert trainable == expected
    assert changed == expected
    assert facts["trainable_parameters"] == sum(before[name].numel() for name in expected)
    # tokens were merged while training (gradients went through the size-weighted merges)
    assert module.trainer.callback_metrics["train_tokens"] < facts["full_tokens"]


@pytest.mark.parametrize("stop", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_resume_equals_an_uninterrupted_run(data, tmp_path, stop):
    """Stopped at global step ``stop`` (2 and 4: mid-epoch; 3: an epoch end) and run again, a fit
    ends with bitwise the same trained weights, the same logged validation accuracy and the same
    predictions as one uninterrupted run."""
    sections = {
        "adaptation": {"method": "bitfit"},
        "reduction": {"kind": "dymu", "thresholds": str(data["thresholds"])},
        "optimizer": {"lr": 0.01, "schedule": "cosine"},
    }
    whole = recipe_file(data, tmp_path / "whole", **sections)
    finetune(load_recipe(whole))
    parts = recipe_file(data, tmp_path / "parts", **sections)
    stopped = finetune(load_recipe(parts, [f"trainer.stop_after_steps={stop}"]))
    assert not stopped.exists()  # a stopped run writes no results
    finetune(load_recipe(parts))

    a, b = (trainable_state(p / "out" / "checkpoints" / "last.ckpt") for p in (tmp_path / "whole", tmp_path / "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    results = [json.loads((p / "out" / "results.json").read_text()) for p in (tmp_path / "whole", tmp_path / "parts")]
    assert results[0]["accuracy"] == results[1]["accuracy"] and results[1]["global_steps"] == 6
    rows = [(p / "out" / "per_image.csv").read_text() for p in (tmp_path / "whole", tmp_path / "parts")]
    assert rows[0] == rows[1]
    assert val_accuracy(tmp_path / "whole")[-1] == val_accuracy(tmp_path / "parts")[-1]


def val_accuracy(folder: Path) -> list[float]:
    values = []
    for log in sorted((folder / "out" / "logs").glob("version_*/metrics.csv")):
        with open(log) as stream:
            values += [float(row["val_acc"]) for row in csv.DictReader(stream) if row.get("val_acc")]
    return values


def test_head_without_merging_equals_plain_training(data, tmp_path):
    """Merging off + head through Lightning = a plain loop: the stock encoder's CLS features, the same
    head initialisation, batches and AdamW steps."""
    path = recipe_file(data, tmp_path, trainer={"check_val_every_n_epoch": None})
    cfg = check(load_recipe(path))
    module, datamodule, _ = build(cfg)
    make_trainer(cfg).fit(module, datamodule=datamodule)

    plain, plain_data, _ = build(cfg)  # the same initial head (seeded)
    images = plain_data.train_images()
    head, encoder = plain.head, plain.encoder
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
    batches = EpochBatches(len(images), 8, 0, 1, cfg.seed)
    for epoch in range(2):
        batches.set_epoch(epoch)
        for rows in batches:
            items = [images[i] for i in rows]
            pixels = torch.stack([item["pixels"] for item in items])
            labels = torch.stack([item["label"] for item in items])
            with torch.no_grad():
                features = get_backbone("timm_vit").stock_features(encoder, pixels)[:, 0]
            loss = torch.nn.functional.cross_entropy(head(features), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.testing.assert_close(module.head.weight, head.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(module.head.bias, head.bias, rtol=0, atol=1e-6)


def test_training_free_evaluation_and_results(data, tmp_path):
    """A head trained on the full model, also evaluated on DyMU's and ToMe's merged tokens; ToMe
    matched to the thresholds file keeps the count it records, and the outputs say what ran."""
    path = recipe_file(
        data,
        tmp_path,
        trainer={"check_val_every_n_epoch": None, "max_epochs": 1},
        evaluate={
            "dymu": {"kind": "dymu", "thresholds": str(data["thresholds"])},
            "tome": {"kind": "tome", "thresholds": str(data["thresholds"])},
        },
    )
    result = json.loads(finetune(load_recipe(path)).read_text())
    evaluations = result["evaluations"]
    assert evaluations["trained"]["tokens_mean"] == 65
    assert evaluations["dymu"]["tokens_std"] > 0  # a count per image
    assert evaluations["tome"]["tokens_mean"] == 65 - 6 * 3 and evaluations["tome"]["tokens_std"] == 0
    assert result["trainable_parameters"] == 48 * 3 + 3 and result["command"].endswith(f"recipe={path}")
    assert {"accuracy", "tokens_mean", "training_images_per_second", "wall_seconds"} <= result.keys()
    with open(tmp_path / "out" / "per_image.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [int(r["index"]) for r in rows] == list(range(10))
    assert sum(int(r["label"]) == int(r["predicted:trained"]) for r in rows) / 10 == result["accuracy"]
    assert "| dymu | dymu" in (tmp_path / "out" / "report.md").read_text()


def run_cli(capsys, *arguments: str) -> tuple[int, list[str]]:
    code = cli.main(list(arguments))
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_input_is_one_line(data, tmp_path, capsys):
    path = recipe_file(data, tmp_path)
    code, err = run_cli(capsys, "check", f"recipe={path}", "adaptation.method=adapter")
    assert code == 2 and err == [f"error: {path}: adaptation.method='adapter'; expected one of head, lora, bitfit"]

    code, err = run_cli(capsys, f"recipe={path}", "adaptation.method=lora", "adaptation.lora.modules=[blocks.*mlp]")
    assert code == 2 and len(err) == 1
    assert err[0].startswith(
        f"error: {path}: adaptation.lora.modules: 'blocks.*mlp' matches no linear module of the model (they are named"
    )
    assert not (tmp_path / "out").exists()

    other = ThresholdsFile.load(data["thresholds"])
    other.backbone = "hf_dinov2"
    other.save(tmp_path / "dinov2.json")
    code, err = run_cli(
        capsys, "check", f"recipe={path}", "reduction.kind=dymu", f"reduction.thresholds={tmp_path}/dinov2.json"
    )
    assert code == 2 and err == [
        f"error: {path}: reduction.thresholds {tmp_path}/dinov2.json was calibrated for backbone 'hf_dinov2', "
        "not model.backbone='timm_vit'"
    ]

    code, err = run_cli(capsys, "check", f"recipe={path}", "adaptation.method=lora", "adaptation.lora.target=lm")
    assert code == 2 and err == [
        f"error: {path}: adaptation.lora.target='lm' needs a language model; "
        "this recipe fine-tunes an encoder (use tower)"
    ]


def test_thresholds_of_another_depth_fail_before_training(data, tmp_path, capsys):
    deeper = ThresholdsFile.load(data["thresholds"])
    deeper.num_layers, deeper.thresholds, deeper.r = 4, [*deeper.thresholds, 0.5], [*deeper.r, 6]
    deeper.save(tmp_path / "deeper.json")
    path = recipe_file(data, tmp_path, reduction={"kind": "dymu", "thresholds": str(tmp_path / "deeper.json")})
    code, err = run_cli(capsys, f"recipe={path}")
    assert code == 2 and err == [
        f"error: reduction.thresholds: {tmp_path}/deeper.json: these thresholds were calibrated for backbone "
        "'timm_vit' (4 layers); they cannot drive backbone 'timm_vit' (3 layers)"
    ]
    assert not (tmp_path / "out").exists()


def test_thresholds_of_another_size_or_depth_to_features_fail_before_training(data, tmp_path, capsys):
    """The same encoder, but calibrated on another token grid (refused once the model is built) or on
    features read at another depth (refused by `check`): either would merge a different share of the
    tokens, so nothing runs."""
    for name, change, message in (
        ("larger", {"image_size": 96}, "calibrated at 96 px, but this run feeds 64 px images"),
        ("shallower", {"num_blocks": 2}, "was calibrated with num_blocks=2, but model.num_blocks=None"),
    ):
        other = ThresholdsFile.load(data["thresholds"])
        for key, value in change.items():
            setattr(other, key, value)
        other.save(tmp_path / f"{name}.json")
        path = recipe_file(
            data, tmp_path / name, reduction={"kind": "dymu", "thresholds": str(tmp_path / f"{name}.json")}
        )
        code, err = run_cli(capsys, f"recipe={path}")
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert f"{tmp_path}/{name}.json" in err[0] and message in err[0]
        assert not (tmp_path / name / "out").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_gloo_processes_equal_one(data, tmp_path):
    """``trainer.devices=2 trainer.strategy=ddp`` on CPU (gloo): each process takes half of every global
    batch and DDP averages the gradients, so the trained weights equal the 1-process run's within
    2e-6 (float32 summation order differs), and the predictions are the same."""
    sections = {"adaptation": {"method": "lora"}, "reduction": {"kind": "dymu", "thresholds": str(data["thresholds"])}}
    one = recipe_file(data, tmp_path / "one", **sections)
    finetune(load_recipe(one))
    two = recipe_file(data, tmp_path / "two", **sections)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [sys.executable, "-m", "dymu_lightning", f"recipe={two}", "trainer.devices=2", "trainer.strategy=ddp"],
        cwd=REPO,
        env=env,
        check=True,
        timeout=300,
    )
    a, b = (trainable_state(p / "out" / "checkpoints" / "last.ckpt") for p in (tmp_path / "one", tmp_path / "two"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)
    results = [json.loads((p / "out" / "results.json").read_text()) for p in (tmp_path / "one", tmp_path / "two")]
    assert results[1]["world_size"] == 2 and results[0]["accuracy"] == results[1]["accuracy"]


def test_encoder_lr_steps_the_encoder_and_the_head_apart(data, tmp_path):
    """``optimizer.encoder_lr`` is the LoRA adapters' learning rate, ``optimizer.lr`` the head's: AdamW's
    first step moves a parameter by at most its group's lr (|g| / (sqrt(g^2) + eps) <= 1, and = 1 up to
    eps where the gradient is not tiny), and unset it is ``lr`` (the same weights, bitwise)."""
    runs = {}
    for name, encoder_lr in (("split", 0.001), ("unset", None), ("same", 0.01)):
        path = recipe_file(
            data,
            tmp_path / name,
            adaptation={"method": "lora"},
            optimizer={"encoder_lr": encoder_lr, "lr": 0.01},
            trainer={"max_steps": 1, "check_val_every_n_epoch": None},
        )
        cfg = check(load_recipe(path))
        module, datamodule, _ = build(cfg)
        before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
        make_trainer(cfg).fit(module, datamodule=datamodule)
        runs[name] = {n: (p.detach() - before[n]).abs() for n, p in module.named_parameters() if n in before}
    split = runs["split"]
    lora_b = [delta for name, delta in split.items() if "lora_B" in name]  # lora_A has no gradient at step 1
    assert lora_b and all(abs(float(d.max()) - 1e-3) < 1e-7 for d in lora_b)
    assert abs(float(split["head.weight"].max()) - 1e-2) < 1e-6
    assert all(torch.equal(runs["unset"][name], runs["same"][name]) for name in split)


def test_recalibration_gives_the_adapted_encoder_its_own_thresholds(data, tmp_path):
    """``reduction.recalibrate=true`` calibrates the file's schedule again on the adapted encoder. Over
    one global batch (the whole training set), thresholds found by ranking that batch merge exactly
    the schedule's count on it: 65 - 3 x 6 = 47 tokens per image, whatever LoRA did to the keys."""
    original = ThresholdsFile.load(data["thresholds"])
    original.global_batch_size = 24
    original.save(tmp_path / "thresholds.json")
    path = recipe_file(
        data,
        tmp_path,
        adaptation={"method": "lora"},
        reduction={"kind": "dymu", "thresholds": str(tmp_path / "thresholds.json"), "recalibrate": True},
        trainer={"check_val_every_n_epoch": None},
    )
    result = json.loads(finetune(load_recipe(path)).read_text())
    found = ThresholdsFile.load(tmp_path / "out" / "thresholds_recalibrated.json")
    assert found.tokens["mean"] == 47 and found.tokens["images"] == 24 and found.images_seen == 24
    assert found.thresholds != original.thresholds  # the adapters moved the keys
    assert (found.r, found.backbone, found.extra["recalibrated_from"]) == (
        original.r,
        "timm_vit",
        str(tmp_path / "thresholds.json"),
    )
    evaluations = result["evaluations"]
    assert evaluations["trained"]["reduction"]["recalibrated"] == str(tmp_path / "out" / "thresholds_recalibrated.json")
    assert "recalibrated" not in evaluations["before_recalibration"]["reduction"]
    assert result["reduction"] == evaluations["trained"]["reduction"]
    with open(tmp_path / "out" / "per_image.csv") as stream:
        assert {"tokens:trained", "tokens:before_recalibration"} <= set(next(csv.reader(stream)))


def test_recalibration_is_for_dymu_in_reduction_only(data, tmp_path, capsys):
    path = recipe_file(data, tmp_path)
    code, err = run_cli(
        capsys, "check", f"recipe={path}", "reduction.kind=tome", "reduction.r=2", "reduction.recalibrate=true"
    )
    assert code == 2 and err == [f"error: {path}: reduction.recalibrate needs reduction.kind=dymu, got 'tome'"]
    code, err = run_cli(
        capsys,
        "check",
        f"recipe={path}",
        "evaluate.d.kind=dymu",
        f"evaluate.d.thresholds={data['thresholds']}",
        "evaluate.d.recalibrate=true",
    )
    assert code == 2 and err == [
        f"error: {path}: evaluate.d.recalibrate is only for reduction (the adapted encoder's own thresholds)"
    ]
    code, err = run_cli(capsys, "check", f"recipe={path}", "optimizer.encoder_lr=0")
    assert code == 2 and err == [f"error: {path}: optimizer.encoder_lr must be > 0, got 0.0"]


def test_lora_wraps_the_attention_projections_only(data, tmp_path):
    path = recipe_file(data, tmp_path, adaptation={"method": "lora", "lora": {"r": 2}})
    module, _, facts = build(check(load_recipe(path)))
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in module.named_parameters() if ".lora_A." in name}
    assert wrapped == {f"encoder.blocks.{i}.attn.{p}" for i in range(3) for p in ("qkv", "proj")}
    # 2 x (48 + 144) per qkv, 2 x (48 + 48) per proj, per block; plus the head
    assert facts["trainable_parameters"] == 3 * (2 * (48 + 144) + 2 * (48 + 48)) + 48 * 3 + 3


def test_the_packaged_recipe_checks():
    recipe = load_recipe("finetune_encoder")
    cfg = check(recipe)
    assert (cfg.model.backbone, cfg.model.image_size, cfg.adaptation.method) == ("dinov2_vits14_offline", 112, "head")
    assert recipe.path.read_text().startswith("#") and "recipe=finetune_encoder" in recipe.path.read_text()


def fake_run(folder: Path, correct: dict[str, list[bool]], tokens: dict[str, int], trainable: int) -> Path:
    """A finetune run's results.json and per_image.csv with the given per-image correctness."""
    folder.mkdir(parents=True)
    n = len(next(iter(correct.values())))
    with open(folder / "per_image.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["index", "key", "label", *(f"{c}:{e}" for e in correct for c in ("predicted", "tokens"))])
        for i in range(n):
            row = [i, f"1_{i:05d}", 1]
            for name, values in correct.items():
                row += [1 if values[i] else 0, tokens[name]]
            writer.writerow(row)
    result = {
        "trainable_parameters": trainable,
        "training_images_per_second": 10.0,
        "wall_seconds": 5.0,
        "command": f"python -m dymu_lightning recipe=finetune_encoder out_dir={folder}",
        "machine": "cpu",
        "image_size": 112,
        "full_tokens": 65,
        "evaluations": {name: {"tokens_mean": tokens[name]} for name in correct},
    }
    (folder / "results.json").write_text(json.dumps(result))
    return folder / "results.json"


def test_study_pairs_each_variant_with_full_and_tome(tmp_path):
    """The study table compares every row with the full model and each DyMU row with ToMe under the
    same adaptation, image by image; a run that did not happen leaves its row out."""
    from dymu_lightning.finetune.study import collect, render

    ones, half = [True] * 4, [True, True, False, False]
    runs = {
        "full_head": fake_run(
            tmp_path / "full_head",
            {"trained": ones, "dymu_mid": half, "tome_mid": ones},
            {"trained": 65, "dymu_mid": 22, "tome_mid": 22},
            3850,
        ),
        "dymu_mid_head": fake_run(tmp_path / "dymu_head", {"trained": ones}, {"trained": 22}, 3850),
        "tome_mid_head": fake_run(tmp_path / "tome_head", {"trained": half}, {"trained": 22}, 3850),
        "dymu_mid_lora": tmp_path / "never_ran" / "results.json",
    }
    study = collect(tmp_path, runs, ["mid"], ["head", "lora"])
    rows = {row["label"]: row for row in study["rows"]}
    assert list(rows) == [
        "full + head",
        "DyMU-mid, training-free",
        "ToMe@mid, training-free",
        "DyMU-mid + head",
        "ToMe@mid + head",
    ]
    assert rows["DyMU-mid, training-free"]["vs_full"]["difference"] == -0.5
    assert rows["DyMU-mid, training-free"]["vs_tome"]["only_b"] == 2
    assert rows["DyMU-mid + head"]["vs_tome"]["difference"] == 0.5 and "vs_tome" not in rows["ToMe@mid + head"]
    assert rows["DyMU-mid, training-free"]["trainable_parameters"] == 0
    study.update(commands=["python -m x"], seconds=60, train=4, test=4, calibration=4, epochs=1, reused=3)
    page = render(study, tmp_path / "page.md", "python -m dymu_lightning finetune_study")
    text = page.read_text()
    assert "(1 min on cpu, reusing 3 runs an earlier invocation finished; " in text  # their time is not in it
    assert "| DyMU-mid + head | 22.0 ± 0.0 | 100.0% | +0.0 [+0.0, +0.0] | - | +50.0 [" in text
    assert (tmp_path / "page" / "accuracy_tokens.png").is_file()
    # the results page's table: DyMU / ToMe per level and adaptation
    summary = (tmp_path / "page" / "summary.txt").read_text().splitlines()
    assert summary[2:6] == [
        "| level | tokens per image | training-free | + head |",  # no lora column: that run never happened
        "|---|---|---|---|",
        "| full | 65 | - | 100.0% |",
        "| mid | 22.0 | 50.0% / 100.0% | 100.0% / 50.0% |",
    ]
    assert summary[-1] == "![page: accuracy against tokens](page/accuracy_tokens.png)"


def test_study_shows_a_recalibrated_run_with_its_stock_thresholds_too(tmp_path):
    """A DyMU run that recalibrated after LoRA gives two rows: its own thresholds (compared with ToMe)
    and the stock encoder's (the drift), both with the run's training cost."""
    from dymu_lightning.finetune.study import collect

    ones, half = [True] * 4, [True, True, False, False]
    runs = {
        "full_head": fake_run(tmp_path / "full_head", {"trained": ones}, {"trained": 65}, 3850),
        "full_lora": fake_run(tmp_path / "full_lora", {"trained": ones}, {"trained": 65}, 9000),
        "dymu_mid_lora": fake_run(
            tmp_path / "dymu_lora",
            {"trained": ones, "before_recalibration": half},
            {"trained": 22, "before_recalibration": 4},
            9000,
        ),
        "tome_mid_lora": fake_run(tmp_path / "tome_lora", {"trained": half}, {"trained": 22}, 9000),
    }
    rows = {row["label"]: row for row in collect(tmp_path, runs, ["mid"], ["head", "lora"])["rows"]}
    stale = rows["DyMU-mid + lora, stock thresholds"]
    assert (stale["kind"], stale["tokens_mean"], stale["accuracy"], stale["trainable_parameters"]) == (
        "stale",
        4,
        0.5,
        9000,
    )
    assert stale["vs_full_same"]["difference"] == -0.5 and "vs_tome" not in stale
    assert rows["DyMU-mid + lora"]["vs_tome"]["difference"] == 0.5


def test_study_reuses_a_run_only_with_the_same_overrides(tmp_path):
    from dymu_lightning.finetune.study import _ran_with, parse_encoder_lr

    done = tmp_path / "results.json"
    assert _ran_with(done, calibration=False) is None
    done.write_text(json.dumps({"overrides": ["a=1"]}))
    assert _ran_with(done, calibration=False) == ["a=1"]
    done.write_text(json.dumps({"extra": {"overrides": ["b=2"]}}))
    assert _ran_with(done, calibration=True) == ["b=2"]

    assert parse_encoder_lr(["1e-3"]) == {"lora": 1e-3, "bitfit": 1e-3}
    assert parse_encoder_lr(["lora=3e-4", "bitfit=0.001"]) == {"lora": 3e-4, "bitfit": 1e-3}
    with pytest.raises(ValueError, match=r"^--encoder-lr: 'head=1'; expected lora=LR or bitfit=LR"):
        parse_encoder_lr(["head=1"])
    with pytest.raises(ValueError, match=r"^--encoder-lr: 'lora=x': 'x' is not a number$"):
        parse_encoder_lr(["lora=x"])
