"""Evaluation: metrics against hand-computed values, ToMe's matched counts, the eval recipe, and the
results page: rendered from a recorded shrunken run (tests/fixtures/results), and one live study on a
tiny random DINOv2."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from dymu_lightning.cli import main as cli_main
from dymu_lightning.config import load_recipe
from dymu_lightning.core import MergePolicy
from dymu_lightning.core.schedule import fixed_r_lengths, matched_fixed_r
from dymu_lightning.data.source import labels_from_keys
from dymu_lightning.eval import metrics, studies
from dymu_lightning.eval.page import (
    VARIANTS,
    collect,
    copy_plots,
    markdown,
    not_behind_tome,
    render,
    verdict,
    within_series,
)
from dymu_lightning.eval.run import check, evaluate
from dymu_lightning.eval.schema import (
    RECORD,
    EvalMetrics,
    NextTokenMetrics,
    PairedDifference,
    ProbeScores,
    ResultsRecord,
)
from dymu_lightning.eval.studies import STUDIES, Invocation, Setting, Step, generate, record_invocation
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
    with pytest.raises(ValueError, match=r"data.crops and data.processor are calibration settings; eval_encoder"):
        check(load_recipe("eval_encoder", [f"out_dir={tmp_path}/e", "data.crops=anyres", *TINY_MODEL]))


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


# --------------------------------------------------------------------------------------------------
# the results page: rendered from a recorded work folder (tests/fixtures/results, see record.py there)
# --------------------------------------------------------------------------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "results"
WORK = FIXTURE / "work"


def _table(text: str, *headings: str) -> dict[str, list[str]]:
    """The first table after ``headings`` (each found after the one before) on a page: first cell ->
    the other cells."""
    start = 0
    for heading in headings:
        start = text.index(heading, start)
    lines = text[start:].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


def _csv(study: str) -> list[dict[str, str]]:
    with open(WORK / "eval" / study / "per_image.csv") as stream:
        return list(csv.DictReader(stream))


def _tokens_cell(counts: list[int]) -> str:
    values = torch.tensor(counts, dtype=torch.float64)
    return f"{values.mean():.1f} ± {values.std(correction=0):.1f} ({min(counts)}–{max(counts)})"


def test_the_fixture_renders_to_the_golden_page_from_anywhere(tmp_path):
    """The page is a function of the recorded files alone, byte for byte (expected.md was rendered
    by the code of the day the fixture was recorded; docs/results.md comes from the same code)."""
    shutil.copytree(WORK, tmp_path / "moved")  # a work folder that moved: outputs are relative to it
    page = render(tmp_path / "moved", tmp_path / "docs" / "results.md")
    assert page.read_text() == (FIXTURE / "expected.md").read_text()
    # Every plot of the probe and photos studies is linked and copied next to the page, and nothing else.
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())
    assert sorted(linked) == sorted(
        f"results/{s}_{n}.png" for s in ("probe", "probe_32", "photos") for n in ("tokens", "complexity")
    )
    assert sorted(p.name for p in (tmp_path / "docs" / "results").iterdir()) == sorted(Path(p).name for p in linked)


def test_the_fine_tuning_section_shows_the_study_summaries_and_refreshes_alone(tmp_path):
    """A study command's summary.txt (or only its plot) shows in the fine-tuning section; rewriting that
    section alone, without the results' work folder, gives the page a full render would give."""
    from dymu_lightning.eval.page import refresh_finetune_section

    docs = tmp_path / "docs"
    plain = render(WORK, docs / "results.md").read_text()
    (docs / "finetune_results").mkdir()
    (docs / "finetune_results" / "summary.txt").write_text("| a table |\n")
    (docs / "vlm_results").mkdir()
    (docs / "vlm_results" / "accuracy_tokens.png").write_bytes(b"png")
    assert refresh_finetune_section(docs / "results.md") == docs / "results.md"
    refreshed = (docs / "results.md").read_text()
    assert refreshed == render(WORK, docs / "results.md").read_text()
    assert (
        refreshed.replace(
            "\n| a table |\n\n**Study 2** ([vlm_results.md](vlm_results.md)): its table is on that page.\n\n"
            "![vlm_results: accuracy against tokens](vlm_results/accuracy_tokens.png)\n",
            "",
        )
        == plain
    )
    assert refresh_finetune_section(tmp_path / "absent.md") is None


