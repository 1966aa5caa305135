"""Evaluation: metrics against hand-computed values, ToMe's matched counts, the eval recipe and the
results page on a shrunken setting (tiny random DINOv2, a few synthetic images)."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from dymu_lightning.config import load_recipe
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.schedule import fixed_r_lengths, matched_fixed_r
from dymu_lightning.eval import metrics
from dymu_lightning.eval.results import (
    RECORD,
    STUDIES,
    Invocation,
    Setting,
    Step,
    _record,
    _verdict,
    generate,
    render,
)
from dymu_lightning.eval.run import check, evaluate, labels_from_keys
from tests.tests_support import tiny_timm

# A 3-block HF DINOv2 at 64 px, 8 px patches: 64 patches + CLS = 65 tokens.
TINY_MODEL = (
    "model.backbone=hf_dinov2",
    "model.random_init=true",
    "model.arch.hidden_size=48",
    # (no intermediate_size: Dinov2Config takes mlp_ratio, default 4, and model.arch typos are errors)
    "model.arch.num_hidden_layers=3",
    "model.arch.num_attention_heads=3",
    "model.arch.image_size=64",
    "model.arch.patch_size=8",
)


# --------------------------------------------------------------------------------------------------
# metrics, by hand
# --------------------------------------------------------------------------------------------------


def test_token_summary_by_hand():
    summary, histogram = metrics.token_summary(torch.tensor([2, 4, 4, 6]), full=7)
    assert summary == {"mean": 4.0, "std": math.sqrt(2.0), "min": 2, "max": 6, "images": 4, "full": 7}
    assert histogram.tolist() == [0, 0, 1, 0, 2, 0, 1, 0]


def test_pooled_features_weight_by_size_and_ignore_padding():
    tokens = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0]], [[5.0, 5.0], [2.0, 2.0], [0.0, 0.0]]])
    sizes = torch.tensor([[1.0, 3.0, 1.0], [1.0, 4.0, 0.0]])
    out = metrics.pooled_features(tokens, sizes, num_prefix=1)
    assert torch.equal(out["cls"], torch.tensor([[9.0, 9.0], [5.0, 5.0]]))
    assert torch.allclose(out["mean"], torch.tensor([[0.75, 0.25], [2.0, 2.0]]))


def test_cosine_knn_accuracy_spearman_by_hand():
    cosine = metrics.per_image_cosine(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert torch.allclose(cosine, torch.tensor([1 / math.sqrt(2), 1.0]))

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.5]])
    # k = 1: nearest neighbour by cosine; [0.6, 0.5] is closest to [0.9, 0.1]? cos = 0.59/0.781/0.912 = 0.829
    # vs [0.1, 0.9]: 0.51/0.781/0.906 = 0.721, so label 0.
    assert metrics.knn_predict(train, labels, test, 2, k=1).tolist() == [0, 1, 0]
    # k = 4: every train row votes with its cosine; the first test row's votes for 0 outweigh those for 1.
    assert metrics.knn_predict(train, labels, test, 2, k=4).tolist() == [0, 1, 0]
    assert metrics.accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 3) == 0.75

    # Ranks of x: 1 2 3 4; of y: 1 3 2 4; d = 0 -1 1 0; rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert metrics.spearman(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])
    ) == pytest.approx(0.8)


def test_linear_probe_separates_separable_data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    features = centres[labels] + torch.randn(60, 3, generator=generator)
    probe = metrics.fit_linear_probe(features, labels, 3)
    assert metrics.accuracy(probe(features), labels, 3) == 1.0


def test_weight_decay_is_chosen_by_cross_validation_on_the_training_features():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) // 20  # every fold (row i mod 4) holds five of each class
    features = torch.randn(40, 6, generator=generator)
    features[:, 0] += 10.0 * labels  # separable along one axis: every decay gets every fold right
    decay, scores = metrics.choose_weight_decay(features, labels, 2, grid=(1e-3, 1e-2), folds=4)
    assert scores == {1e-3: 1.0, 1e-2: 1.0} and decay == 1e-2  # ties go to the larger decay
    # With the signal in one fold's worth of noise, the scores are those of the probes the function fits.
    features[:, 0] = torch.randn(40, generator=generator)
    decay, scores = metrics.choose_weight_decay(features, labels, 2, grid=(1e-3, 1.0), folds=4)
    fold = torch.arange(40) % 4
    for value in (1e-3, 1.0):
        correct = 0
        for held in range(4):
            probe = metrics.fit_linear_probe(features[fold != held], labels[fold != held], 2, value)
            correct += int((probe(features[fold == held]) == labels[fold == held]).sum())
        assert scores[value] == correct / 40
    assert scores[decay] == max(scores.values())


def test_paired_difference_by_hand():
    a = torch.tensor([True, True, False, False, True])
    b = torch.tensor([True, False, True, False, False])
    pair = metrics.paired_difference(a, b)
    # d = 0, 1, -1, 0, 1: mean 0.2, sample variance 2.8 / 4 = 0.7.
    half_width = 1.96 * math.sqrt(0.7) / math.sqrt(5)
    assert pair["difference"] == pytest.approx(0.2)
    assert pair["low"] == pytest.approx(0.2 - half_width) and pair["high"] == pytest.approx(0.2 + half_width)
    assert (pair["only_a"], pair["only_b"], pair["images"]) == (2, 1, 5)


def test_spearman_interval_and_scene_means():
    x = torch.arange(20.0)
    assert metrics.spearman_interval(x, 2 * x + 1) == (pytest.approx(1.0), pytest.approx(1.0))
    noisy = x + 8 * torch.randn(20, generator=torch.Generator().manual_seed(1))
    low, high = metrics.spearman_interval(x, noisy)
    assert low < metrics.spearman(x, noisy) < high and metrics.spearman_interval(x, noisy) == (low, high)

    assert metrics.group_means(torch.tensor([1.0, 2.0, 4.0, 6.0]), ["b", "a", "b", "a"]).tolist() == [2.5, 4.0]
    names = ["calibration_left07", "calibration_left12", "campus_P1070493", "mosaic_aerial2-009", "shark2a"]
    assert [metrics.scene_of(n) for n in names] == ["calibration_left"] * 2 + ["campus_P", "mosaic_aerial", "shark"]
    assert [metrics.scene_of(n) for n in ("rocks2-r", "58060", "sharks")] == ["rocks2-r", "58060", "sharks"]


def test_jpeg_bytes_per_pixel_is_the_jpeg_size_of_the_view():
    flat = Image.new("RGB", (300, 200), (120, 130, 140))
    noise = Image.fromarray(torch.randint(0, 256, (200, 300, 3), dtype=torch.uint8).numpy())
    view = flat.resize((300, 200)).crop((50, 0, 250, 200)).resize((64, 64))
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=75)
    assert metrics.jpeg_bytes_per_pixel(flat, 64) == buffer.tell() / 64**2
    assert metrics.jpeg_bytes_per_pixel(noise, 64) > 2 * metrics.jpeg_bytes_per_pixel(flat, 64)


def test_labels_from_keys():
    assert labels_from_keys(["3_00001", "10_x"], r"^(\d+)_", "here").tolist() == [3, 10]
    with pytest.raises(ValueError, match="sample key 'cat' does not match"):
        labels_from_keys(["cat"], r"^(\d+)_", "here")


# --------------------------------------------------------------------------------------------------
# ToMe at a matched token count
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [9.4, 10.0, 22.6, 40.5, 64.9])
def test_matched_fixed_r_hits_the_target_within_one_token(target):
    backbone, model, pixels = tiny_timm(batch=4)
    num_prefix = backbone.num_prefix_tokens(model)
    r = matched_fixed_r(3, 65, target, num_prefix)
    with torch.no_grad():
        out = backbone.merged_forward(model, pixels, MergePolicy(mode="fixed_r", r=r))
    # Fixed r: every image keeps the same count, the one the schedule predicts, nearest the target.
    assert out.lengths.tolist() == [fixed_r_lengths(r, 65, num_prefix)[-1]] * 4
    assert abs(float(out.lengths.double().mean()) - target) <= 0.5


def test_matched_fixed_r_moves_merges_a_short_layer_cannot_make():
    # 12 layers from 65 tokens down to 2: late layers have too few tokens for an even share.
    r = matched_fixed_r(12, 65, 2.0, 1)
    assert sum(r) == 63 and fixed_r_lengths(r, 65, 1)[-1] == 2
    with pytest.raises(ValueError, match="target must be in"):
        matched_fixed_r(12, 65, 1.0, 1)
    # Three layers can at best halve three times: 65 -> 33 -> 17 -> 9.
    with pytest.raises(ValueError, match="cannot end at 3.4 per image"):
        matched_fixed_r(3, 65, 3.4, 1)


# --------------------------------------------------------------------------------------------------
# the recipe and the page, shrunken
# --------------------------------------------------------------------------------------------------


def _images(folder, count, seed, labelled=False):
    """Half flat-ish (few distinct regions), half noisy images of different sizes; label 0 / 1."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        noisy = i % 2
        if noisy:
            array = torch.randint(0, 256, (48 + 8 * i, 64, 3), generator=generator, dtype=torch.uint8)
        else:
            coarse = torch.randint(0, 256, (1, 3, 2, 2), generator=generator).float()
            array = torch.nn.functional.interpolate(coarse, size=(64, 48 + 8 * i), mode="bilinear")[0]
            array = array.permute(1, 2, 0).to(torch.uint8)
        name = f"{noisy}_{i:03d}.png" if labelled else f"{'abcdefghij'[i // 2]}-shot{i % 2}.png"
        Image.fromarray(array.numpy()).save(folder / name)
    return folder


