"""Issue 16, hardening: each bad input gets one line naming the file and the key, before any work."""

from __future__ import annotations

import json

import pytest
from tests_support import recipe_file, run

from dymu_lightning.backbones.thresholds import ThresholdsFile


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, shards):
    """A finished tiny calibration: (its thresholds.json path, the parsed JSON)."""
    folder = tmp_path_factory.mktemp("calibrated")
    run(recipe_file(folder, shards))
    path = folder / "out" / "thresholds.json"
    return path, json.loads(path.read_text())


# ----- 2. thresholds.json is validated on load -----------------------------------------------------------
def _edit(data: dict, key: str, value) -> dict:
    data = json.loads(json.dumps(data))
    if "[" in key:
        name, index = key.rstrip("]").split("[")
        data[name][int(index)] = value
    elif value is KeyError:
        del data[key]
    else:
        data[key] = value
    return data


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "thresholds[1]",
            "0.9",
            r"'thresholds\[1\]' must be null or a number in \[0, 1\] \(a cosine similarity\), "
            r"got \"0.9\"",
        ),
        ("thresholds[0]", True, r"'thresholds\[0\]' must be null or a number in \[0, 1\] .*, got true"),
        ("thresholds[2]", 5.0, r"'thresholds\[2\]' must be .*, got 5.0"),
        ("thresholds[2]", -1, r"'thresholds\[2\]' must be .*, got -1"),
        ("thresholds[0]", float("inf"), r"'thresholds\[0\]' must be .*, got Infinity"),
        ("r", KeyError, r"missing key 'r'"),
        ("num_layers", "12", r"'num_layers' must be an integer >= 1, got \"12\""),
        ("r", [5, 5], r"'r' must be a list of 3 values \(num_layers\), got \[5, 5\]"),
        ("r[0]", -2, r"'r\[0\]' must be an integer >= 0, got -2"),
        ("num_blocks", 7, r"'num_blocks' must be null or an integer in 1..3 \(num_layers\), got 7"),
        ("image_size", 0, r"'image_size' must be an integer >= 1, got 0"),
        ("partial", "no", r"'partial' must be true or false, got \"no\""),
    ],
)
def test_thresholds_file_values_are_validated_with_file_and_key(tmp_path, calibrated, key, value, message):
    bad = tmp_path / "thresholds.json"
    bad.write_text(json.dumps(_edit(calibrated[1], key, value)))
    with pytest.raises(ValueError, match=rf"^{bad}: {message}$"):
        ThresholdsFile.load(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[0.5, 0.5]", r"not a valid thresholds file \(a JSON list, not an object\)"),
        ('{"backbone": "timm_vit", "num_la', r"not a valid thresholds file \(not JSON: Unterminated string"),
        ("", r"not a valid thresholds file \(not JSON: Expecting value"),
    ],
)
def test_thresholds_file_that_is_not_an_object_names_the_file(tmp_path, text, message):
    bad = tmp_path / "thresholds.json"
    bad.write_text(text)
    with pytest.raises(ValueError, match=rf"^{bad}: {message}"):
        ThresholdsFile.load(bad)


def test_a_valid_thresholds_file_still_loads(calibrated):
    assert ThresholdsFile.load(calibrated[0]).num_layers == 3


# ----- 1. apply_dymu refuses thresholds of another image size or depth -----------------------------------
def _llava_thresholds(tmp_path, **changes):
    from test_llava import thresholds_file

    return thresholds_file(**changes).save(tmp_path / "thresholds.json")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"image_size": 24},
            r"thresholds.json: calibrated at 24 px, but this run feeds 32 px images; set model.image_size=24 or "
            r"recalibrate at 32 px$",
        ),
        (
            {"num_blocks": None},
            r"thresholds.json: calibrated with num_blocks=null \(all\), but this run reads features after "
            r"num_blocks=2; recalibrate with model.num_blocks=2$",
        ),
    ],
)
def test_apply_dymu_refuses_another_image_size_or_depth(tmp_path, changes, message):
    from tests_support import tiny_llava

    from dymu_lightning.backbones.hf_llava import apply_dymu, is_dymu

    model = tiny_llava()
    with pytest.raises(ValueError, match=message):
        apply_dymu(model, _llava_thresholds(tmp_path, **changes))
    assert not is_dymu(model)


