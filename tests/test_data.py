"""The data layer: webdataset shards with a size index, and global batches split over ranks and workers.

The distribution properties are what calibration relies on: whatever the world size, step s is the
same set of samples; every sample appears exactly once; every rank takes the same number of steps.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dymu_lightning.cli import main as cli_main
from dymu_lightning.data import GlobalBatchShards, num_steps, read_index, write_shards

wds = pytest.importorskip("webdataset")
TF = pytest.importorskip("torchvision.transforms.functional")

SIZE = 16


def transform(image: Image.Image) -> torch.Tensor:
    """``[3, 16, 16]`` in [0, 1]. Module level so that DataLoader workers could pickle it."""
    return TF.to_tensor(image.resize((SIZE, SIZE)))


def _save(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, format=fmt)


# Eleven images: PNG and JPEG (.jpg/.jpeg/.JPG), three sizes, a stem repeated across folders and stems
# with dots and spaces (webdataset would split a key at a dot). N = 11 is prime: no G here divides it.
IMAGE_NAMES = [
    ("a/cat.png", (32, 32)),
    ("a/cat.v2.jpg", (24, 40)),
    ("a/dog photo.jpeg", (40, 24)),
    ("b/cat.png", (32, 32)),
    ("b/cat.JPG", (24, 40)),
    ("b/img_001.png", (40, 24)),
    ("c/img_001.jpg", (32, 32)),
    ("c/x.png", (24, 40)),
    ("c/y.jpg", (40, 24)),
    ("d/z.png", (32, 32)),
    ("d/zz.jpeg", (32, 32)),
]
N = len(IMAGE_NAMES)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for seed, (name, size) in enumerate(IMAGE_NAMES):
        _save(root / name, size, seed)
    (root / "a" / "notes.txt").write_text("not an image: must be ignored")
    return root


@pytest.fixture(scope="module")
def image_files(image_dir) -> list[Path]:
    """The originals in the writer's order (sorted relative paths)."""
    return sorted((image_dir / name for name, _ in IMAGE_NAMES), key=lambda p: p.relative_to(image_dir).as_posix())


@pytest.fixture(scope="module")
def shard_dir(image_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(image_dir, out, shard_size=4)
    return out


@pytest.fixture(scope="module")
def expected_pixels(image_files) -> torch.Tensor:
    """``[N, 3, 16, 16]``: each original decoded and transformed, in global index order."""
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in image_files])


# ---------------------------------------------------------------------------------------------------------------------
# shards and the size index


def test_shards_round_trip_and_index(shard_dir, image_files):
    index = read_index(shard_dir)
    assert index.path == shard_dir / "index.json"
    assert [s.name for s in index.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.count for s in index.shards] == [4, 4, 3] and index.total == N
    payload = json.loads((shard_dir / "index.json").read_text())
    assert payload["schema_version"] == 1 and payload["total"] == N

    keys = [key for s in index.shards for key in s.keys]
    assert len(set(keys)) == N
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", key) for key in keys)  # no dot: webdataset splits there
    for i, original in enumerate(image_files):
        shard, position = index.locate(i)
        info = index.shards[shard]
        ext = original.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        assert info.exts[position] == ext
        with open(index.shard_path(shard), "rb") as stream:
            stream.seek(info.offsets[position])
            assert stream.read(info.sizes[position]) == original.read_bytes()
    for number, info in enumerate(index.shards):
        with tarfile.open(index.shard_path(number)) as tar:
            members = [m for m in tar if m.isreg()]
        assert [m.name for m in members] == [f"{k}.{e}" for k, e in zip(info.keys, info.exts, strict=True)]
        assert [m.offset_data for m in members] == list(info.offsets)
        assert [m.size for m in members] == list(info.sizes)
        assert index.shard_path(number).stat().st_size == info.nbytes
    assert not list(shard_dir.glob(".*"))  # no staging leftovers