def test_every_recorded_file_round_trips_through_its_schema():
    """The dataclasses read every file the writers wrote and write it back to the same text."""
    files = [(path, EvalMetrics) for path in sorted(WORK.glob("eval/*/metrics.json"))]
    files += [(WORK / "next_token" / "metrics.json", NextTokenMetrics), (WORK / RECORD, ResultsRecord)]
    assert len(files) == 6
    for path, schema in files:
        assert json.dumps(schema.load(path).to_json(), indent=2) + "\n" == path.read_text(), path
    with pytest.raises(ValueError, match="EvalMetrics: no 'variants'"):
        EvalMetrics.from_json({k: v for k, v in json.loads(files[0][0].read_text()).items() if k != "variants"})


def test_the_probe_tables_follow_from_the_per_image_predictions(tmp_path):
    text = render(WORK, tmp_path / "results.md").read_text()
    for study, side in (("probe_32", 32), ("probe", 64)):
        rows = _csv(study)
        names = [c.removeprefix("tokens:") for c in rows[0] if c.startswith("tokens:")]
        right = {
            (kind, name): torch.tensor([row[f"{kind}:{name}"] == row["label"] for row in rows])
            for kind in ("knn", "linear")
            for name in names
        }
        accuracy = {key: float(correct.double().mean()) for key, correct in right.items()}
        section = f"## Probe accuracy and fidelity (Fashion-MNIST at {side} px)"
        table = _table(text, section)
        assert list(table) == names
        for name in names:
            tokens, *_, knn, linear = table[name]
            assert tokens == _tokens_cell([int(row[f"tokens:{name}"]) for row in rows])
            for kind, cell in (("knn", knn), ("linear", linear)):
                share = accuracy[(kind, name)] / accuracy[(kind, "full")]
                assert cell == f"{accuracy[(kind, name)]:.4f} ({share:.1%})"
        pairs = _table(text, section, f"same {len(rows)} test images")
        for name in names[1:]:
            others = ["full"] + ([f"tome@{name}"] if f"tome@{name}" in names else [])
            for other in others:
                cells = pairs[f"{name} − {other}"]
                for kind, cell in zip(("knn", "linear"), cells, strict=True):
                    pair = metrics.paired_difference(right[(kind, name)], right[(kind, other)])
                    shown = f"{100 * pair['difference']:+.2f} [{100 * pair['low']:+.2f}, {100 * pair['high']:+.2f}]"
                    assert cell == f"{shown} ({pair['only_a']} / {pair['only_b']})"
        # The targets: DyMU-mid's share of the full model's accuracy, and DyMU against ToMe per count.
        targets = _table(text, "## Targets")
        for kind in ("knn", "linear"):
            measured, met = targets[f"DyMU-mid keeps ≥ 99% of the full model's {kind} probe accuracy ({side} px)"]
            share = accuracy[(kind, "mid")] / accuracy[(kind, "full")]
            assert measured.startswith(f"{share:.2%} [") and met.startswith("yes" if share >= 0.99 else "**no**")
            measured, met = targets[f"DyMU's {kind} accuracy ≥ ToMe's at every matched count ({side} px)"]
            ahead = all(accuracy[(kind, v)] >= accuracy[(kind, f"tome@{v}")] for v in ("low", "mid", "high"))
            assert met.startswith("yes" if ahead else "**no**")
            for v in ("low", "mid", "high"):
                assert f"{v}: {accuracy[(kind, v)]:.4f} vs {accuracy[(kind, f'tome@{v}')]:.4f}" in measured