def test_all_blocks_with_or_without_the_final_norm_merge_alike(tmp_path, calibrated):
    """num_blocks null and num_blocks = num_layers calibrate the same merges: both fit either."""
    from tests_support import TINY_TIMM_ARCH

    from dymu_lightning.backbones import get_backbone

    backbone = get_backbone("timm_vit")
    result = ThresholdsFile.load(calibrated[0])
    result.check_fits(backbone, backbone.build(TINY_TIMM_ARCH), 64, 3)
    with pytest.raises(ValueError, match=r"num_blocks=null \(all\), but this run reads features after num_blocks=2"):
        result.check_fits(backbone, backbone.build(TINY_TIMM_ARCH), 64, 2)


# ----- 6. check catches every bad trainer, schedule, data and out_dir value --------------------------------
def _check_error(capsys, recipe, *overrides: str) -> str:
    """The CLI's `check`: exit status 2 and one line on stderr, returned without its 'error: ' prefix."""
    from dymu_lightning.cli import main

    assert main(["check", f"recipe={recipe}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.devices=0"], "trainer.devices must be an integer >= 1 or 'auto', got 0"),
        (["trainer.devices=-1"], "trainer.devices must be an integer >= 1 or 'auto', got -1"),
        (["trainer.num_nodes=0"], "trainer.num_nodes must be >= 1, got 0"),
        (
            ["trainer.accelerator=tpu"],
            "trainer.accelerator='tpu'; expected one of ('auto', 'cpu', 'gpu', 'cuda', 'mps')",
        ),
        (
            ["schedule.r=null", "schedule.variants={low: -3}", "schedule.variant=low"],
            "schedule.variants.low must be >= 0, got -3",
        ),
        (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
        (["model.num_blocks=99"], "model.num_blocks=99, but backbone 'timm_vit' has 3 blocks"),
        (
            ["schedule.r=null", "schedule.tokens_left=10000"],
            "schedule.tokens_left=10000, but backbone 'timm_vit' gives 65 tokens per image at 64 px (1 prefix "
            "tokens never merge); expected 2..65",
        ),
    ],
)
def test_check_refuses_bad_values_in_one_line(tmp_path, shards, capsys, overrides, message):
    recipe = recipe_file(tmp_path, shards)
    assert _check_error(capsys, recipe, *overrides) == f"{recipe}: {message}"


def test_check_refuses_an_out_dir_that_cannot_be_written(tmp_path, shards, capsys):
    recipe = recipe_file(tmp_path, shards)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _check_error(capsys, recipe, f"out_dir={afile}") == (
        f"{recipe}: out_dir={afile}: {afile} is a file, not a folder"
    )
    assert _check_error(capsys, recipe, f"out_dir={afile}/sub/out") == (
        f"{recipe}: out_dir={afile}/sub/out: {afile} is a file, so no folder can be created under it"
    )
    # Not writable even by root: a folder of a read-only file system.
    message = _check_error(capsys, recipe, "out_dir=/proc/self/dymu")
    assert message.startswith(f"{recipe}: out_dir=/proc/self/dymu: cannot write in /proc/self (")
    assert not list(tmp_path.glob(".dymu-write-test-*"))


# ----- 3. impossible schedules are refused by check --------------------------------------------------------
def test_check_refuses_more_merges_than_a_layer_has_pairs(tmp_path, shards, capsys):
    recipe = recipe_file(tmp_path, shards)
    assert _check_error(capsys, recipe, "schedule.r=20") == (
        f"{recipe}: schedule.r=20 asks layer 2 for 20 merges per image, but its 25 tokens (of 65 tokens per image "
        "at 64 px) form 12 candidate pairs, and a threshold needs fewer merges than pairs; lower the schedule, or "
        "feed larger images (model.image_size)"
    )


def test_small_llava_calib_at_224_px_is_refused_before_loading_weights(tmp_path, capsys):
    from dymu_lightning.assets.paths import small_llava_dir
    from dymu_lightning.config.recipes import packaged_recipes

    if not (small_llava_dir() / "vision_tower" / "config.json").is_file():
        pytest.skip("the small LLaVA is not assembled (`dymu small_llava`)")
    recipe = packaged_recipes()["small_llava_calib"]
    message = _check_error(capsys, "small_llava_calib", "model.image_size=224", f"out_dir={tmp_path}")
    assert message == (
        f"{recipe}: schedule.variant='mid' (r=35) asks layer 6 for 35 merges per image, but its 47 tokens (of 257 "
        "tokens per image at 224 px) form 23 candidate pairs, and a threshold needs fewer merges than pairs; lower "
        "the schedule, or feed larger images (model.image_size)"
    )