def _tiny_calibration(tmp_path):
    """Thresholds (r = 4) of the tiny model on 4 images, with their shards at ``tmp_path / "shards"``."""
    from dymu_lightning.lit.run import calibrate

    images = _images(tmp_path / "images", 4, 0)
    calibration = load_recipe(
        "quickstart",
        [f"out_dir={tmp_path}/cal", f"data.images={images}", f"data.shards={tmp_path}/shards", *TINY_MODEL]
        + ["schedule.r=4", "data.global_batch_size=4", "trainer.progress_bar=false"],
    )
    return calibrate(calibration)


def test_eval_recipe_rejects_a_thresholds_file_for_another_image_size(tmp_path):
    path = _tiny_calibration(tmp_path)
    recipe = load_recipe(
        "eval_encoder",
        [f"out_dir={tmp_path}/eval", f"data.shards={tmp_path}/shards", f"variants.mid={path}", *TINY_MODEL]
        + ["model.image_size=48"],
    )
    with pytest.raises(
        ValueError,
        match=r"variants.mid \(.*\): calibrated at 64 px, but this run feeds 48 px images; "
        r"set model.image_size=64 or recalibrate",
    ):
        evaluate(recipe)
    with pytest.raises(ValueError, match="'full' and 'tome@...' are reserved"):
        check(load_recipe("eval_encoder", [f"out_dir={tmp_path}/e", f"variants.full={path}", *TINY_MODEL]))


