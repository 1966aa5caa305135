"""Webdataset tar shards of raw image files, with a size index that lets a reader seek to any sample.

A shard is a plain (uncompressed) tar written by ``webdataset.TarWriter``: one member ``<key>.<ext>``
per sample holding the original file bytes, so any webdataset pipeline reads it. Video shards
(``videos=True``) hold one ``<key>.npy`` member per video instead: its decoded frames, a uint8 array
``[frames, height, width, 3]`` (RGB), readable without a video decoder. Beside the shards,
``index.json`` records for every sample its key, extension, and the byte offset and size of its data
inside the tar. The calibration loader needs the total count up front (every rank must run the same
number of steps) and random access by global sample index (each rank reads only its slice of a step);
the index gives both without opening a shard.

Command line::

    python -m dymu_lightning shards IMAGES_DIR OUT_DIR [--shard-size 1000] [--prefix shard] [--videos]
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from dymu_lightning.files import write_text_atomic

INDEX_NAME = "index.json"
SCHEMA_VERSION = 1
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_IMAGE_EXTS = frozenset(s.lstrip(".") for s in IMAGE_SUFFIXES)
FRAMES_EXT = "npy"  # a video sample's member: its frames, [frames, height, width, 3] uint8
_CREATE_HINT = "create one with `python -m dymu_lightning shards IMAGES_DIR {out}`"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    """One tar file and its samples, in tar order. ``offsets[i]``/``sizes[i]`` locate the data of
    sample i (not its header) in bytes from the start of the file."""

    name: str
    keys: tuple[str, ...]
    exts: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    nbytes: int  # size of the tar file when indexed: a changed size means the index is stale

    @property
    def count(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class ShardIndex:
    """The size index of a shard folder: shards in order, samples numbered globally across them."""

    root: Path
    shards: tuple[ShardInfo, ...]
    path: Path | None = None  # the index.json it was read from; None when built by scanning the tars

    @cached_property
    def total(self) -> int:
        return sum(shard.count for shard in self.shards)

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Global index of each shard's first sample."""
        starts, running = [], 0
        for shard in self.shards:
            starts.append(running)
            running += shard.count
        return tuple(starts)

    def shard_path(self, shard: int) -> Path:
        return self.root / self.shards[shard].name

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number, position in shard)`` of global sample ``index``."""
        if not 0 <= index < self.total:
            raise IndexError(f"sample {index} out of range 0..{self.total - 1}")
        # The last shard starting at or before index (bisect_right also steps over empty shards).
        shard = bisect.bisect_right(self.starts, index) - 1
        return shard, index - self.starts[shard]


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def write_shards(
    images: Path | Sequence[Path],
    out_dir: Path,
    shard_size: int = 1000,
    prefix: str = "shard",
    *,
    overwrite: bool = False,
    videos: bool = False,
) -> Path:
    """Pack image files into ``{prefix}-{i:06d}.tar`` shards plus ``index.json``; returns the index path.

    Args:
        images: a folder (searched recursively, image suffixes only, sorted by relative path) or an
            explicit list of files, kept in the given order. With ``videos``: videos, see
            :func:`video_sources`.
        out_dir: created if missing.
        shard_size: samples per shard (the last one may hold fewer).
        prefix: shard file name prefix.
        overwrite: replace an earlier dataset in ``out_dir`` (its index and ``{prefix}-*.tar`` shards).
        videos: write video shards, one ``<key>.npy`` frames array per video.

    Sample keys are the file stems made safe for webdataset (which splits a member name at its first
    dot) and unique. Shards are built in a hidden folder, moved into place when all are complete, and
    ``index.json`` is written last, so a killed writer never leaves an index naming partial shards.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '_' or '-', got {prefix!r}")
    files = video_sources(images) if videos else image_files(images)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir, prefix, overwrite)

    staging = out_dir / f".{prefix}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # only ever ours: left by a killed writer
    staging.mkdir()
    keys = _unique_keys(files)
    shards = []
    for number, start in enumerate(range(0, len(files), shard_size)):
        name = f"{prefix}-{number:06d}.tar"
        chunk = range(start, min(start + shard_size, len(files)))
        _write_tar(staging / name, [(keys[i], files[i]) for i in chunk], videos)
        shards.append(scan_tar(staging / name))
    for shard in shards:
        os.replace(staging / shard.name, out_dir / shard.name)
    staging.rmdir()

    index_path = out_dir / INDEX_NAME
    _write_json_atomic(index_path, _index_payload(shards))
    return index_path