def test_the_photos_table_follows_from_the_per_image_counts(tmp_path):
    text = render(WORK, tmp_path / "results.md").read_text()
    rows = _csv("photos")
    bpp = torch.tensor([float(row["jpeg_bytes_per_pixel"]) for row in rows])
    scenes = [row["scene"] for row in rows]
    assert scenes == [metrics.scene_of(row["key"]) for row in rows]
    table = _table(text, "## Token counts, fidelity and image complexity")
    assert f"per scene ({len(set(scenes))} scenes)" in text
    for name, (tokens, _, _, per_image, per_scene) in table.items():
        counts = [int(row[f"tokens:{name}"]) for row in rows]
        assert tokens == _tokens_cell(counts)
        if len(set(counts)) == 1:  # full and ToMe: one count for every image, no correlation
            assert per_image == per_scene == "–"
            continue
        values = torch.tensor(counts, dtype=torch.float64)
        assert per_image.startswith(f"{metrics.spearman(values, bpp):.3f} [")
        by_scene = metrics.spearman(metrics.group_means(values, scenes), metrics.group_means(bpp, scenes))
        assert per_scene.startswith(f"{by_scene:.3f} [")
    rho = metrics.spearman(torch.tensor([float(row["tokens:mid"]) for row in rows]), bpp)
    measured, met = _table(text, "## Targets")[
        f"Spearman(tokens, complexity) ≥ 0.6 on natural photos (DyMU-mid, {len(rows)} held-out photos)"
    ]
    assert measured.startswith(f"{rho:.3f}") and met.startswith("yes" if rho >= 0.6 else "**no**")
    # The in-sample sentence: the same thresholds on their own calibration photos.
    inside = _csv("photos_calibration")
    complexity = torch.tensor([float(row["jpeg_bytes_per_pixel"]) for row in inside])
    rhos = [metrics.spearman(torch.tensor([float(row[f"tokens:{v}"]) for row in inside]), complexity) for v in VARIANTS]
    in_sample = ", ".join(f"{v} {rho:.3f}" for v, rho in zip(VARIANTS, rhos, strict=True))
    assert f"On the {len(inside)} calibration photos" in text
    assert f"Spearman(tokens, complexity) is {in_sample}." in text


def test_the_next_token_table_follows_from_the_per_image_values(tmp_path):
    text = render(WORK, tmp_path / "results.md").read_text()
    per_image = json.loads((WORK / "next_token" / "metrics.json").read_text())["per_image"]
    table = _table(text, "## Next-token fidelity (small LLaVA)")
    assert list(table) == [name for name in per_image if name != "names"]
    for name, (rows, kl, median, top1) in table.items():
        values = torch.tensor(per_image[name]["kl"], dtype=torch.float64)
        assert rows == f"{sum(per_image[name]['visual_rows']) / len(values):.1f}"
        assert kl == f"{values.mean():.4f} ± {values.std():.4f}" and median == f"{values.median():.4f}"
        assert top1 == f"{sum(per_image[name]['top1']) / len(values):.0%}"
    assert f"on {len(per_image['names'])} held-out photos" in text


def test_target_verdicts_say_when_the_target_is_inside_the_interval():
    assert verdict(0.62, 0.6, (0.41, 0.80)) == "yes (the target lies inside the 95% interval)"
    assert verdict(0.62, 0.6, (0.61, 0.70)) == "yes"
    assert verdict(0.42, 0.6, (0.25, 0.59)) == "**no**"
    assert verdict(0.986, 0.99, (0.979, 0.993)) == "**no** (the target lies inside the 95% interval)"
    assert verdict(0.5, 0.6, None) == "**no**"


def test_the_tome_verdict_flips_with_the_accuracies():
    def scores(accuracy, high=None):
        vs_tome = None if high is None else {"knn": PairedDifference(0.0, -0.01, high, 1, 1, 100)}
        return ProbeScores(knn=accuracy, linear=accuracy, vs_tome=vs_tome)

    tome = scores(0.80)
    assert not_behind_tome([("low", scores(0.81), tome), ("mid", scores(0.80), tome)], "knn") == "yes"
    behind = [("low", scores(0.81), tome), ("mid", scores(0.79, high=0.01), tome)]
    assert not_behind_tome(behind, "knn") == "**no** (mid: behind by less than the noise, the 95% interval includes 0)"
    clearly = [("low", scores(0.70, high=-0.05), tome), ("mid", scores(0.79, high=0.01), tome)]
    assert not_behind_tome(clearly, "knn") == "**no**"


def test_the_within_series_sentence_counts_the_weak_series():
    weak = within_series({"campus_P": 0.61, "calibration_left": -0.01, "flowers": 0.17})
    assert weak.startswith("Within 2 of these 3 series the token counts follow complexity weakly or not at all")
    assert "`campus_P` 0.61, `calibration_left` -0.01, `flowers` 0.17), yet" in weak
    strong = within_series({"campus_P": 0.61, "calibration_left": 0.45})
    assert strong.startswith("Within each of these 2 series the token counts follow complexity (Spearman 0.4 or more")
    assert within_series({}).startswith("None of the largest series has three images or more whose counts vary")


