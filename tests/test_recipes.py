"""Every packaged recipe validates, and runs end to end: quickstart on its real weights, the others on
random weights of their real architectures, on a shrunken setting (two photos)."""

from __future__ import annotations

import pytest
import torch

from dymu_lightning.backbones import get_backbone
from dymu_lightning.backbones.thresholds import ThresholdsFile
from dymu_lightning.cli import main
from dymu_lightning.config import ConfigError, load_recipe, packaged_recipes
from dymu_lightning.core.schedule import merges_per_layer
from dymu_lightning.lit.run import calibrate, check
from dymu_lightning.loading import probe_shape

# The calibration recipes; the evaluation and finetune recipes are checked in tests/test_eval.py and test_finetune.py.
RECIPES = sorted(name for name, path in packaged_recipes().items() if "\ntask: calibrate" in path.read_text())
# Recipes that need a user's shards get the bundled photos instead.
SHRUNKEN = ["data.images=assets:skimage", "data.max_images=2", "data.global_batch_size=2", "trainer.progress_bar=false"]


def test_the_calibration_recipes_are_packaged():
    assert {
        "quickstart",
        "llava_calib",
        "clip_calib",
        "siglip_calib",
        "siglip_so400m_calib",
        "qwen2_vl_calib",
        "qwen2_5_vl_calib",
        "qwen3_vl_calib",
    } <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_passes_check(name, tmp_path):
    recipe = load_recipe(name, [f"data.shards={tmp_path}"] if name != "quickstart" else [])
    config = check(recipe)
    assert config.model.backbone in (
        "dinov2_vits14_offline",
        "hf_clip",
        "hf_siglip",
        "hf_dinov2",
        "hf_qwen2_vl",
        "hf_qwen2_5_vl",
        "hf_qwen3_vl",
    )
    assert recipe.path.read_text().startswith("#"), "a recipe opens with a comment showing its launch command"
    assert f"recipe={name}" in recipe.path.read_text()


def test_llava_variants_set_r():
    base = ["data.shards=/tmp/x"]
    for variant, r in {"low": 21, "mid": 16, "high": 8}.items():
        config = load_recipe("llava_calib", [*base, f"schedule.variant={variant}"]).to_object()
        assert config.schedule.variants[config.schedule.variant] == r
    with pytest.raises(
        ConfigError, match=r"schedule.variant='medium' is not one of schedule.variants \(high, low, mid\)"
    ):
        check(load_recipe("llava_calib", [*base, "schedule.variant=medium"]))


def test_missing_mandatory_value_names_the_key():
    with pytest.raises(
        ConfigError, match=r"llava_calib.yaml: 'data.shards' has no value; set it in the recipe or with data.shards=..."
    ):
        check(load_recipe("llava_calib"))


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["check", "recipe=quickstart", "data.global_batchsize=8"]) == 2
    error = capsys.readouterr().err
    assert "unknown key 'data.global_batchsize'; did you mean 'data.global_batch_size'?" in error
    assert "quickstart.yaml" in error and "Traceback" not in error


RANDOM_ARCH = [n for n in RECIPES if n != "quickstart"]


@pytest.mark.parametrize("name", RANDOM_ARCH)
def test_recipe_schedule_fits_its_real_architecture(name):
    """Each packaged variant leaves tokens at every merging layer of the full-size architecture (built on
    the meta device: shapes only, at the recipe's image size; for the native-size Qwen towers, the
    reference image of their schedule check), and its total merges are what the variant promises."""
    recipe = load_recipe(name, ["data.shards=/unused", "model.random_init=true"]).to_object()
    shape = probe_shape(recipe.model)
    layers, tokens, prefix = shape.num_layers, shape.tokens, shape.num_prefix
    merging = recipe.model.num_blocks or layers
    for variant, r_value in recipe.schedule.variants.items():
        r = merges_per_layer(layers, recipe.schedule.kind, r=r_value, tokens=tokens, merging_layers=merging)
        assert sum(r) == r_value * merging, variant
        left = tokens
        for merges in r:  # a bipartite layer removes at most half of its mergeable tokens
            assert merges <= (left - prefix) // 2, (variant, left, merges)
            left -= merges


def _depth_key(arch: dict) -> str:
    """The depth's key in a recipe's ``model.arch``: HF ViT configs say num_hidden_layers, Qwen's towers depth."""
    return "depth" if "depth" in arch else "num_hidden_layers"


@pytest.mark.slow
@pytest.mark.parametrize("name", RANDOM_ARCH)
def test_recipe_runs_on_random_weights_of_its_architecture(name, tmp_path):
    """End to end on two blocks of the recipe's real widths, image size and patch size (the full depth's
    arithmetic is checked above without running it)."""
    arch = load_recipe(name, ["data.shards=/unused"]).to_object().model.arch
    depth = [f"model.arch.{_depth_key(arch)}=2"]
    recipe = load_recipe(name, [*depth, "data.shards=/unused"]).to_object()
    num_blocks = 1 if recipe.model.num_blocks is not None else None  # keep the read-before-the-last-block path
    overrides = [
        "model.random_init=true",
        *depth,
        f"model.num_blocks={'null' if num_blocks is None else num_blocks}",
        f"out_dir={tmp_path / 'out'}",
        f"data.shards={tmp_path / 'shards'}",
        *SHRUNKEN,
    ]
    path = calibrate(load_recipe(name, overrides))
    result = ThresholdsFile.load(path)
    recipe = load_recipe(name, overrides).to_object()
    backbone = get_backbone(recipe.model.backbone)
    with torch.device("meta"):
        model = backbone.build(recipe.model.arch)
    result.check_matches(backbone, model)
    assert result.images_seen == 2 and result.source == "random" and result.num_layers == 2
    merging = recipe.model.num_blocks or backbone.num_layers(model)
    assert sum(result.r) == recipe.schedule.variants[recipe.schedule.variant] * merging
    if recipe.data.crops == "native":  # each image merges from its own count, at its own size
        assert result.inputs["kind"] == "native"
        assert result.tokens["mean"] == pytest.approx(result.extra["full_tokens"]["mean"] - sum(result.r))
    else:
        assert result.tokens["mean"] == result.tokens["full"] - sum(result.r)


@pytest.mark.slow
def test_quickstart_runs_on_real_weights(tmp_path):
    path = calibrate(load_recipe("quickstart", [f"out_dir={tmp_path}", "trainer.progress_bar=false"]))
    result = ThresholdsFile.load(path)
    backbone = get_backbone("dinov2_vits14_offline")
    result.check_matches(backbone, backbone.load())
    assert result.images_seen == 26 and result.tokens["mean"] == 257 - 12 * 12
    assert result.tokens["min"] < 60 < 160 < result.tokens["max"]  # flat and busy photos differ widely
    assert {p.name for p in tmp_path.iterdir()} >= {"thresholds.json", "report.md", "tokens.png", "thresholds.png"}