def test_the_eval_recipe_is_packaged_and_checks(tmp_path, capsys):
    from dymu_lightning.cli import main

    recipe = load_recipe("eval_encoder", [f"out_dir={tmp_path}"])
    assert recipe.path.read_text().startswith("#") and "recipe=eval_encoder" in recipe.path.read_text()
    assert check(recipe).model.backbone == "dinov2_vits14_offline"
    assert main(["check", "recipe=eval_encoder", "probe.feature=pooled"]) == 2
    assert "probe.feature='pooled'; expected one of ('cls', 'mean')" in capsys.readouterr().err
    assert main(["check", "recipe=eval_encoder", f"variants.mid={tmp_path}/none.json"]) == 2
    assert f"variants.mid: no thresholds file at {tmp_path}/none.json" in capsys.readouterr().err
    assert main(["check", "recipe=eval_encoder", "device=tpu"]) == 2
    assert "device='tpu'; expected cpu, cuda or cuda:N" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["check", "recipe=eval_encoder", "device=cuda"]) == 2
        assert "device='cuda', but torch sees no CUDA device here" in capsys.readouterr().err


def test_a_random_init_evaluation_is_seeded(tmp_path):
    """Two evaluations of a random_init model build the same weights (``seed``), so they agree."""
    path = _tiny_calibration(tmp_path)
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        recipe = load_recipe(
            "eval_encoder",
            [f"out_dir={tmp_path}/{name}", f"data.shards={tmp_path}/shards", f"variants.mid={path}", *TINY_MODEL]
            + [f"seed={seed}", "complexity=false"],
        )
        variants = json.loads(evaluate(recipe).read_text())["variants"]
        runs.append({v: {k: x for k, x in e.items() if k != "images_per_second"} for v, e in variants.items()})
    assert runs[0] == runs[1]
    assert runs[0]["mid"]["cosine_cls"] != runs[2]["mid"]["cosine_cls"]  # another seed, other weights