def test_the_pages_sentences_flip_when_the_numbers_do():
    """The recorded photos have no series of three; given within-series correlations, the page says
    what they show, and a verdict follows its number across the target."""
    c = collect(WORK)
    assert "None of the largest series" in markdown(c)
    c.studies["photos"].scenes.within["mid"] = {"a-shot": 0.1, "b-shot": 0.9}
    assert "Within 1 of these 2 series the token counts follow complexity weakly" in markdown(c)
    c.studies["photos"].scenes.within["mid"] = {"a-shot": 0.5, "b-shot": 0.9}
    assert "Within each of these 2 series the token counts follow complexity (" in markdown(c)
    mid = c.studies["photos"].variants["mid"]
    row = "| Spearman(tokens, complexity) ≥ 0.6 on natural photos (DyMU-mid, 10 held-out photos) | "
    assert f"{row}0.679 [0.05, 0.89] | yes (the target lies inside the 95% interval) |" in markdown(c)
    mid.spearman_tokens_complexity, mid.spearman_interval = 0.5, (0.1, 0.59)
    assert f"{row}0.500 [0.10, 0.59] | **no** |" in markdown(c)


def test_the_published_pages_conclusions_follow_from_its_numbers():
    """docs/results.md was rendered from a work folder that is not here; its verdicts and its
    within-series sentence are the ones the renderer draws from the numbers printed on it."""
    text = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    within = re.search(r"within each: ([^)]*)\)", text).group(1)
    shown = {name: float(rho) for name, rho in re.findall(r"`([^`]+)` (-?[\d.]+)", within)}
    assert within_series(shown) in text
    checked = 0
    for measured, met in _table(text, "## Targets").values():
        tome = re.findall(r"(\w+): ([\d.]+) vs ([\d.]+), [+-][\d.]+ \[([+-][\d.]+), ([+-][\d.]+)\] pts", measured)
        share = re.fullmatch(r"([\d.]+)% \[([\d.]+)%, ([\d.]+)%\].*", measured)
        rho = re.fullmatch(r"(-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]", measured)
        if tome:  # DyMU against ToMe at each count: accuracies, and the paired interval in points
            pairs = []
            for v, a, b, low, high in tome:
                interval = {"knn": PairedDifference(0, float(low), float(high), 0, 0, 0)}
                pairs.append((v, ProbeScores(float(a), float(a), vs_tome=interval), ProbeScores(float(b), float(b))))
            assert met == not_behind_tome(pairs, "knn"), measured
        elif share:
            value, low, high = (float(x) / 100 for x in share.groups())
            assert met == verdict(value, 0.99, (low, high)), measured
        elif rho:
            value, low, high = (float(x) for x in rho.groups())
            assert met == verdict(value, 0.6, (low, high)), measured
        else:
            continue
        checked += 1
    assert checked == 10  # per side: two shares of the full model, two comparisons with ToMe; two correlations


def test_an_invocation_replaces_the_studies_it_ran_and_keeps_the_others(tmp_path):
    def invocation(command, studies, outputs):
        steps = [Step(study, "eval_encoder", [], tmp_path / out) for study, out in outputs]
        return Invocation(command, 1.0, "here", list(studies), steps)

    record_invocation(
        tmp_path, invocation("all", STUDIES, [("probe", "eval/probe_112/m.json"), ("photos", "eval/p/m.json")])
    )
    record_invocation(tmp_path, invocation("gpu", ["probe"], [("probe", "eval/probe_224/m.json")]))
    record = json.loads((tmp_path / RECORD).read_text())["invocations"]
    assert [(i["command"], i["studies"]) for i in record] == [("all", ["photos", "next_token"]), ("gpu", ["probe"])]
    assert [t["output"] for t in record[0]["steps"]] == ["eval/p/m.json"]
    assert record[1]["next_token"] is None  # written as null when the study did not run
    # Running the others again leaves only the newest of each.
    record_invocation(tmp_path, invocation("cpu", ["photos", "next_token"], []))
    record = json.loads((tmp_path / RECORD).read_text())["invocations"]
    assert [i["command"] for i in record] == ["gpu", "cpu"]


def test_the_results_command_line_names_its_non_default_flags(monkeypatch, tmp_path):
    """The page shows the command that made each part: the flags that differ from the defaults."""
    seen = {}

    def fake_generate(setting, work, page, command):
        seen.update(setting=setting, command=command)
        return page

    monkeypatch.setattr(studies, "generate", fake_generate)
    assert (
        cli_main(
            ["results", "--studies", "probe", "--accelerator", "cuda", "--eval-batch", "256", "--work", str(tmp_path)]
        )
        == 0
    )
    assert seen["command"] == ("python -m dymu_lightning results --studies probe --accelerator cuda --eval-batch 256")
    setting = seen["setting"]
    assert (setting.studies, setting.accelerator, setting.eval_batch_size) == (("probe",), "cuda", 256)
    assert setting.batch_size == 16  # calibration batches keep the published size: they shape the thresholds
    assert cli_main(["results", "--work", str(tmp_path)]) == 0
    assert seen["command"] == "python -m dymu_lightning results" and seen["setting"].studies == STUDIES


