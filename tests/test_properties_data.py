"""Property tests: every sample is read exactly once, for any world size, batch size, worker count and
shard layout (empty shards included), also when resuming or shrinking the run.

Two levels: the index arithmetic alone (an in-memory size index, many examples), and real tar
shards written per example and read back through :class:`GlobalBatchShards` (fewer examples), where
each image's colour encodes its global index, so a row read from the wrong place shows.
"""

from __future__ import annotations

import io
import tempfile
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dymu_lightning.data import GlobalBatchShards, ShardIndex, ShardInfo, local_slice, num_steps, read_index

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def splits(draw, max_shards: int, max_per_shard: int) -> dict:
    """A shard layout and a way to read it: world size, local batch, DataLoader workers, resume step
    and sample cap."""
    counts = draw(st.lists(st.integers(0, max_per_shard), min_size=1, max_size=max_shards).filter(lambda c: sum(c) > 0))
    world = draw(st.integers(1, 4))
    global_batch = world * draw(st.integers(1, 3))
    max_samples = draw(st.none() | st.integers(1, sum(counts) + 2))  # a cap above the total changes nothing
    used = sum(counts) if max_samples is None else min(max_samples, sum(counts))
    return {
        "counts": counts,
        "world": world,
        "global_batch": global_batch,
        "workers": draw(st.integers(1, 3)),
        "max_samples": max_samples,
        "start_step": draw(st.integers(0, num_steps(used, global_batch))),
    }


def round_robin(per_worker: list[list]) -> list:
    """What a DataLoader over an IterableDataset yields: one item from each worker in turn, skipping
    workers that are done."""
    return [item for turn in zip_longest(*per_worker) for item in turn if item is not None]


def _dataset(index, split: dict, rank: int, **kwargs) -> GlobalBatchShards:
    return GlobalBatchShards(
        index,
        split["global_batch"],
        rank=rank,
        world_size=split["world"],
        start_step=split["start_step"],
        max_samples=split["max_samples"],
        **kwargs,
    )


def _expected_samples(split: dict) -> list[int]:
    used = sum(split["counts"]) if split["max_samples"] is None else min(split["max_samples"], sum(split["counts"]))
    return list(range(split["start_step"] * split["global_batch"], used))


# ----- the arithmetic -------------------------------------------------------------------------------------------------


def _memory_index(counts: list[int]) -> ShardIndex:
    shards, number = [], 0
    for shard, count in enumerate(counts):
        keys = tuple(f"s{number + i}" for i in range(count))
        number += count
        shards.append(ShardInfo(f"shard-{shard:06d}.tar", keys, ("png",) * count, (0,) * count, (1,) * count, 0))
    return ShardIndex(root=Path("/nonexistent"), shards=tuple(shards))


@settings(max_examples=4 * settings.default.max_examples)  # no I/O: a few ms each
@given(split=splits(max_shards=6, max_per_shard=9))
def test_every_sample_is_assigned_once_whatever_the_split(split):
    index = _memory_index(split["counts"])
    # The global index walks the shards in order, each position once, stepping over empty shards.
    located = [index.locate(i) for i in range(index.total)]
    assert located == [(s, p) for s, count in enumerate(split["counts"]) for p in range(count)]
    with pytest.raises(IndexError):
        index.locate(index.total)

    world, global_batch, workers = split["world"], split["global_batch"], split["workers"]
    assigned: list[int] = []
    lengths = set()
    for rank in range(world):
        dataset = _dataset(index, split, rank, transform=lambda image: image)
        steps = round_robin([list(dataset.steps(w, workers)) for w in range(workers)])
        assert steps == list(range(split["start_step"], dataset.num_steps))  # in step order
        lengths.add(len(dataset))
        for step in steps:
            rows = local_slice(step, global_batch, rank, world)
            assert len(rows) == global_batch // world
            assigned += [i for i in rows if i < dataset.num_samples]
    assert len(lengths) == 1  # every rank takes the same number of steps (collectives never hang)
    assert sorted(assigned) == _expected_samples(split)


