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
            r"thresholds.json: calibrated at 24 px, but this run feeds 32 px images; feed 24 px images, "
            r"or calibrate again with model.image_size=32$",
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