def test_real_webdataset_reads_the_shards(shard_dir, image_files):
    index = read_index(shard_dir)
    urls = [str(index.shard_path(i)) for i in range(len(index.shards))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == [key for s in index.shards for key in s.keys]
    exts = [e for s in index.shards for e in s.exts]
    assert [s[ext] for s, ext in zip(samples, exts, strict=True)] == [p.read_bytes() for p in image_files]


def test_writer_is_deterministic_and_keeps_an_explicit_order(image_dir, image_files, shard_dir, tmp_path):
    write_shards(image_dir, tmp_path / "again", shard_size=4)
    for tar in sorted(shard_dir.glob("*.tar")):
        assert (tmp_path / "again" / tar.name).read_bytes() == tar.read_bytes()
    reordered = image_files[::-1]
    index = read_index(write_shards(reordered, tmp_path / "listed", shard_size=100))
    info = index.shards[0]
    with open(index.shard_path(0), "rb") as stream:
        for position, original in enumerate(reordered):
            stream.seek(info.offsets[position])
            assert stream.read(info.sizes[position]) == original.read_bytes()


def test_existing_shards_without_index_are_scanned_in_memory(shard_dir, tmp_path):
    for tar in shard_dir.glob("*.tar"):
        shutil.copy(tar, tmp_path / tar.name)
    # A foreign shard: several members per sample (webdataset style), one sample without an image.
    with open(tmp_path / "zzz-foreign.tar", "wb") as stream, wds.TarWriter(stream, encoder=False) as writer:
        writer.write({"__key__": "s0", "jpg": b"JPEGBYTES", "txt": b"a caption"})
        writer.write({"__key__": "s1", "txt": b"no image here"})
    scanned = read_index(tmp_path)
    written = read_index(shard_dir)
    assert scanned.path is None and not (tmp_path / "index.json").exists()
    assert scanned.shards[:3] == written.shards
    foreign = scanned.shards[3]
    assert foreign.keys == ("s0",) and foreign.exts == ("jpg",)
    with open(tmp_path / foreign.name, "rb") as stream:
        stream.seek(foreign.offsets[0])
        assert stream.read(foreign.sizes[0]) == b"JPEGBYTES"


def test_missing_index_and_missing_shard_name_the_path(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "index.json"))) as error:
        read_index(tmp_path / "index.json")
    assert "python -m dymu_lightning shards" in str(error.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        read_index(tmp_path)  # an empty folder: no index, nothing to scan

    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    (copy / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy / "shard-000001.tar"))):
        read_index(copy)
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy / "shard-000001.tar"))):
        read_index(copy / "index.json")