# ----- real shards ----------------------------------------------------------------------------------------------------


def _colour(i: int) -> tuple[int, int, int]:
    return i % 256, (255 - i) % 256, (7 * i + 3) % 256


def _png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), _colour(i)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tars(folder: Path, counts: list[int], extra_member: bool, corrupt: set[int]) -> None:
    """One tar per entry of ``counts`` (an empty one for 0), webdataset style: ``s<i>.png`` per sample,
    with ``s<i>.cls`` and ``s<i>.txt`` around it when ``extra_member``; the PNGs of ``corrupt`` are truncated."""
    from webdataset import TarWriter

    number = 0
    for shard, count in enumerate(counts):
        with open(folder / f"part-{shard:03d}.tar", "wb") as stream, TarWriter(stream, encoder=False) as writer:
            for i in range(number, number + count):
                sample = {"__key__": f"s{i}", "png": _png(i)[: 20 if i in corrupt else None]}
                if extra_member:  # non-image members before and after the image (TarWriter sorts fields)
                    sample["cls"] = str(i).encode()
                    sample["txt"] = f"caption {i}".encode()
                writer.write(sample)
        number += count


def _pixels(image: Image.Image) -> torch.Tensor:
    """``[3, 1, 1]`` float, the raw 0..255 colour."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)


@given(split=splits(max_shards=4, max_per_shard=4), extra_member=st.booleans(), probe=st.booleans(), data=st.data())
def test_real_shards_give_every_sample_once_whatever_the_split(split, extra_member, probe, data):
    """Undecodable samples are read once too: their rows keep their index, flagged not valid."""
    pytest.importorskip("webdataset")
    world, local, workers = split["world"], split["global_batch"] // split["world"], split["workers"]
    # sample 0 always decodes, so that a batch without a real row can borrow its shape (probe)
    corrupt = data.draw(st.sets(st.integers(1, max(1, sum(split["counts"]) - 1))), label="corrupt")
    seen: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        _write_tars(Path(tmp), split["counts"], extra_member, corrupt)
        index = read_index(Path(tmp))  # no index.json: the tars are scanned, as for foreign shards
        assert [shard.count for shard in index.shards] == split["counts"]
        for rank in range(world):
            # without image_shape, a batch with no real row borrows the first decodable image's shape
            dataset = _dataset(index, split, rank, transform=_pixels, image_shape=None if probe else (3, 1, 1))
            read_here: list[int] = []
            if workers == 1:
                batches = list(dataset)
            else:  # what DataLoader workers yield, in the order the loader hands them out
                batches = round_robin([[dataset.batch(s) for s in dataset.steps(w, workers)] for w in range(workers)])
            dataset.close()
            expected_steps = list(range(split["start_step"], num_steps(dataset.num_samples, split["global_batch"])))
            assert len(dataset) == len(expected_steps)  # the same on every rank: collectives never hang
            assert [b["step"] for b in batches] == expected_steps
            for batch in batches:
                pixels, valid, indices = batch["pixels"], batch["valid"], batch["index"]
                assert pixels.shape == (local, 3, 1, 1) and valid.shape == indices.shape == (local,)
                assert indices.tolist() == [
                    i if i < dataset.num_samples else -1
                    for i in local_slice(batch["step"], split["global_batch"], rank, world)
                ]
                assert valid.tolist() == [i >= 0 and i not in corrupt for i in indices.tolist()]
                for row, i in zip(pixels[valid], indices[valid].tolist(), strict=True):
                    assert row.flatten().tolist() == list(_colour(i)), f"row {i} holds another sample's image"
                    assert dataset.key(i) == f"s{i}"
                assert (pixels[~valid] == 0).all()
                read_here += indices[indices >= 0].tolist()
            assert sorted(key for _, key, _ in dataset.skipped) == sorted(f"s{i}" for i in read_here if i in corrupt)
            seen += read_here
    assert sorted(seen) == _expected_samples(split)