@pytest.mark.slow
def test_results_page_on_a_shrunken_setting(tmp_path):
    setting = Setting(
        model=TINY_MODEL,
        photos_calibrate=str(_images(tmp_path / "photos_a", 8, 1)),
        photos_evaluate=str(_images(tmp_path / "photos_b", 10, 2)),
        photos_tokens_left={"low": 10, "mid": 22, "high": 44},
        probe_train=str(_images(tmp_path / "train", 12, 3, labelled=True)),
        probe_test=str(_images(tmp_path / "test", 8, 4, labelled=True)),
        # the native 64 px, and 32 px (16 patches + CLS = 17 tokens)
        probe_sizes={None: {"low": 10, "mid": 22, "high": 44}, 32: {"low": 4, "mid": 7, "high": 11}},
        batch_size=4,
        eval_batch_size=3,
        next_token_images=0,  # the small LLaVA's study has its own test (tests/test_next_token.py)
    )
    # Two invocations into one work folder, as a GPU machine and a CPU machine would share the work:
    # the page combines them.
    work, page = tmp_path / "work", tmp_path / "docs" / "results.md"
    for studies in (("probe",), ("photos",)):
        page = generate(replace(setting, studies=studies), work, page, f"results --studies {studies[0]}")
    text = page.read_text()
    record = json.loads((work / RECORD).read_text())
    assert [i["studies"] for i in record["invocations"]] == [["probe"], ["photos"]]
    assert all(not Path(t["output"]).is_absolute() for i in record["invocations"] for t in i["steps"])

    probe = json.loads((tmp_path / "work/eval/probe/metrics.json").read_text())
    small = json.loads((tmp_path / "work/eval/probe_32/metrics.json").read_text())
    photos = json.loads((tmp_path / "work/eval/photos/metrics.json").read_text())
    assert small["image_size"] == 32 and small["full_tokens"] == 17 and small["images"] == 8
    for study, images in ((probe, 8), (photos, 10)):
        assert study["images"] == images and study["full_tokens"] == 65
        names = list(study["variants"])
        assert names == ["full", "low", "mid", "high", "tome@low", "tome@mid", "tome@high"]
        full = study["variants"]["full"]
        assert full["tokens"]["mean"] == 65 and full["tokens"]["std"] == 0
        assert full["cosine_cls"]["min"] == pytest.approx(1.0) and full["cosine_mean"]["min"] == pytest.approx(1.0)
        means = [study["variants"][v]["tokens"]["mean"] for v in ("low", "mid", "high")]
        assert means == sorted(means) and means[-1] < 65
        for v in ("low", "mid", "high"):
            tome = study["variants"][f"tome@{v}"]
            # ToMe keeps the same count for every image, within one token of DyMU's mean.
            assert tome["tokens"]["std"] == 0
            assert abs(tome["tokens"]["mean"] - study["variants"][v]["tokens"]["mean"]) <= 1
    assert probe["probe"]["train_images"] == 12 and probe["probe"]["classes"] == 2
    assert probe["probe"]["linear_weight_decay"] in metrics.WEIGHT_DECAYS

    # Every accuracy and paired difference follows from the per-image predictions.
    with open(tmp_path / "work/eval/probe/per_image.csv") as stream:
        predictions = list(csv.DictReader(stream))
    right = {
        (kind, name): torch.tensor([row[f"{kind}:{name}"] == row["label"] for row in predictions])
        for kind in ("knn", "linear")
        for name in probe["variants"]
    }
    for (kind, name), correct in right.items():
        entry = probe["variants"][name]["probe"]
        assert entry[kind] == pytest.approx(float(correct.double().mean()))
        if name != "full":
            assert entry["vs_full"][kind] == metrics.paired_difference(correct, right[(kind, "full")])
        if name in ("low", "mid", "high"):
            assert entry["vs_tome"][kind] == metrics.paired_difference(correct, right[(kind, f"tome@{name}")])

    # The per-image table agrees with the summary, and the correlation is computed from it.
    with open(tmp_path / "work/eval/photos/per_image.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 10
    tokens = torch.tensor([float(row["tokens:mid"]) for row in rows])
    assert float(tokens.mean()) == pytest.approx(photos["variants"]["mid"]["tokens"]["mean"])
    bpp = torch.tensor([float(row["jpeg_bytes_per_pixel"]) for row in rows])
    mid = photos["variants"]["mid"]
    if "spearman_tokens_complexity" in mid:
        assert metrics.spearman(tokens, bpp) == pytest.approx(mid["spearman_tokens_complexity"])
        scenes = [row["scene"] for row in rows]  # "{letter}-shot{i % 2}": two frames per scene
        assert scenes == [metrics.scene_of(row["key"]) for row in rows] and photos["scenes"]["count"] == 5
        rho = metrics.spearman(metrics.group_means(tokens, scenes), metrics.group_means(bpp, scenes))
        assert mid["spearman_scenes"] == pytest.approx(rho)
        interval = metrics.spearman_interval(metrics.group_means(tokens, scenes), metrics.group_means(bpp, scenes))
        assert mid["spearman_scenes_interval"] == pytest.approx(list(interval))

    # The page: its tables, every plot it links (and nothing else), the machine, and the commands.
    for heading in ("## Targets", "## Token counts, fidelity", "## Machine", "## Commands"):
        assert heading in text
    # One probe section per side, smallest first, and the targets checked at each.
    assert text.index("## Probe accuracy and fidelity (Fashion-MNIST at 32 px)") < text.index(
        "## Probe accuracy and fidelity (Fashion-MNIST at 64 px)"
    )
    assert text.count("probe accuracy (32 px) |") == 2 and text.count("probe accuracy (64 px) |") == 2
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == sorted(
        f"results/{s}_{n}.png" for s in ("probe", "probe_32", "photos") for n in ("tokens", "complexity")
    )
    assert sorted(p.name for p in (page.parent / "results").iterdir()) == sorted(Path(p).name for p in linked)
    assert all((page.parent / p).is_file() and (page.parent / p).read_bytes()[:4] == b"\x89PNG" for p in linked)
    assert text.count("python -m dymu_lightning recipe=quickstart") == 9
    assert text.count("python -m dymu_lightning recipe=eval_encoder") == 4
    assert text.count("data.global_batch_size=3") == 4  # the evaluations' batch; calibrations keep 4
    assert f"| mid | {probe['variants']['mid']['tokens']['mean']:.1f} ±" in text

    # The page is a function of the recorded runs: rendering again, elsewhere, measures nothing new,
    # also from a work folder that moved.
    (tmp_path / "work").rename(tmp_path / "moved")
    again = render(tmp_path / "moved", tmp_path / "elsewhere" / "results.md")
    assert again.read_text() == text and (tmp_path / "elsewhere/results/probe_32_tokens.png").is_file()


def test_target_verdicts_say_when_the_target_is_inside_the_interval():
    assert _verdict(0.62, 0.6, (0.41, 0.80)) == "yes (the target lies inside the 95% interval)"
    assert _verdict(0.62, 0.6, (0.61, 0.70)) == "yes"
    assert _verdict(0.42, 0.6, (0.25, 0.59)) == "**no**"
    assert _verdict(0.986, 0.99, (0.979, 0.993)) == "**no** (the target lies inside the 95% interval)"
    assert _verdict(0.5, 0.6, None) == "**no**"


def test_an_invocation_replaces_the_studies_it_ran_and_keeps_the_others(tmp_path):
    def invocation(command, studies, outputs):
        steps = [Step(study, "eval_encoder", [], tmp_path / out) for study, out in outputs]
        return Invocation(command, 1.0, "here", list(studies), steps)

    _record(tmp_path, invocation("all", STUDIES, [("probe", "eval/probe_112/m.json"), ("photos", "eval/p/m.json")]))
    _record(tmp_path, invocation("gpu", ["probe"], [("probe", "eval/probe_224/m.json")]))
    record = json.loads((tmp_path / RECORD).read_text())["invocations"]
    assert [(i["command"], i["studies"]) for i in record] == [("all", ["photos", "next_token"]), ("gpu", ["probe"])]
    assert [t["output"] for t in record[0]["steps"]] == ["eval/p/m.json"]
    # Running the others again leaves only the newest of each.
    _record(tmp_path, invocation("cpu", ["photos", "next_token"], []))
    record = json.loads((tmp_path / RECORD).read_text())["invocations"]
    assert [i["command"] for i in record] == ["gpu", "cpu"]


def test_the_results_command_line_names_its_non_default_flags(monkeypatch, tmp_path):
    """The page shows the command that made each part: the flags that differ from the defaults."""
    from dymu_lightning.eval import results

    seen = {}

    def fake_generate(setting, work, page, command):
        seen.update(setting=setting, command=command)
        return page

    monkeypatch.setattr(results, "generate", fake_generate)
    results.main(["--studies", "probe", "--accelerator", "cuda", "--eval-batch", "256", "--work", str(tmp_path)])
    assert seen["command"] == ("python -m dymu_lightning results --studies probe --accelerator cuda --eval-batch 256")
    setting = seen["setting"]
    assert (setting.studies, setting.accelerator, setting.eval_batch_size) == (("probe",), "cuda", 256)
    assert setting.batch_size == 16  # calibration batches keep the published size: they shape the thresholds
    results.main(["--work", str(tmp_path)])
    assert seen["command"] == "python -m dymu_lightning results" and seen["setting"].studies == STUDIES