# ----- 7. one line, not a traceback ----------------------------------------------------------------------
def _run_error(capsys, recipe, *overrides: str) -> str:
    from dymu_lightning.cli import main

    assert main([f"recipe={recipe}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.removeprefix("error: ").rstrip("\n")


def test_a_corrupt_state_says_resume_false_starts_over(tmp_path, shards, capsys, monkeypatch):
    recipe = recipe_file(tmp_path, shards)
    state = tmp_path / "out" / "calibration_state.pt"
    state.parent.mkdir()
    state.write_bytes(b"PK\x03\x04 not a whole zip")
    import dymu_lightning.lit.run as lit_run

    monkeypatch.setattr(lit_run, "load_encoder", lambda cfg: pytest.fail("the model was loaded"))
    message = _run_error(capsys, recipe)
    assert message.startswith(f"{state} is not a readable calibration state (")
    assert message.endswith("); resume=false starts over (and replaces it)")
    monkeypatch.undo()
    assert run(recipe, "resume=false").images_seen == 10


@pytest.mark.parametrize(
    ("shards_value", "message"),
    [
        ("{shards}/shard-000000.tar", "data.shards={value} is a file; data.shards names the folder that holds the "
         ".tar shards (here probably data.shards={shards})"),
        ("{shards}/shard-{{000000..000003}}.tar", "data.shards={value} is a pattern and matches no folder; "
         "data.shards names the folder that holds the .tar shards (here probably data.shards={shards})"),
        ("{shards}/*.tar", "data.shards={value} is a pattern and matches no folder; data.shards names the folder "
         "that holds the .tar shards (here probably data.shards={shards})"),
    ],
)  # fmt: skip
def test_shards_given_as_a_file_or_a_pattern(tmp_path, shards, capsys, shards_value, message):
    recipe = recipe_file(tmp_path, shards)
    value = shards_value.format(shards=shards)
    expected = message.format(value=value, shards=shards)
    assert _check_error(capsys, recipe, f"data.shards={value}") == f"{recipe}: {expected}"


def test_images_next_to_a_folder_of_shards_without_an_index_reads_the_shards(tmp_path, shards):
    """A packaged recipe's data.images with your own shards (no index.json): the shards are used."""
    import shutil

    own = tmp_path / "own"
    own.mkdir()
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, own)
    result = run(recipe_file(tmp_path, own, images="assets:skimage"))
    assert result.images_seen == 10 and not (own / "index.json").exists()


def test_a_broken_plugin_is_one_line(tmp_path, shards, capsys, monkeypatch):
    from dymu_lightning.backbones import registry

    monkeypatch.setitem(registry._registry, "lab_broken", "no_such_module_xyz:LabViT")
    recipe = recipe_file(tmp_path, shards)
    assert _check_error(capsys, recipe, "model.backbone=lab_broken") == (
        "backbone 'lab_broken' is registered to no_such_module_xyz:LabViT, which cannot be imported "
        "(ModuleNotFoundError: No module named 'no_such_module_xyz'); fix or uninstall the package that provides it"
    )


# ----- 3, 14. a partial run says so: in the file, on the console, in the report, at inference --------------
def test_a_run_stopped_by_max_steps_is_marked_partial(tmp_path, shards, capsys):
    recipe = recipe_file(tmp_path, shards)
    first = run(recipe, "trainer.max_steps=1")
    out = capsys.readouterr().out
    assert first.partial and first.extra["steps"] == 1 and first.extra["total_steps"] == 3
    assert "partial: 1 of 3 global steps (trainer.max_steps); run the same command again to continue\n" in out
    report = (tmp_path / "out" / "report.md").read_text()
    assert "- run: **partial**: 1 of 3 global steps (trainer.max_steps); run the same command again" in report
    assert "- skipped images (undecodable): 0\n" in report
    from tests_support import TINY_TIMM_ARCH

    from dymu_lightning.backbones import get_backbone
    from dymu_lightning.backbones.thresholds import PartialCalibrationWarning

    backbone = get_backbone("timm_vit")
    with pytest.warns(PartialCalibrationWarning, match=r"thresholds.json: a partial calibration \(4 images, stopped "
                      r"by trainer.max_steps\); rerun its command to finish it"):  # fmt: skip
        ThresholdsFile.load(tmp_path / "out" / "thresholds.json").check_fits(
            backbone, backbone.build(TINY_TIMM_ARCH), 64, None
        )
    finished = run(recipe)
    assert not finished.partial and "partial" not in capsys.readouterr().out
    assert "- run: complete: every image was used" in (tmp_path / "out" / "report.md").read_text()


# ----- 4. another run's results are not overwritten -------------------------------------------------------
def test_another_runs_thresholds_are_not_overwritten(tmp_path, shards, capsys):
    recipe = recipe_file(tmp_path, shards)
    run(recipe)
    path = tmp_path / "out" / "thresholds.json"
    before = path.read_bytes()
    message = _run_error(capsys, recipe, "resume=false", "schedule.r=4")
    assert message == f"{path} would be overwritten (another calibration wrote it; differs in: r); use another " \
        "out_dir, or remove the file"  # fmt: skip
    assert _run_error(capsys, recipe, "seed=3") == (
        f"{path} would be overwritten (another calibration wrote it; differs in: seed); use another out_dir, or "
        "remove the file"
    )
    path.write_text("{}")
    assert _run_error(capsys, recipe) == (
        f"{path} would be overwritten (it records no run fingerprint: another tool or version wrote it); use "
        "another out_dir, or remove the file"
    )
    path.write_bytes(before)


# ----- 5. rerunning a finished run rewrites the same results ----------------------------------------------
def test_rerunning_a_finished_run_rewrites_the_same_file(tmp_path, shards):
    recipe = recipe_file(tmp_path, shards)
    run(recipe)
    path = tmp_path / "out" / "thresholds.json"
    first = json.loads(path.read_text())
    run(recipe)
    again = json.loads(path.read_text())
    assert first["extra"]["bytes_gathered_per_step"] > 0 and first["extra"]["seconds_per_step"] is not None
    assert again == first


# ----- 8. the same shard folder, relative or absolute ----------------------------------------------------
def test_resume_accepts_the_same_shards_given_relative(tmp_path, shards, monkeypatch):
    recipe = recipe_file(tmp_path, shards)
    run(recipe, "trainer.max_steps=1")
    monkeypatch.chdir(shards.parent)
    resumed = run(recipe, "data.shards=shards")
    assert resumed.images_seen == 10 and not resumed.partial


# ----- 9. backbones registered in your own code, from the CLI ----------------------------------------------
PLUGIN = '''
from dymu_lightning.backbones import register_backbone
from dymu_lightning.backbones.timm_vit import TimmViT


@register_backbone("lab_vit")
class LabViT(TimmViT):
    """A timm ViT under the lab's name."""
'''


@pytest.fixture
def clean_registry(monkeypatch):
    from dymu_lightning.backbones import registry

    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_in_process", set(registry._in_process))


def test_a_recipe_imports_its_plugins_before_the_backbone_lookup(tmp_path, shards, capsys, clean_registry, monkeypatch):
    import sys

    from dymu_lightning.cli import main

    (tmp_path / "lab_plugin.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "lab_plugin", raising=False)
    recipe = recipe_file(tmp_path, shards)
    assert _check_error(capsys, recipe, "model.backbone=lab_vit").startswith("unknown backbone 'lab_vit'.")
    assert main(["check", f"recipe={recipe}", "model.backbone=lab_vit", "plugins=[lab_plugin]"]) == 0
    assert _check_error(capsys, recipe, "plugins=[lab_plugn]") == (
        f"{recipe}: plugins: cannot import 'lab_plugn' (ModuleNotFoundError: No module named 'lab_plugn')"
    )


def test_an_in_process_registration_wins_over_an_entry_point(clean_registry, monkeypatch):
    from dymu_lightning.backbones import get_backbone, register_backbone, registry
    from dymu_lightning.backbones.timm_vit import TimmViT

    class Ours(TimmViT):
        pass

    register_backbone("contested_vit")(Ours)
    registry._add("contested_vit", "no_such_module_xyz:Theirs", origin="entry point no_such_module_xyz:Theirs")
    assert type(get_backbone("contested_vit")) is Ours


# ----- 10. a typo in model.arch ------------------------------------------------------------------------
def test_a_typo_in_an_hf_arch_is_an_error_with_a_suggestion(tmp_path, shards, capsys):
    import yaml

    recipe = recipe_file(tmp_path, shards)
    data = yaml.safe_load(recipe.read_text())
    data["model"] = {"backbone": "hf_clip", "random_init": True, "arch": {"hidden_size": 32, "num_hiden_layers": 2}}
    recipe.write_text(yaml.safe_dump(data))
    assert _check_error(capsys, recipe) == (
        f"{recipe}: model.arch.num_hiden_layers is not a setting of CLIPVisionConfig (backbone 'hf_clip'); did "
        "you mean 'model.arch.num_hidden_layers'?"
    )


def test_a_wrong_timm_arch_key_is_one_line(tmp_path, shards, capsys):
    recipe = recipe_file(tmp_path, shards)
    message = _check_error(capsys, recipe, "model.arch.dept=3")
    assert message.startswith(f"{recipe}: model.arch: backbone 'timm_vit' cannot build it (")
    assert "dept" in message


# ----- 11. output a user can read ----------------------------------------------------------------------
def test_the_console_shows_our_lines_not_lightnings_noise(tmp_path, shards):
    import subprocess
    import sys

    recipe = recipe_file(tmp_path, shards)
    command = [sys.executable, "-m", "dymu_lightning", f"recipe={recipe}", "trainer.progress_bar=true"]
    outputs = []
    for _ in range(2):  # the run, then a rerun of the finished run
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout + done.stderr)
    first, rerun = outputs
    assert "Calibrating: 100%" in first and "3/3" in first
    for text in outputs:
        noises = ("litlogger", "DataLoader 0", "Validation", "was configured so", "Total length of `DataLoader`")
        for noise in (*noises, "`srun` command is available"):
            assert noise not in text, noise
    assert "resuming" in rerun and "calibrated timm_vit: 10 images" in rerun


def test_the_package_metadata_has_an_spdx_license():
    from pathlib import Path

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '\nlicense = "Apache-2.0"\n' in text and 'requires = ["setuptools>=77"]' in text


# ----- the table of bad inputs in docs/configuration.md ---------------------------------------------------
def _doc_rows() -> list:
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    table = text.split("<!-- bad-inputs:start -->")[1].split("<!-- bad-inputs:end -->")[0]
    rows = re.findall(r"^\| `(.+?)` \| `(.+)` \|$", table, re.MULTILINE)
    assert len(rows) >= 15
    return [pytest.param(arguments, message, id=arguments) for arguments, message in rows]


@pytest.mark.parametrize(("arguments", "message"), _doc_rows())
def test_the_documented_bad_inputs_give_their_documented_message(arguments, message, capsys, monkeypatch):
    import shlex
    from pathlib import Path

    from dymu_lightning.backbones import get_backbone
    from dymu_lightning.config.recipes import packaged_recipes

    offline = Path(get_backbone("dinov2_vits14_offline").default_source) / "config.json"
    if ("dinov2_vits14_offline" in message or "tokens per image" in message) and not offline.is_file():
        pytest.skip("needs the offline DINOv2 config (`dymu assets`)")
    monkeypatch.chdir(Path(__file__).parents[1])
    got = _check_error(capsys, "quickstart", *shlex.split(arguments))
    assert got == message.replace("RECIPE", str(packaged_recipes()["quickstart"]))


# ----- 15. what merged -------------------------------------------------------------------------------
def test_token_groups_are_the_output_tokens(tiny):
    from dymu_lightning.merges import token_groups

    pixels = tiny.images(4)
    policy = __import__("dymu_lightning.core", fromlist=["MergePolicy"]).MergePolicy(thresholds=tiny.thresholds(pixels))
    groups, lengths = token_groups(tiny.backbone, tiny.model, pixels, policy)
    prefix = tiny.backbone.num_prefix_tokens(tiny.model)
    for image_groups, length in zip(groups, lengths, strict=True):
        assert image_groups.unique().numel() == int(length) - prefix  # one group per output patch token


def test_the_report_shows_what_merged(calibrated):
    out_dir = calibrated[0].parent
    assert (out_dir / "merges.png").stat().st_size > 1000
    assert "![what merged](merges.png)" in (out_dir / "report.md").read_text()


def test_the_merges_command_draws_any_thresholds_file(tmp_path, capsys):
    from tests_support import make_images

    from dymu_lightning.backbones import get_backbone
    from dymu_lightning.backbones.thresholds import batch_thresholds
    from dymu_lightning.cli import main

    backbone = get_backbone("hf_dinov2")
    model = backbone.build(backbone.tiny_configs()[0].config)
    model.save_pretrained(tmp_path / "weights")
    make_images(tmp_path / "images", 4)
    transform = backbone.image_transform(model)
    from PIL import Image

    pixels = __import__("torch").stack([transform(Image.open(p)) for p in sorted((tmp_path / "images").iterdir())])
    found = batch_thresholds(backbone, model, pixels, r=3)
    layers = backbone.num_layers(model)
    path = ThresholdsFile(
        "hf_dinov2", layers, int(pixels.shape[-1]), found, [3] * layers, {"kind": "constant"}, 4, 4, 1, {},
        source=str(tmp_path / "weights"),
    ).save(tmp_path / "thresholds.json")  # fmt: skip
    out = tmp_path / "merges.png"
    args = ["merges", str(path), "--images", str(tmp_path / "images"), "--max-images", "3", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"wrote {out}" and out.stat().st_size > 1000
    assert [line.split(":")[0] for line in printed[:-1]] == ["img000.png", "img001.png", "img002.png"]
    path.write_text(path.read_text().replace(str(tmp_path / "weights"), "random"))
    assert main(["merges", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: {path}: source='random': the thresholds belong to random weights; give the weights with --source\n"
    )


# ----- 12. a dead rank is named, in one line ---------------------------------------------------------------
@pytest.mark.distributed
def test_a_dead_rank_is_named_by_the_survivor_in_one_line(tmp_path, shards):
    import os
    import subprocess
    import sys

    recipe = recipe_file(tmp_path, shards)
    command = [sys.executable, "-m", "dymu_lightning", f"recipe={recipe}", "trainer.devices=2", "trainer.strategy=ddp"]
    env = {**os.environ, "DYMU_FAULT_KILL_AFTER_STEP": "1", "DYMU_FAULT_RANK": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr[-3000:]
    state = tmp_path / "out" / "calibration_state.pt"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: rank 1 did not reach global step 2: died, or hung longer than trainer.timeout_s (seen by rank 0, "
        f"whose all-gather failed). Rerun the same command to resume from {state} ("
    ), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


# ----- 13. two local Slurm clusters do not share names -------------------------------------------------
def test_local_slurm_cluster_names_derive_from_its_folder():
    import subprocess
    from pathlib import Path

    env_sh = Path(__file__).parents[1] / "scripts" / "slurm" / "env.sh"

    def settings(folder: str | None) -> str:
        prefix = f"DYMU_SLURM_DIR={folder} " if folder else "unset DYMU_SLURM_DIR; "
        script = f'{prefix}source "{env_sh}" && echo "${{NODES[*]}} ${{VETH}}1h $BRIDGE $SUB $CTLD_PORT $MUNGE_DIR"'
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()

    default = settings(None)
    assert default == ["slnode1", "slnode2", "sl1h", "slbr0", "10.250.77", "6817", "/run/munge"]
    one, two = settings("/tmp/cluster-one"), settings("/tmp/cluster-two")
    assert one[-1] == "/tmp/cluster-one/munge" and all(len(name) <= 15 for name in one[:4])
    for a, b, c in zip(default[:-1], one[:-1], two[:-1], strict=True):
        assert len({a, b, c}) == 3  # nodes, veths, bridge, subnet, port: all distinct


def test_a_never_merging_layer_is_saved_as_null_and_loads(tmp_path, calibrated):
    data = json.loads(calibrated[0].read_text())
    fields = {k: v for k, v in data.items() if k != "schema_version"}
    fields["thresholds"] = [0.5, float("inf"), None]
    path = ThresholdsFile(**fields).save(tmp_path / "thresholds.json")
    assert json.loads(path.read_text())["thresholds"] == [0.5, None, None]
    assert ThresholdsFile.load(path).thresholds == [0.5, None, None]
