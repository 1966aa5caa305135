"""Calibration on the frames a OneVision's own video processor makes (``data.crops=frames``): video
shards, the ``inputs`` thresholds.json records, and apply_dymu's check of video-frame thresholds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from tests_support import VISION
from transformers import AutoVideoProcessor, LlavaOnevisionVideoProcessor

from dymu_lightning.backbones.hf_llava import apply_dymu
from dymu_lightning.backbones.thresholds import ThresholdsFile, batch_thresholds
from dymu_lightning.cli import main
from dymu_lightning.config import load_recipe
from dymu_lightning.config.recipes import ConfigError
from dymu_lightning.data import read_index, write_shards
from dymu_lightning.data.frames import GlobalBatchFrames
from dymu_lightning.lit.run import calibrate, check
from dymu_lightning.loading import load_encoder

SAMPLED = 3  # frames the processor samples from every video (num_frames)
FRAMES = 3 * SAMPLED  # three videos


def random_frames(count: int, height: int, width: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> SimpleNamespace:
    """A OneVision video processor (frames of 32 px, 3 sampled per video) saved as a model folder
    holds it, and video shards of three videos: two .npy arrays and a folder of PNG frames."""
    root = tmp_path_factory.mktemp("video")
    LlavaOnevisionVideoProcessor(
        size={"height": 32, "width": 32}, do_sample_frames=True, num_frames=SAMPLED
    ).save_pretrained(root / "model")
    videos = [random_frames(5, 40, 70, 0), random_frames(3, 50, 30, 1), random_frames(4, 36, 36, 2)]
    (root / "videos" / "c_frames").mkdir(parents=True)
    np.save(root / "videos" / "a.npy", videos[0])
    np.save(root / "videos" / "b.npy", videos[1])
    for i, frame in enumerate(videos[2]):  # PNG: lossless, so the shard holds these pixels
        Image.fromarray(frame).save(root / "videos" / "c_frames" / f"{i:03d}.png")
    assert main(["shards", str(root / "videos"), str(root / "shards"), "--videos", "--shard-size", "2"]) == 0
    processor = AutoVideoProcessor.from_pretrained(root / "model")
    # what the model's processor gives at inference, one video at a time
    expected = torch.cat([processor(videos=[v], return_tensors="pt")["pixel_values_videos"][0] for v in videos])
    return SimpleNamespace(root=root, processor=processor, videos=videos, expected=expected)


def all_rows(dataset: GlobalBatchFrames) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(dataset)
    valid = torch.cat([b["valid"] for b in batches])
    return torch.cat([b["pixels"] for b in batches])[valid], torch.cat([b["index"] for b in batches])[valid]


def test_the_shards_hold_the_frames(setting):
    """One .npy member per video, in name order; the index scanned from the tars equals the written one."""
    index = read_index(setting.root / "shards")
    assert [s.keys for s in index.shards] == [("a", "b"), ("c_frames",)]
    assert {e for s in index.shards for e in s.exts} == {"npy"}
    for video, i in zip(setting.videos, range(3), strict=True):
        shard, position = index.locate(i)
        with open(index.shard_path(shard), "rb") as stream:
            stream.seek(index.shards[shard].offsets[position])
            data = stream.read(index.shards[shard].sizes[position])
        assert np.array_equal(np.load(io.BytesIO(data)), video)
    (setting.root / "scan").mkdir()
    for tar in (setting.root / "shards").glob("*.tar"):
        (setting.root / "scan" / tar.name).write_bytes(tar.read_bytes())
    assert read_index(setting.root / "scan").shards == index.shards


def test_the_frames_are_exactly_the_processors(setting):
    """Every frame the processor samples from every video, once, in video order, pixel for pixel;
    the frames counted up front from the headers are those it makes."""
    dataset = GlobalBatchFrames(setting.root / "shards", 4, video_processor=setting.processor)
    assert setting.expected.shape == (FRAMES, 3, 32, 32)
    assert dataset.part_counts == [SAMPLED] * 3 and dataset.num_samples == FRAMES and dataset.num_steps == 3
    pixels, index = all_rows(dataset)
    assert torch.equal(pixels, setting.expected)
    assert index.tolist() == list(range(FRAMES))
    every = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})  # no sampling: every frame
    assert GlobalBatchFrames(setting.root / "shards", 4, video_processor=every).part_counts == [5, 3, 4]


def test_ranks_split_each_global_batch_of_frames(setting):
    one = list(GlobalBatchFrames(setting.root / "shards", 4, video_processor=setting.processor))
    ranks = [
        list(GlobalBatchFrames(setting.root / "shards", 4, video_processor=setting.processor, rank=r, world_size=2))
        for r in (0, 1)
    ]
    for whole, first, second in zip(one, *ranks, strict=True):
        assert torch.equal(torch.cat([first["pixels"], second["pixels"]]), whole["pixels"])
        assert torch.equal(torch.cat([first["index"], second["index"]]), whole["index"])


def test_samples_without_frames_and_bad_videos_are_named(setting, tmp_path):
    Image.fromarray(setting.videos[0][0]).save(tmp_path / "still.png")
    write_shards([tmp_path / "still.png"], tmp_path / "images")
    with pytest.raises(ValueError, match=r"sample 'still' \(global index 0\) in shard .*shard-000000.tar holds no "
                       r"video frames \(its member is .png\); video shards hold each video as a .npy member: "
                       r"write them with `dymu shards SRC OUT --videos`"):  # fmt: skip
        GlobalBatchFrames(tmp_path / "images", 1, video_processor=setting.processor)
    too_many = LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32}, do_sample_frames=True, num_frames=4)
    with pytest.raises(ValueError, match=r"sample 'b' \(global index 1\) .* has 3 frames, fewer than the 4 the video"):
        GlobalBatchFrames(setting.root / "shards", 1, video_processor=too_many)
    (tmp_path / "corrupt").mkdir()  # a foreign shard (no index.json): an undecodable .npy is skipped and counted
    with open(tmp_path / "corrupt" / "c.tar", "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        writer.write({"__key__": "bad", "npy": b"not an array"})
        writer.write({"__key__": "good", "npy": (setting.root / "videos" / "b.npy").read_bytes()})
    batch = next(iter(GlobalBatchFrames(tmp_path / "corrupt", 4, video_processor=setting.processor)))
    assert batch["valid"].tolist() == [False, True, True, True] and batch["index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"cannot decode sample 'bad' \(global index 0\) in shard .*c.tar: ValueError"):
        next(iter(GlobalBatchFrames(tmp_path / "corrupt", 1, video_processor=setting.processor, strict=True)))
    np.save(tmp_path / "gray.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"gray.npy: expected frames of uint8 \[frames, height, width, 3\], got"):
        write_shards([tmp_path / "gray.npy"], tmp_path / "bad", videos=True)
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "0.png")
    Image.new("RGB", (9, 8)).save(tmp_path / "mixed" / "1.png")
    with pytest.raises(ValueError, match=r"1.png: a frame of 9 x 8 px in a video of 8 x 8 px frames"):
        write_shards([tmp_path / "mixed"], tmp_path / "bad", videos=True)


def recipe(setting, folder: Path, **data) -> Path:
    """A random 3-block SigLIP at 32 px over the shards' video frames, all 9 in one global batch."""
    body = {
        "task": "calibrate",
        "out_dir": str(folder / "out"),
        "model": {"backbone": "hf_siglip", "random_init": True, "arch": VISION},
        "data": {"shards": str(setting.root / "shards"), "global_batch_size": 10, **data},
        "schedule": {"r": 2},
        "trainer": {"accelerator": "cpu", "progress_bar": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r.yaml").write_text(yaml.safe_dump(body))
    return folder / "r.yaml"


def test_recipe_calibrates_on_the_frames_and_records_them(setting, tmp_path):
    """`data.crops=frames`: the thresholds are the batch top-k thresholds of the processor's frames
    (each frame an image of the ranking), and thresholds.json records the frames; the record
    round-trips, and a malformed one names the key."""
    path = recipe(setting, tmp_path, crops="frames", processor=str(setting.root / "model"))
    result = ThresholdsFile.load(calibrate(load_recipe(path, [])))
    assert result.inputs == {
        "kind": "video_frames",
        "processor": str(setting.root / "model"),
        "frame_size": 32,
        "num_frames": SAMPLED,
    }
    assert result.images_seen == result.tokens["images"] == FRAMES and result.tokens["full"] == 16
    assert result.extra["index_sum"] == sum(range(FRAMES))
    L.seed_everything(0, verbose=False)  # the model the run built (seed 0, random init)
    backbone, model, _ = load_encoder(load_recipe(path, []).to_object().model)
    expected = batch_thresholds(backbone, model, setting.expected, r=2)
    assert result.thresholds == pytest.approx(expected, abs=1e-6)
    assert ThresholdsFile.load(result.save(tmp_path / "again.json")) == result
    data = result.to_json()
    data["inputs"] = {**data["inputs"], "num_frames": 0}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: 'inputs.num_frames' must be null \(every frame kept\) or an"):
        ThresholdsFile.load(tmp_path / "bad.json")


def test_recipe_errors(setting, tmp_path):
    path = recipe(setting, tmp_path)
    with pytest.raises(ConfigError, match=r"data.crops=frames needs data.processor=<a LLaVA-OneVision save_pretr"):
        check(load_recipe(path, ["data.crops=frames"]))
    overrides = ["data.crops=frames", f"data.processor={setting.root / 'model'}", "model.arch.image_size=64"]
    with pytest.raises(ConfigError, match=r"resizes frames to 32 px, but the encoder is fed 64 px images"):
        calibrate(load_recipe(path, overrides))
    LlavaOnevisionVideoProcessor(do_sample_frames=True, fps=2).save_pretrained(tmp_path / "fps")
    with pytest.raises(ConfigError, match=r"samples frames by frame rate \(fps\), which video shards do not record"):
        calibrate(load_recipe(path, ["data.crops=frames", f"data.processor={tmp_path / 'fps'}"]))


@pytest.mark.distributed
def test_two_processes_give_the_same_frame_thresholds(setting, tmp_path):
    """gloo, launched by the CLI: 2 processes rank the same global batches of frames as one."""
    frames = ["data.crops=frames", f"data.processor={setting.root / 'model'}", "data.global_batch_size=4"]
    single = ThresholdsFile.load(calibrate(load_recipe(recipe(setting, tmp_path / "one"), frames)))
    command = [sys.executable, "-m", "dymu_lightning", f"recipe={recipe(setting, tmp_path / 'two')}", *frames,
               "trainer.devices=2", "trainer.strategy=ddp"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    two = ThresholdsFile.load(tmp_path / "two" / "out" / "thresholds.json")
    assert two.world_size == 2 and two.images_seen == single.images_seen == FRAMES
    assert two.inputs == single.inputs
    assert two.thresholds == pytest.approx(single.thresholds, abs=1e-6)


def frames_file(frame_size: int, backbone: str = "hf_siglip", num_blocks: int | None = None) -> ThresholdsFile:
    inputs = {"kind": "video_frames", "processor": "m", "frame_size": frame_size, "num_frames": None}
    return ThresholdsFile(
        backbone=backbone, num_layers=3, image_size=frame_size, thresholds=[0.9, 0.9, None], r=[1, 1, 0],
        schedule={}, images_seen=1, global_batch_size=1, world_size=1, tokens={}, inputs=inputs,
        num_blocks=num_blocks, origin="t.json",
    )  # fmt: skip


def test_apply_dymu_checks_video_frame_thresholds():
    """OneVision (crops and frames of 32 px): frames of another size are an error naming the file;
    frames of 32 px are accepted, with a warning that its images' crops merge with them too. A
    LLaVA-NeXT (no video) takes them as it takes whole images at the crop size: with a warning."""
    from test_llava_anyres import tiny_model

    model = tiny_model("onevision")
    with pytest.raises(
        ValueError,
        match=r"^t.json: calibrated on video frames of 64 px, but this LlavaOnevisionForConditionalGeneration feeds "
        r"its vision tower crops and frames of 32 px; recalibrate with data.crops=frames data.processor=",
    ):
        apply_dymu(model, frames_file(64))
    with pytest.warns(UserWarning, match=r"^t.json: calibrated on video frames: right for this LlavaOnevisionFor"
                      r"ConditionalGeneration's videos, but the AnyRes crops of its images merge with the same "
                      r"thresholds; for images, recalibrate with data.crops=anyres"):  # fmt: skip
        apply_dymu(model, frames_file(32))
    with pytest.warns(UserWarning, match=r"^t.json: calibrated on video frames, not on the AnyRes crops this "
                      r"LlavaNextForConditionalGeneration feeds; recalibrate with data.crops=anyres"):  # fmt: skip
        apply_dymu(tiny_model("next"), frames_file(32, "hf_clip", num_blocks=2))  # CLIP, read after 2 blocks