def image_files(images: Path | Sequence[Path]) -> list[Path]:
    """The image files of a folder (recursively, in path order) or of a list, checked."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        found = sorted(
            (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
        if not found:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
        return found
    files = [Path(p) for p in images]
    if not files:
        raise ValueError("no images given")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path}: not an image suffix (expected one of {sorted(IMAGE_SUFFIXES)})")
    return files


def video_sources(videos: Path | Sequence[Path]) -> list[Path]:
    """The videos of a folder (its ``.npy`` files and its sub-folders of frame images, one video each,
    sorted by name) or of a list of such paths, checked."""
    if isinstance(videos, (str, Path)):
        folder = Path(videos)
        if not folder.is_dir():
            raise FileNotFoundError(f"video folder not found: {folder}")
        found = sorted(p for p in folder.iterdir() if p.suffix == f".{FRAMES_EXT}" or p.is_dir())
        if not found:
            raise ValueError(f"no videos (.{FRAMES_EXT} files or folders of frame images) in {folder}")
        return found
    found = [Path(p) for p in videos]
    if not found:
        raise ValueError("no videos given")
    for path in found:
        if not (path.is_dir() or (path.is_file() and path.suffix == f".{FRAMES_EXT}")):
            raise FileNotFoundError(f"{path}: not a .{FRAMES_EXT} file or a folder of frame images")
    return found


def frames_header(data: bytes) -> tuple[int, int, int, int]:
    """``(frames, height, width, 3)`` from the start of a ``.npy`` frames array; ValueError unless it
    is a uint8 array of that shape (``data`` need only hold the header)."""
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} is not read here (1.0 or 2.0)")
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise ValueError(f"expected frames of uint8 [frames, height, width, 3], got {dtype} {list(shape)}")
    return tuple(shape)


def _video_bytes(source: Path) -> bytes:
    """The ``.npy`` bytes of one video: a checked ``.npy`` file as it is, or a folder's frame images
    (sorted by name, all of one size) stacked."""
    if source.is_file():
        data = source.read_bytes()
        try:
            frames_header(data)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        return data
    frames = []
    for path in image_files(source):
        with Image.open(path) as image:
            frames.append(np.asarray(image.convert("RGB")))
        if frames[-1].shape != frames[0].shape:
            raise ValueError(
                f"{path}: a frame of {frames[-1].shape[1]} x {frames[-1].shape[0]} px in a video of "
                f"{frames[0].shape[1]} x {frames[0].shape[0]} px frames"
            )
    stream = io.BytesIO()
    np.save(stream, np.stack(frames), allow_pickle=False)
    return stream.getvalue()


def _clear_previous(out_dir: Path, prefix: str, overwrite: bool) -> None:
    """Refuse to mix with an earlier dataset unless asked; when overwriting, drop the old index
    *first* so that no index ever names a shard that is being replaced."""
    previous = sorted(out_dir.glob(f"{prefix}-*.tar"))
    index_path = out_dir / INDEX_NAME
    if index_path.exists():
        previous.insert(0, index_path)
    if not previous:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {previous[0].name}"
            + (f" and {len(previous) - 1} more" if len(previous) > 1 else "")
            + ": choose another folder or prefix, or overwrite (--overwrite)"
        )
    index_path.unlink(missing_ok=True)
    for path in previous:
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", path.name):
            path.unlink()


def _sample_key(path: Path) -> str:
    # webdataset takes everything up to the first dot of a member name as the key, and a name over
    # 100 bytes costs an extra 1 KiB pax header per member: keep ASCII word characters, bounded length.
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem).strip("_")[:80]
    return key or "image"


def _unique_keys(files: list[Path]) -> list[str]:
    seen: set[str] = set()
    keys = []
    for path in files:
        base = key = _sample_key(path)
        n = 0
        while key in seen:
            n += 1
            key = f"{base}_{n}"
        seen.add(key)
        keys.append(key)
    return keys


def _sample_ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _write_tar(path: Path, samples: list[tuple[str, Path]], videos: bool = False) -> None:
    from webdataset import TarWriter  # the writer is the only place that needs webdataset

    with open(path, "wb") as stream:
        # encoder=False: store the file bytes as they are. mtime: an *int* fixed time, so equal inputs
        # give equal shards; TarWriter ignores its `format` argument and writes PAX tars, where a float
        # mtime (its default is time.time()) adds a 1 KiB pax header to every member.
        with TarWriter(stream, encoder=False, mtime=0) as writer:
            for key, source in samples:
                if videos:
                    writer.write({"__key__": key, FRAMES_EXT: _video_bytes(source)})
                else:
                    writer.write({"__key__": key, _sample_ext(source): source.read_bytes()})
        stream.flush()
        os.fsync(stream.fileno())


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, separators=(",", ":")))


def _index_payload(shards: Sequence[ShardInfo]) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "total": sum(s.count for s in shards),
        "shards": [
            {
                "name": s.name,
                "count": s.count,
                "bytes": s.nbytes,
                "keys": list(s.keys),
                "exts": list(s.exts),
                "offsets": list(s.offsets),
                "sizes": list(s.sizes),
            }
            for s in shards
        ],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_index(path: Path) -> ShardIndex:
    """The size index of a shard folder.

    ``path`` is ``index.json`` itself or the folder holding it. A folder of ``.tar`` shards without an
    index (shards written by other webdataset tools) is indexed by scanning the tar headers, in memory:
    nothing is written into that folder.

    Raises:
        FileNotFoundError: the index or a shard it names is missing (the message names the path).
        ValueError: the index is malformed, or a shard's size differs from the one recorded.
    """
    path = Path(path)
    if path.is_dir():
        index_path = path / INDEX_NAME
        if not index_path.exists():
            return _scan_folder(path)
    else:
        index_path = path
        if not index_path.exists():
            out = path.parent if path.name == INDEX_NAME else path
            raise FileNotFoundError(f"shard index not found: {index_path}; {_CREATE_HINT.format(out=out)}")
    with open(index_path) as stream:
        payload = json.load(stream)
    index = _parse_index(payload, index_path)
    _check_shards(index)
    return index


def _parse_index(payload: dict, index_path: Path) -> ShardIndex:
    version = payload.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{index_path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    shards = []
    for entry in payload["shards"]:
        shard = ShardInfo(
            name=entry["name"],
            keys=tuple(entry["keys"]),
            exts=tuple(entry["exts"]),
            offsets=tuple(entry["offsets"]),
            sizes=tuple(entry["sizes"]),
            nbytes=int(entry["bytes"]),
        )
        lengths = {entry["count"], len(shard.exts), len(shard.offsets), len(shard.sizes)}
        if lengths != {shard.count}:
            raise ValueError(f"{index_path}: shard {shard.name} has inconsistent sample lists")
        shards.append(shard)
    index = ShardIndex(root=index_path.parent, shards=tuple(shards), path=index_path)
    if index.total != payload["total"]:
        raise ValueError(f"{index_path}: total {payload['total']} != {index.total} samples listed in its shards")
    return index


def _check_shards(index: ShardIndex) -> None:
    for number, shard in enumerate(index.shards):
        shard_path = index.shard_path(number)
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard_path} named by {index.path} is missing")
        size = shard_path.stat().st_size
        if size != shard.nbytes:
            raise ValueError(
                f"shard {shard_path} is {size} bytes but {index.path} recorded {shard.nbytes}: "
                "the shard changed after indexing; rewrite the shards or delete the index to rescan"
            )


def _scan_folder(folder: Path) -> ShardIndex:
    tars = sorted(p for p in folder.iterdir() if p.name.endswith(".tar") and p.is_file())
    if not tars:
        compressed = [p.name for p in folder.iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        why = " (compressed shards cannot be read by offset)" if compressed else ""
        raise FileNotFoundError(
            f"no {INDEX_NAME} and no .tar shards in {folder}{why}; {_CREATE_HINT.format(out=folder)}"
        )
    shards = tuple(scan_tar(p) for p in tars)
    log.info(
        "indexed %d samples in %d shards of %s by scanning (no %s)",
        sum(s.count for s in shards),
        len(tars),
        folder,
        INDEX_NAME,
    )
    return ShardIndex(root=folder, shards=shards, path=None)


def scan_tar(path: Path) -> ShardInfo:
    """Index one tar by reading its headers. Members are grouped into samples the way webdataset does
    (key = name up to the first dot of the file name; consecutive members with one key form a
    sample) and each sample's first image member is indexed, or else its first ``.npy`` member (a
    video's frames); samples with neither are skipped."""
    keys, exts, offsets, sizes = [], [], [], []
    skipped = 0
    for key, members in _samples_in_tar(path):
        kinds = [_member_ext(m.name).rsplit(".", 1)[-1] for m in members]
        image = next((m for m, kind in zip(members, kinds, strict=True) if kind in _IMAGE_EXTS), None)
        if image is None:
            image = next((m for m, kind in zip(members, kinds, strict=True) if kind == FRAMES_EXT), None)
        if image is None:
            skipped += 1
            continue
        keys.append(key)
        exts.append(_member_ext(image.name))
        offsets.append(image.offset_data)
        sizes.append(image.size)
    if skipped:
        log.warning("%s: %d samples without an image or .npy member were left out of the index", path, skipped)
    return ShardInfo(
        name=path.name,
        keys=tuple(keys),
        exts=tuple(exts),
        offsets=tuple(offsets),
        sizes=tuple(sizes),
        nbytes=path.stat().st_size,
    )


def _split_member(name: str) -> tuple[str, str] | None:
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else None


def _member_ext(name: str) -> str:
    split = _split_member(name)
    return split[1].lower() if split else ""


def _samples_in_tar(path: Path) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    # Random-access mode ("r:") seeks over member data, so only headers are read.
    with tarfile.open(path, "r:") as tar:
        key, members = None, []
        for member in tar:
            split = _split_member(member.name)
            if not member.isreg() or split is None:
                continue
            if split[0] != key:
                if members:
                    yield key, members
                key, members = split[0], []
            members.append(member)
        if members:
            yield key, members


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def write_shards_command(
    src: Path, out: Path, shard_size: int, prefix: str, overwrite: bool, videos: bool = False
) -> int:
    """The ``shards`` command: pack the images (``videos``: the videos) of ``src`` into shards in ``out``."""
    index_path = write_shards(src, out, shard_size, prefix, overwrite=overwrite, videos=videos)
    index = read_index(index_path)
    nbytes = sum(s.nbytes for s in index.shards)
    print(f"wrote {len(index.shards)} shards, {index.total} samples, {nbytes} bytes to {out}")
    print(f"index: {index_path}")
    return 0