@pytest.mark.slow
def test_a_live_probe_study_writes_what_the_page_reads(tmp_path):
    """What the fixture cannot pin: today's calibrations and evaluations, run by the results command,
    write files that the schema reads back unchanged, whose summaries follow from their per-image
    rows, and whose real plots the page links. One probe study at 32 px on the tiny model."""
    setting = Setting(
        model=TINY_MODEL,
        probe_train=str(_images(tmp_path / "train", 12, 3, labelled=True)),
        probe_test=str(_images(tmp_path / "test", 8, 4, labelled=True)),
        probe_sizes={32: {"low": 6, "mid": 8, "high": 11}},  # 16 patches + CLS = 17 tokens
        batch_size=4,
        eval_batch_size=3,
        studies=("probe",),
    )
    work = tmp_path / "work"
    page = generate(setting, work, tmp_path / "docs" / "results.md", "results --studies probe")
    record = json.loads((work / RECORD).read_text())
    assert [i["studies"] for i in record["invocations"]] == [["probe"]]
    assert all(not Path(t["output"]).is_absolute() for t in record["invocations"][0]["steps"])
    assert [t["recipe"] for t in record["invocations"][0]["steps"]] == ["quickstart"] * 3 + ["eval_encoder"]
    path = work / "eval" / "probe_32" / "metrics.json"
    study = EvalMetrics.load(path)
    assert json.dumps(study.to_json(), indent=2) + "\n" == path.read_text()
    assert (study.image_size, study.full_tokens, study.images) == (32, 17, 8)
    assert list(study.variants) == ["full", "low", "mid", "high", "tome@low", "tome@mid", "tome@high"]
    assert study.probe.train_images == 12 and study.probe.classes == 2
    assert study.probe.linear_weight_decay in metrics.WEIGHT_DECAYS
    means = [study.variants[v].tokens.mean for v in ("low", "mid", "high")]
    assert means == sorted(means) and means[-1] < 17
    for v in ("low", "mid", "high"):  # ToMe keeps one count for every image, within one token of DyMU's mean
        tome = study.variants[f"tome@{v}"].tokens
        assert tome.std == 0 and abs(tome.mean - study.variants[v].tokens.mean) <= 1

    # Every accuracy, paired difference and correlation follows from the per-image rows.
    with open(path.parent / "per_image.csv") as stream:
        rows = list(csv.DictReader(stream))
    right = {
        (kind, name): torch.tensor([row[f"{kind}:{name}"] == row["label"] for row in rows])
        for kind in ("knn", "linear")
        for name in study.variants
    }
    for (kind, name), correct in right.items():
        scores = study.variants[name].probe
        assert getattr(scores, kind) == pytest.approx(float(correct.double().mean()))
        if name != "full":
            assert scores.vs_full[kind].to_json() == metrics.paired_difference(correct, right[(kind, "full")])
        if name in ("low", "mid", "high"):
            assert scores.vs_tome[kind].to_json() == metrics.paired_difference(correct, right[(kind, f"tome@{name}")])
    bpp = torch.tensor([float(row["jpeg_bytes_per_pixel"]) for row in rows])
    for name, entry in study.variants.items():
        tokens = torch.tensor([float(row[f"tokens:{name}"]) for row in rows])
        assert float(tokens.mean()) == pytest.approx(entry.tokens.mean)
        if entry.spearman_tokens_complexity is not None:
            assert metrics.spearman(tokens, bpp) == pytest.approx(entry.spearman_tokens_complexity)

    text = page.read_text()
    assert text == markdown(replace(collect(work), plots=copy_plots(work, collect(work), page)))
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == ["results/probe_32_complexity.png", "results/probe_32_tokens.png"]
    assert all((page.parent / p).read_bytes()[:4] == b"\x89PNG" for p in linked)
    assert text.count("python -m dymu_lightning recipe=quickstart") == 3
    assert text.count("python -m dymu_lightning recipe=eval_encoder") == 1
    assert text.count("data.global_batch_size=3") == 1  # the evaluation's batch; calibrations keep 4