def test_a_changed_shard_is_detected(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    with open(copy / "shard-000002.tar", "ab") as stream:
        stream.write(b"\0" * 512)
    with pytest.raises(ValueError, match="shard-000002.tar.*changed"):
        read_index(copy)


def test_writer_refuses_to_mix_with_an_earlier_dataset(image_dir, shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(image_dir, copy, shard_size=4)
    write_shards(image_dir, copy, shard_size=6, overwrite=True)
    assert sorted(p.name for p in copy.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    assert [s.count for s in read_index(copy).shards] == [6, 5]


# ---------------------------------------------------------------------------------------------------------------------
# global batches


def _run(index, global_batch_size: int, rank: int, world_size: int, **kwargs) -> list[dict]:
    dataset = GlobalBatchShards(
        index, global_batch_size, rank=rank, world_size=world_size, transform=transform, **kwargs
    )
    batches = list(dataset)
    assert len(batches) == len(dataset)
    return batches


@pytest.mark.parametrize("global_batch_size", [4, 8, 12])
def test_every_sample_once_and_global_batches_independent_of_world_size(shard_dir, expected_pixels, global_batch_size):
    """G = 8 with W = 4: the last step holds samples 8..10, so ranks 2 and 3 have no real sample."""
    index = read_index(shard_dir)
    steps = num_steps(N, global_batch_size)
    assert steps == math.ceil(N / global_batch_size)
    per_world: dict[int, list[list[int]]] = {}
    for world_size in (1, 2, 4):
        local = global_batch_size // world_size
        step_sets: list[list[int]] = [[] for _ in range(steps)]
        for rank in range(world_size):
            batches = _run(index, global_batch_size, rank, world_size)
            assert [b["step"] for b in batches] == list(range(steps))  # the same count on every rank
            for batch in batches:
                pixels, valid, indices = batch["pixels"], batch["valid"], batch["index"]
                assert pixels.shape == (local, 3, SIZE, SIZE) and valid.shape == indices.shape == (local,)
                assert valid.dtype == torch.bool and indices.dtype == torch.long
                assert torch.equal(valid, indices >= 0)  # no corrupt samples here: invalid = padding
                assert torch.equal(pixels[valid], expected_pixels[indices[valid]])
                assert (pixels[~valid] == 0).all()
                step_sets[batch["step"]] += indices[valid].tolist()
        flat = [i for step in step_sets for i in step]
        assert sorted(flat) == list(range(N))  # exactly once
        per_world[world_size] = [sorted(s) for s in step_sets]
    assert per_world[1] == per_world[2] == per_world[4]
    assert per_world[1] == [
        list(range(s * global_batch_size, min((s + 1) * global_batch_size, N))) for s in range(steps)
    ]


@pytest.mark.parametrize("image_shape", [None, (3, SIZE, SIZE)])
def test_a_rank_without_real_samples_still_yields_full_shaped_batches(shard_dir, image_shape):
    batches = _run(shard_dir, 8, 3, 4, image_shape=image_shape)
    assert len(batches) == 2
    last = batches[-1]
    assert last["pixels"].shape == (2, 3, SIZE, SIZE) and last["pixels"].dtype == torch.float32
    assert not last["valid"].any() and last["index"].tolist() == [-1, -1]
    assert (last["pixels"] == 0).all()


def test_image_shape_is_checked_against_real_samples(shard_dir):
    with pytest.raises(ValueError, match=r"expected \(3, 8, 8\)"):
        _run(shard_dir, 4, 0, 1, image_shape=(3, 8, 8))


def test_max_samples_shrinks_the_run(shard_dir):
    batches = _run(shard_dir, 4, 0, 2, max_samples=5) + _run(shard_dir, 4, 1, 2, max_samples=5)
    seen = sorted(i for b in batches for i in b["index"][b["valid"]].tolist())
    assert seen == list(range(5)) and len(batches) == 2 * num_steps(5, 4)


def _same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["step"] for b in got] == [b["step"] for b in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g["pixels"], w["pixels"])
        assert torch.equal(g["valid"], w["valid"]) and torch.equal(g["index"], w["index"])


@pytest.mark.parametrize("start_step", [0, 1])
def test_dataloader_workers_keep_step_order(shard_dir, start_step):
    """Two workers take alternate steps; the DataLoader's round-robin must give them back in order,
    also when resuming from a step that is not a multiple of the worker count."""
    dataset = GlobalBatchShards(shard_dir, 2, rank=1, world_size=2, transform=transform, start_step=start_step)
    want = list(dataset)  # first in this process, so that forked workers inherit open shard files
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    got = list(loader)
    assert len(loader) == len(got) == num_steps(N, 2) - start_step
    _same_batches(got, want)
    assert [b["step"] for b in got] == list(range(start_step, num_steps(N, 2)))


def test_dataset_pickles_after_use(shard_dir):
    """Spawned DataLoader workers receive a pickled copy: open shard files must not travel with it."""
    dataset = GlobalBatchShards(shard_dir, 4, rank=1, world_size=2, transform=transform)
    want = list(dataset)
    _same_batches(list(pickle.loads(pickle.dumps(dataset))), want)


def test_start_step_yields_the_tail_of_a_full_run(shard_dir):
    full = _run(shard_dir, 4, 1, 2)
    for start in range(len(full) + 1):
        tail = _run(shard_dir, 4, 1, 2, start_step=start)
        _same_batches(tail, full[start:])
    with pytest.raises(ValueError, match="start_step"):
        GlobalBatchShards(shard_dir, 4, transform=transform, start_step=len(full) + 1)


def test_start_step_does_not_decode_skipped_steps(shard_dir, monkeypatch):
    dataset = GlobalBatchShards(shard_dir, 4, transform=transform, start_step=2)
    decoded = []
    original = GlobalBatchShards._decode
    monkeypatch.setattr(GlobalBatchShards, "_decode", lambda self, i: decoded.append(i) or original(self, i))
    list(dataset)
    assert decoded == [8, 9, 10]


def test_global_batch_must_split_evenly_over_ranks(shard_dir):
    with pytest.raises(ValueError, match="global_batch_size 6 is not divisible by world_size 4"):
        GlobalBatchShards(shard_dir, 6, rank=0, world_size=4, transform=transform)
    with pytest.raises(ValueError, match="rank must be in 0..1"):
        GlobalBatchShards(shard_dir, 4, rank=2, world_size=2, transform=transform)


# ---------------------------------------------------------------------------------------------------------------------
# corrupt images


@pytest.fixture(scope="module")
def corrupt_shards(image_dir, tmp_path_factory) -> tuple[Path, str]:
    """Five images, the third a JPEG truncated to half its bytes. Returns (shard folder, its key)."""
    source = tmp_path_factory.mktemp("corrupt_src")
    names = ["a/cat.png", "b/cat.JPG", "c/y.jpg", "c/x.png", "d/z.png"]
    files = []
    for name in names:
        target = source / name.replace("/", "_")
        data = (image_dir / name).read_bytes()
        target.write_bytes(data[: len(data) // 2] if name == "c/y.jpg" else data)
        files.append(target)
    out = tmp_path_factory.mktemp("corrupt_shards")
    write_shards(files, out, shard_size=2)
    return out, read_index(out).shards[1].keys[0]


def test_corrupt_image_is_skipped_and_counted(corrupt_shards, caplog):
    shard_dir, key = corrupt_shards
    assert key == "c_y"
    runs = []
    with caplog.at_level(logging.WARNING, logger="dymu_lightning.data.loader"):
        for rank in range(2):
            dataset = GlobalBatchShards(shard_dir, 2, rank=rank, world_size=2, transform=transform)
            runs.append((dataset, list(dataset)))
    (ds0, batches0), (ds1, batches1) = runs
    # Sample 2 is step 1, rank 0: its slot is invalid but keeps its index; nothing shifts to rank 1.
    assert batches0[1]["index"].tolist() == [2] and batches0[1]["valid"].tolist() == [False]
    assert (batches0[1]["pixels"] == 0).all() and batches0[1]["pixels"].shape == (1, 3, SIZE, SIZE)
    assert batches1[1]["index"].tolist() == [3] and batches1[1]["valid"].tolist() == [True]
    assert len(batches0) == len(batches1) == 3
    valid = sorted(i for b in batches0 + batches1 for i in b["index"][b["valid"]].tolist())
    assert valid == [0, 1, 3, 4]
    assert ds1.skipped == []
    [(shard, skipped_key, reason)] = ds0.skipped
    assert shard.endswith("shard-000001.tar") and skipped_key == key and reason
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "shard-000001.tar" in record.getMessage() and key in record.getMessage()


def test_corrupt_image_raises_when_strict(corrupt_shards):
    shard_dir, key = corrupt_shards
    dataset = GlobalBatchShards(shard_dir, 2, rank=0, world_size=2, transform=transform, strict=True)
    with pytest.raises(ValueError, match=rf"'{key}' \(global index 2\) in shard .*shard-000001\.tar"):
        list(dataset)


# ---------------------------------------------------------------------------------------------------------------------
# command line


def test_cli_writes_shards_and_prints_a_summary(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["shards", str(image_dir), str(out), "--shard-size", "5", "--prefix", "train"]) == 0
    printed = capsys.readouterr().out
    tars = sorted(out.glob("train-*.tar"))
    assert [p.name for p in tars] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    nbytes = sum(p.stat().st_size for p in tars)
    assert f"wrote 3 shards, {N} samples, {nbytes} bytes" in printed
    assert str(out / "index.json") in printed
    assert [s.count for s in read_index(out).shards] == [5, 5, 1]

    assert cli_main(["shards", str(image_dir), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "--overwrite" in error


def test_cli_runs_as_a_module(image_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dymu_lightning", "shards", str(image_dir), str(out), "--shard-size", "100"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert f"wrote 1 shards, {N} samples" in result.stdout
    assert read_index(out).total == N
