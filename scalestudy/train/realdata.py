"""Real image–caption data: WebDataset tar shards, a CSV of image paths, and zero-shot image folders.

A trial indexes its samples once — where each image's bytes are, and its caption — into flat arrays
(`PairIndex`: numpy offsets and sizes, captions as one utf-8 buffer with end offsets), never a
Python object per pair, and decodes images lazily, only for the rows asked for. Indexing a shard
reads only its 512-byte tar headers and its caption members (`index_shard`), never an image. With a
cache folder (the run directory's cache/), the index is written there once, atomically, by whichever
process gets the lock first, keyed by the shard paths, sizes and modification times; every other rank
and trial on the same data memory-maps it, so the pages are shared and start-up reads no shard at all.

Batch s is a pure function of (seed, s): stream position p = (s−1)·B + i is sample perm_e[p mod N]
of epoch e = p // N, each epoch its own seeded permutation of the N training samples. So resume is
exact, and a data-parallel rank (or a loader worker process) decodes only its own rows of the
global batch without talking to the others; the captions of the whole batch come from the index
alone (`train_captions`), with no image decoded. The permutation needs N, which is why every shard
is indexed (once, then cached) before the first batch.

Samples that cannot be used — an image or caption file that is missing, an empty caption, an image
PIL cannot decode, a shard that is not a readable tar — are skipped, counted by reason and logged;
they never stop the trial. An unreadable training image is replaced by a random draw from a stream
of its own stream position, so the batch keeps its size and each row stays a pure function of
(seed, step, row) whichever rows are built. Only a replaced row's caption can differ from what
`train_captions` (which decodes nothing) says; such rows are counted in `skipped()`.

The training samples are a finite pool: each row of a batch carries its sample's index into it
(`Batch.index`; a replaced row, its replacement's), which a locked image tower's feature cache
(scalestudy.train.lit) reads instead of the image. Decoding the pool for that cache (`pool_images`)
meets every unreadable image, so batches asked for without images replace exactly the rows that
decoding would.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info

from scalestudy.datafiles import class_folders, expand_braces
from scalestudy.spec import DataSpec
from scalestudy.store.files import exclusive
from scalestudy.train.data import Batch, ZeroShotSet, ZeroShotTask, mismatch_captions, random_stream

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})
# CLIP's input normalisation (per-channel mean and std of its training images); open_clip uses the
# same for its CLIP and SigLIP-style models.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# CLIP §3.1.4: zero-shot prompts are ensembled over templates; these 7 are the subset the CLIP
# authors found best on ImageNet (notebooks/Prompt_Engineering_for_ImageNet.ipynb in openai/CLIP).
CLIP_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# An unreadable training image is replaced by random draws; this many unreadable draws in a row
# means the data is broken, not merely a few bad files, and the trial stops saying so.
MAX_REPLACEMENT_DRAWS = 100
# Each skip reason is logged for its first few samples, then only counted: a shard of bad files
# must not bury the trial's log.
WARNINGS_PER_REASON = 10


@dataclass(frozen=True, slots=True)
class Sample:
    """One image–caption pair: where the image's bytes are, and its caption."""

    path: str  # the image file, or the tar shard that holds it
    offset: int  # where the image's bytes start in that file (0 for an image file)
    size: int  # how many bytes to read (-1 for an image file: all of it)
    caption: str
    name: str  # how messages name it: shard.tar:key, or the image path


class ImageReader:
    """Reads and decodes images to (S, S, 3) uint8; counts and logs every sample it skips."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.counts: Counter[str] = Counter()
        # Images found unreadable (file, offset), in the order found; the first `_reported` of them
        # a loader worker has already reported to the trial's process.
        self._unreadable: dict[tuple[str, int], None] = {}
        self._reported = 0
        # The prefetch thread and an evaluation in the trial's thread may skip at the same time.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # A loader worker started by spawn or forkserver gets a pickled copy, with a lock of its own.
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def skip(self, reason: str, what: str) -> None:
        with self._lock:
            self.counts[reason] += 1
            seen = self.counts[reason]
        if seen <= WARNINGS_PER_REASON:
            more = " (further ones are only counted)" if seen == WARNINGS_PER_REASON else ""
            log.warning("skipped %s [%s]%s", what, reason, more)

    def add(self, counts: Mapping[str, int]) -> None:
        """Count skips found and logged elsewhere: by a loader worker process, or when the cached
        index was built."""
        with self._lock:
            self.counts.update(counts)

    def skipped(self) -> dict[str, int]:
        return dict(self.counts)

    def known_unreadable(self, sample: Sample) -> bool:
        """Whether reading `sample` already failed (it is not read again)."""
        return (sample.path, sample.offset) in self._unreadable

    def new_unreadable(self) -> list[tuple[str, int]]:
        """The images found unreadable since the last call (a loader worker's report)."""
        with self._lock:
            found = list(self._unreadable)[self._reported:]
            self._reported = len(self._unreadable)
        return found

    def add_unreadable(self, found: Iterable[tuple[str, int]]) -> None:
        """Count images another process found unreadable (and logged), each image once however
        many workers met it."""
        with self._lock:
            for where in found:
                if where not in self._unreadable:
                    self._unreadable[where] = None
                    self.counts["unreadable_image"] += 1

    def read(self, sample: Sample) -> np.ndarray | None:
        """The sample's image, or None (counted once) when it cannot be read or decoded."""
        where = (sample.path, sample.offset)
        if where in self._unreadable:
            return None
        try:
            with open(sample.path, "rb") as f:
                f.seek(sample.offset)
                data = f.read(sample.size)
            return decode(data, self.image_size)
        # PIL reports a malformed file as OSError, ValueError, SyntaxError, DecompressionBombError
        # and more, depending on the format; whatever the cause, the sample is unusable.
        except Exception as err:
            with self._lock:
                self._unreadable[where] = None
            # PIL names the in-memory buffer in its "cannot identify" message, which helps nobody.
            why = f"{type(err).__name__}: {err}"
            if isinstance(err, UnidentifiedImageError):
                why = "not an image PIL can read"
            self.skip("unreadable_image", f"{sample.name}: {why}")
            return None

    def first_readable(self, samples: Iterable[Sample], limit: int) -> tuple[list[np.ndarray], list[Sample]]:
        """Up to `limit` decoded images from `samples` in order, unreadable ones skipped."""
        images, kept = [], []
        for sample in samples:
            if len(images) == limit:
                break
            image = self.read(sample)
            if image is not None:
                images.append(image)
                kept.append(sample)
        return images, kept


def decode(data: bytes, size: int) -> np.ndarray:
    """An RGB (size, size, 3) uint8 array: the image's centred square, resized (bicubic)."""
    image = Image.open(io.BytesIO(data))
    # JPEG decodes straight to the smallest DCT scale still ≥ size: far less work for photos.
    image.draft("RGB", (size, size))
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(image)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, S, S) uint8 images from (S, S, 3) arrays; data.normalize makes the model's input.

    In numpy, single-threaded: in the prefetch thread a torch op would start a second OpenMP team
    and fight the training step's threads for the cores.
    """
    return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))


# --- the index: where every usable pair's image bytes are, and its caption -----------------------

# Bump when what an index holds or how it is laid out on disk changes: the cache key includes it.
INDEX_VERSION = 1
TAR_BLOCK = 512
ZERO_BLOCK = bytes(TAR_BLOCK)  # two of them end an archive; tarfile stops at the first
# Member types whose payload is the file's bytes (tarfile's REGTYPE, AREGTYPE, CONTTYPE).
TAR_FILE_TYPES = frozenset({b"0", b"\0", b"7"})


class TarFormatError(Exception):
    """A shard stops being a readable tar at some byte: not a tar header, or a member cut short."""


def _tar_number(field: bytes) -> int:
    """A numeric header field, as tarfile.nti reads it: octal text, or GNU base-256."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _tar_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "replace")


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """A pax extended header's `<length> <key>=<value>\\n` records."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key] = value
        pos += length
    return records


def tar_files(fd: int, end: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file of an uncompressed tar, in archive order.

    Reads only the 512-byte headers (and the payloads of pax and GNU long-name records, which hold
    the next member's name): indexing an img2dataset shard of 10,000 pairs takes 0.5 s this way
    and 2.1 s with `tarfile` (development machine, loaded), which a first index of thousands of
    shards notices. Follows tarfile's reading of ustar, GNU and
    pax headers; raises TarFormatError at a block that is not a tar header or a member whose bytes
    run past the end of the file.
    """
    pos, long_name, pax = 0, None, {}
    while True:
        header = os.pread(fd, TAR_BLOCK, pos)
        if not header and pos > 0:
            return  # no end-of-archive blocks: tarfile accepts that too
        if len(header) < TAR_BLOCK:
            raise TarFormatError(f"the file ends inside a header at byte {pos}" if header else "empty file")
        if header == ZERO_BLOCK:
            return
        try:
            stored = _tar_number(header[148:156])
            size = _tar_number(header[124:136])
        except ValueError:
            stored, size = -1, 0
        # tarfile's check: the header's byte sum with its checksum field read as spaces, unsigned
        # (or, as some old tars wrote it, signed). It catches a size that sent us off a boundary.
        if (stored != 256 + sum(header) - sum(header[148:156])
                and stored != 256 + sum(struct.unpack_from("148b8x356b", header))):
            raise TarFormatError(f"byte {pos} is not a tar header")
        kind = header[156:157]
        if b"size" in pax:
            size = int(pax[b"size"]) if pax[b"size"].isdigit() else -1
        data = pos + TAR_BLOCK
        if size < 0 or data + size > end:
            raise TarFormatError(f"the member at byte {pos} runs past the end of the file (cut short)"
                                 if size >= 0 else f"the member at byte {pos} has a negative size")
        pos = data + -(-size // TAR_BLOCK) * TAR_BLOCK
        if kind == b"L":
            long_name = _tar_text(os.pread(fd, size, data))
        elif kind == b"x":
            try:
                pax = _pax_records(os.pread(fd, size, data))
            except ValueError:
                raise TarFormatError(f"the pax header at byte {data - TAR_BLOCK} is malformed") from None
        elif kind not in (b"K", b"g"):
            if b"path" in pax:
                name = pax[b"path"].decode("utf-8", "replace")
            elif long_name is not None:
                name = long_name
            else:
                name, prefix = _tar_text(header[0:100]), _tar_text(header[345:500])
                if prefix and kind != b"S":
                    name = f"{prefix}/{name}"
            if kind in TAR_FILE_TYPES and not (kind == b"\0" and name.endswith("/")):
                yield name, data, size
            long_name, pax = None, {}


@dataclass(frozen=True)
class Part:
    """The usable pairs of one source file (a shard or a CSV), in file order, and what was skipped."""

    paths: list[str]  # the files the pairs' image bytes are in
    file: list[int]  # each pair's index into paths
    offset: list[int]  # where its image's bytes start in that file (0 for an image file)
    size: list[int]  # how many bytes to read (-1 for an image file: all of it)
    captions: list[str]
    keys: list[str]  # the shard member's key ("" for an image file: its path names it)
    skips: list[tuple[str, str]]  # (reason, message), logged by the process that keeps the index


def index_shard(path: str) -> Part:
    """The pairs of one WebDataset shard, in tar order; reads headers and captions, no image.

    A sample is the members sharing a key (the member name up to the first '.' of its base name,
    as `webdataset` groups them): an image ({key}.jpg, .png, …) and a caption ({key}.txt). Other
    members (img2dataset's .json) are ignored. A truncated shard yields the samples before the break.
    """
    images: dict[str, tuple[int, int]] = {}
    captions: dict[str, str] = {}
    keys: dict[str, None] = {}  # every key in tar order
    skips: list[tuple[str, str]] = []
    try:
        # Uncompressed tars only: images are read later by seeking to their offset, which a
        # compressed stream cannot do.
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, offset, size in tar_files(fd, os.fstat(fd).st_size):
                folder, _, base = name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                extension = extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    images.setdefault(key, (offset, size))
                elif extension == "txt":
                    captions[key] = os.pread(fd, size, offset).decode("utf-8", "replace").strip()
                else:
                    continue
                keys[key] = None
        finally:
            os.close(fd)
    except (TarFormatError, OSError) as err:
        why = f"the rest of {path} after {len(keys)} keys: {err} (shards must be uncompressed .tar files)"
        skips.append(("unreadable_shard", why))
    part = Part([path], [], [], [], [], [], skips)
    for key in keys:
        name = f"{path}:{key}"
        if key not in images:
            skips.append(("missing_image", f"{name}: a caption without an image"))
        elif key not in captions:
            skips.append(("missing_caption", f"{name}: an image without a .txt caption"))
        elif not captions[key]:
            skips.append(("empty_caption", f"{name}: its caption is empty"))
        else:
            offset, size = images[key]
            for column, value in ((part.file, 0), (part.offset, offset), (part.size, size),
                                  (part.captions, captions[key]), (part.keys, key)):
                column.append(value)
    return part


def index_csv(path: str) -> Part:
    """The pairs of a CSV with `image` and `caption` columns; relative image paths are resolved
    against the CSV's folder."""
    folder = os.path.dirname(path)
    part = Part([], [], [], [], [], [], [])
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        for raw in rows:
            row = {key.strip(): value for key, value in raw.items() if key is not None}
            where = f"{path} line {rows.line_num}"
            image = (row.get("image") or "").strip()
            caption = (row.get("caption") or "").strip()
            full = os.path.join(folder, image)
            if not image or not os.path.isfile(full):
                problem = f"{full} does not exist" if image else "no image path"
                part.skips.append(("missing_image", f"{where}: {problem}"))
            elif not caption:
                part.skips.append(("empty_caption", f"{where}: empty caption for {full}"))
            else:
                for column, value in ((part.file, len(part.paths)), (part.offset, 0), (part.size, -1),
                                      (part.captions, caption), (part.keys, "")):
                    column.append(value)
                part.paths.append(full)
    return part


# The index's columns: name → dtype. A text column X is stored as X (its utf-8 bytes, one after
# another) and X_end (where each string ends in them).
TEXT_COLUMNS = ("path", "caption", "key")
COLUMNS: dict[str, np.dtype] = {
    "file": np.dtype(np.int64), "offset": np.dtype(np.int64), "size": np.dtype(np.int64),
    **{name: np.dtype(np.uint8) for name in TEXT_COLUMNS},
    **{f"{name}_end": np.dtype(np.int64) for name in TEXT_COLUMNS},
}


class PairIndex:
    """The usable pairs of a source as flat arrays (see the module docstring), or a window of them
    (`window`: the training part and the held-out tail share one index).

    40 bytes a pair plus its caption and key; a cached index is memory-mapped, so ranks and
    loader workers on one machine share its pages. `index[i]` is pair i as a `Sample`, made on demand.
    """

    def __init__(self, columns: dict[str, np.ndarray], skipped: dict[str, int],
                 directory: Path | None = None, start: int = 0, stop: int | None = None) -> None:
        self.columns, self.skipped, self.directory = columns, skipped, directory
        self.start = start
        self.stop = len(columns["file"]) if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, start: int, stop: int) -> PairIndex:
        """Pairs start..stop − 1 of this index (numbered within it), sharing its arrays."""
        return PairIndex(self.columns, self.skipped, self.directory, self.start + start, self.start + stop)

    def _text(self, name: str, i: int) -> str:
        ends = self.columns[f"{name}_end"]
        first = int(ends[i - 1]) if i else 0
        return self.columns[name][first:int(ends[i])].tobytes().decode("utf-8")

    def caption(self, i: int) -> str:
        return self._text("caption", self.start + i)

    def captions(self, pairs: list[int]) -> list[str]:
        """The captions of many pairs: their bounds looked up at once (2-3x faster than one by one,
        which a batch of 32k rows notices)."""
        rows = np.asarray(pairs, dtype=np.int64) + self.start
        ends, text = self.columns["caption_end"], self.columns["caption"]
        firsts = np.where(rows > 0, ends[rows - 1], 0).tolist()
        return [text[a:b].tobytes().decode("utf-8") for a, b in zip(firsts, ends[rows].tolist())]

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        j = self.start + i
        path, key = self._text("path", int(self.columns["file"][j])), self._text("key", j)
        return Sample(path, int(self.columns["offset"][j]), int(self.columns["size"][j]),
                      self._text("caption", j), f"{path}:{key}" if key else path)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __reduce__(self) -> tuple[Any, ...]:
        # A cached index travels to a spawned loader worker as its folder, not as a copy of its pages.
        if self.directory is not None:
            return (_window_of_cached, (self.directory, self.start, self.stop))
        return (PairIndex, (self.columns, self.skipped, None, self.start, self.stop))


def _window_of_cached(directory: Path, start: int, stop: int) -> PairIndex:
    index = open_index(directory)
    return index.window(start, stop)


class _Columns:
    """Appends parts to the index's columns: in memory, or streamed to files in `directory` (then the
    builder holds one part at a time, however large the source)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
        self.lengths = dict.fromkeys(COLUMNS, 0)
        self.skipped: Counter[str] = Counter()
        if directory is not None:
            directory.mkdir(parents=True)

    def _append(self, name: str, values: np.ndarray) -> None:
        values = values.astype(COLUMNS[name], copy=False)
        if self.directory is None:
            self.chunks[name].append(values)
        else:
            with open(self.directory / f"{name}.bin", "ab") as f:
                f.write(values.tobytes())
        self.lengths[name] += len(values)

    def _append_text(self, name: str, texts: list[str]) -> None:
        encoded = [text.encode("utf-8") for text in texts]
        ends = np.cumsum([len(e) for e in encoded], dtype=np.int64) + self.lengths[name]
        self._append(f"{name}_end", ends)
        self._append(name, np.frombuffer(b"".join(encoded), dtype=np.uint8))

    def add(self, part: Part) -> None:
        self._append("file", np.asarray(part.file, dtype=np.int64) + self.lengths["path_end"])
        self._append("offset", np.asarray(part.offset, dtype=np.int64))
        self._append("size", np.asarray(part.size, dtype=np.int64))
        self._append_text("caption", part.captions)
        self._append_text("key", part.keys)
        self._append_text("path", part.paths)
        self.skipped.update(reason for reason, _ in part.skips)

    def finish(self) -> PairIndex:
        if self.directory is None:
            columns = {name: np.concatenate(chunks) if chunks else np.empty(0, COLUMNS[name])
                       for name, chunks in self.chunks.items()}
            return PairIndex(columns, dict(self.skipped))
        meta = {"version": INDEX_VERSION, "lengths": self.lengths, "skipped": dict(self.skipped)}
        # Written last: a folder with its meta.json is complete.
        (self.directory / "meta.json").write_text(json.dumps(meta))
        return open_index(self.directory)


def open_index(directory: Path) -> PairIndex:
    """A cached index, memory-mapped (read-only)."""
    meta = json.loads((directory / "meta.json").read_text())
    columns = {}
    for name, dtype in COLUMNS.items():
        length, path = meta["lengths"][name], directory / f"{name}.bin"
        stored = path.stat().st_size if path.exists() else 0
        if stored != length * dtype.itemsize:
            raise ValueError(f"the cached index {directory} is damaged ({path.name} is not "
                             f"{length} values long); delete the folder and start the trial again")
        # np.memmap cannot map an empty file.
        columns[name] = np.memmap(path, dtype, mode="r", shape=(length,)) if length else np.empty(0, dtype)
    return PairIndex(columns, meta["skipped"], directory)


def source_files(shards: list[str] | None, csv_path: str | None) -> tuple[str, list[str]]:
    """("csv", [the CSV]) or ("webdataset", every shard the patterns name, in order)."""
    if csv_path is not None:
        return "csv", [csv_path]
    return "webdataset", [path for pattern in shards or [] for path in expand_braces(pattern)]


def _parts(kind: str, paths: list[str], processes: int) -> Iterator[Part]:
    index_file = index_csv if kind == "csv" else index_shard
    if processes < 2 or len(paths) < 2:
        yield from map(index_file, paths)
        return
    with ProcessPoolExecutor(processes) as pool:
        # In order, a few shards per task: the pool's round trips stay a small part of the work.
        yield from pool.map(index_file, paths, chunksize=max(1, len(paths) // (8 * processes)))


def build_index(kind: str, paths: list[str], reader: ImageReader, directory: Path | None = None,
                processes: int = 0) -> PairIndex:
    """Index every file of a source, logging and counting what is skipped (in `reader`); with a
    `directory`, the arrays are written there and memory-mapped. `processes` > 1 index shards in
    that many worker processes."""
    started = time.perf_counter()
    columns = _Columns(directory)
    for part in _parts(kind, paths, processes):
        for reason, message in part.skips:
            reader.skip(reason, message)
        columns.add(part)
    index = columns.finish()
    log.info("indexed %d %s files: %d pairs in %.1f s (skipped: %s)", len(paths), kind, len(index),
             time.perf_counter() - started, index.skipped or "none")
    return index


def index_key(kind: str, paths: list[str]) -> str:
    """What a cached index is valid for: the format, and each file's path, size and modification
    time (a file rewritten in place gets a new index)."""
    files = []
    for path in paths:
        try:
            stat = os.stat(path)
            files.append([path, stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([path, -1, -1])  # indexing says why it cannot be read
    text = json.dumps([INDEX_VERSION, kind, files], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_index(kind: str, paths: list[str], reader: ImageReader, cache: Path, processes: int = 0) -> PairIndex:
    """The source's index from cache/index-<key>/, built there first if no process has yet.

    One process builds (under a lock), into a private folder renamed into place when complete; the
    others wait for the lock and then map what it wrote. Skips found while building are logged by
    the builder; the others count them from the index (`reader.add`).
    """
    final = cache / f"index-{index_key(kind, paths)}"
    counted = False
    if not (final / "meta.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        with exclusive(cache / f"{final.name}.lock", "indexing"):
            if not (final / "meta.json").exists():
                private = cache / f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
                shutil.rmtree(private, ignore_errors=True)  # a crashed attempt of this same pid
                build_index(kind, paths, reader, private, processes)
                counted = True
                try:
                    os.rename(private, final)
                except OSError as err:
                    if not (final / "meta.json").exists():  # not merely another builder winning
                        raise
                    log.info("another process published %s first (%s)", final, err)
                    shutil.rmtree(private, ignore_errors=True)
    index = open_index(final)
    if not counted:
        reader.add(index.skipped)
        log.info("read the index of %d %s files from %s: %d pairs (skipped: %s)", len(paths), kind,
                 final, len(index), index.skipped or "none")
    return index


def index_source(shards: list[str] | None, csv_path: str | None, reader: ImageReader,
                 cache: Path | None = None, processes: int = 0) -> PairIndex:
    """The index of data.shards-style patterns or a data.csv-style file, whichever is given: cached
    in `cache` when one is given, else built in memory."""
    kind, paths = source_files(shards, csv_path)
    if cache is None:
        return build_index(kind, paths, reader, None, processes)
    return cached_index(kind, paths, reader, cache, processes)


class PairsDataset:
    """Image–caption pairs from WebDataset shards or a CSV: scalestudy.train.data's Dataset."""

    def __init__(
        self, train: PairIndex, held_out: PairIndex, seed: int, eval_images: int,
        caption_noise: float, reader: ImageReader, folder: ImageFolder | None,
        templates: tuple[str, ...],
    ) -> None:
        self.train, self.held_out = train, held_out
        self.seed, self.eval_images, self.caption_noise = seed, eval_images, caption_noise
        self.reader, self.folder = reader, folder
        self.classes: tuple[str, ...] = () if folder is None else folder.classes
        self.templates = templates
        self.mean, self.std = MEAN, STD
        self._orders: dict[int, np.ndarray] = {}
        self._eval: Batch | None = None
        # Decoding the next step's batch while the model trains on this one: PIL and torch release
        # the GIL, and the step's single-threaded stretches leave a core free. Started on first use.
        self._prefetch: ThreadPoolExecutor | None = None
        self._ahead: tuple[tuple[int, int, tuple[int, int, int]], Future[Batch]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A pickled copy (a spawned loader worker) starts without the read-ahead thread and batch,
        # and draws its own epoch orders (4 bytes a pair each) when it needs them.
        return {**self.__dict__, "_orders": {}, "_prefetch": None, "_ahead": None}

    @classmethod
    def from_spec(
        cls, spec: DataSpec, seed: int, reader: ImageReader, folder: ImageFolder | None,
        templates: tuple[str, ...], cache: Path | None = None,
    ) -> PairsDataset:
        source = "data.shards" if spec.kind == "webdataset" else "data.csv"
        # Indexing a large source uses the processes the trial grants its data loading.
        train = index_source(spec.shards, spec.csv, reader, cache, spec.workers)
        if spec.eval_shards is not None or spec.eval_csv is not None:
            held_out = index_source(spec.eval_shards, spec.eval_csv, reader, cache, spec.workers)
        elif len(train) > spec.eval_images:
            # No held-out source given: the last eval_images samples (in file order, the same for
            # every seed) are held out of training.
            n = len(train)
            train, held_out = train.window(0, n - spec.eval_images), train.window(n - spec.eval_images, n)
        else:
            raise ValueError(
                f"{source} has {len(train)} usable samples, too few to hold out "
                f"data.eval_images={spec.eval_images} for evaluation; lower data.eval_images or "
                "give data.eval_shards / data.eval_csv"
            )
        if not len(train) or not len(held_out):
            empty = source if not len(train) else "the held-out set"
            raise ValueError(f"{empty} has no usable samples (skipped: {reader.skipped()})")
        return cls(train, held_out, seed, spec.eval_images, spec.caption_noise, reader, folder, templates)

    def _order(self, epoch: int) -> np.ndarray:
        # The prefetch thread and the trial's thread both read orders: each call works on the dict
        # it found and publishes a new one whole, so neither can see the other's half-made cache.
        orders = self._orders
        if epoch not in orders:
            # int32 where it fits: half the memory, the same permutation as int64 (randperm draws
            # alike for both); 400 MB per epoch at 100 M pairs, two epochs kept at a time.
            n = len(self.train)
            dtype = torch.int32 if n < 2**31 else torch.int64
            order = torch.randperm(n, generator=random_stream(self.seed, "order", epoch), dtype=dtype).numpy()
            self._orders = {**{e: o for e, o in orders.items() if e == epoch - 1}, epoch: order}
            return order
        return orders[epoch]

    def _pairs(self, first: int, count: int) -> list[int]:
        """The training pairs at stream positions first … first + count − 1 (module docstring)."""
        n = len(self.train)
        positions = np.arange(first, first + count)
        pairs = np.empty(count, dtype=np.int64)
        for epoch in range(first // n, (first + count - 1) // n + 1):
            mine = positions // n == epoch
            pairs[mine] = self._order(epoch)[positions[mine] % n]
        return pairs.tolist()

    def _replacement(self, g: torch.Generator, decode: bool) -> tuple[int, np.ndarray | None]:
        """A random readable training sample's index (and image, when `decode`); without
        decoding, readable means not known to be unreadable."""
        for _ in range(MAX_REPLACEMENT_DRAWS):
            item = int(torch.randint(len(self.train), (1,), generator=g))
            if not decode:
                if not self.reader.known_unreadable(self.train[item]):
                    return item, None
                continue
            image = self.reader.read(self.train[item])
            if image is not None:
                return item, image
        raise ValueError(
            f"{MAX_REPLACEMENT_DRAWS} random training images in a row were unreadable (skipped so "
            f"far: {self.reader.skipped()}); check the data files"
        )

    @property
    def pool_size(self) -> int:
        return len(self.train)

    @property
    def pool_key(self) -> str:
        return "training samples"  # the DataSpec alone fixes them, whatever the seed

    def pool_images(self, start: int, stop: int) -> torch.Tensor:
        size = self.reader.image_size
        blank = np.zeros((size, size, 3), dtype=np.uint8)
        images = [self.reader.read(self.train[i]) for i in range(start, stop)]
        return to_tensor([blank if image is None else image for image in images])

    def train_captions(self, step: int, batch_size: int) -> list[str]:
        """The global batch's captions from the index (no image decoded), caption noise applied."""
        captions = self.train.captions(self._pairs((step - 1) * batch_size, batch_size))
        return mismatch_captions(captions, self.caption_noise, self.seed, step)

    def train_batch(
        self, step: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> Batch:
        """Rows `rows` of batch `step` (prefetched when the previous call asked for the same rows of
        step − 1); starts decoding the same rows of step + 1.

        In a loader worker process (scalestudy.train.loader) there is no read-ahead: the worker's
        next step is data.workers steps on, built by the same worker only then.
        """
        if not images:
            return self.assemble(step, batch_size, rows, images=False)  # nothing to read ahead
        if get_worker_info() is not None:
            return self.assemble(step, batch_size, rows)
        key = (batch_size, rows.indices(batch_size))
        ahead = self._ahead
        if ahead is not None and ahead[0] == (step, *key):
            batch = ahead[1].result()
        else:
            if ahead is not None and not ahead[1].cancel():
                ahead[1].exception()  # let it finish unused: one batch is decoded at a time
            batch = self.assemble(step, batch_size, rows)
        if self._prefetch is None:
            self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalestudy-prefetch")
        self._ahead = ((step + 1, *key), self._prefetch.submit(self.assemble, step + 1, batch_size, rows))
        return batch

    def assemble(
        self, step: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> Batch:
        """Decode rows `rows` of batch `step`: a pure function of (seed, step, batch_size, row) and
        the files, so any slice equals the same rows of the whole batch."""
        first = (step - 1) * batch_size
        pairs = self._pairs(first, batch_size)
        captions = self.train.captions(pairs)
        decoded, items = [], []
        mine = range(*rows.indices(batch_size))
        for row in mine:
            item = pairs[row]
            if images:
                image = self.reader.read(self.train[item])
                unusable = image is None
            else:
                image, unusable = None, self.reader.known_unreadable(self.train[item])
            if unusable:
                # A stream per position: the row's replacement never depends on other rows.
                item, image = self._replacement(random_stream(self.seed, "replace", first + row), images)
                captions[row] = self.train[item].caption
            items.append(item)
            if image is not None:
                decoded.append(image)
        captions = mismatch_captions(captions, self.caption_noise, self.seed, step)
        return Batch(to_tensor(decoded) if images else None, captions[rows],
                     torch.full((len(mine),), -1, dtype=torch.long), torch.tensor(items, dtype=torch.long))

    def eval_set(self) -> Batch:
        if self._eval is None:
            images, kept = self.reader.first_readable(self.held_out, self.eval_images)
            if not images:
                raise ValueError(f"no held-out image is readable (skipped: {self.reader.skipped()})")
            labels = torch.full((len(kept),), -1, dtype=torch.long)
            self._eval = Batch(to_tensor(images), [s.caption for s in kept], labels)
        return self._eval

    def zeroshot_set(self) -> ZeroShotSet | None:
        return None if self.folder is None else self.folder.zeroshot(self.templates)

    def skipped(self) -> dict[str, int]:
        return self.reader.skipped()

    def skip_report(self) -> list[tuple[str, int]]:
        """In a loader worker: the images it found unreadable since its last report."""
        return self.reader.new_unreadable()

    def add_skip_report(self, report: list[tuple[str, int]]) -> None:
        """In the trial's process: count what a worker's report says was skipped."""
        self.reader.add_unreadable(report)


class ImageFolder:
    """Zero-shot images (data.zeroshot_dir): one subfolder of images per class, sorted by name.

    At most `limit` images, taken round-robin over the classes (so classes stay balanced) in sorted
    file order; decoded on first use.
    """

    def __init__(self, root: str, names: list[str] | None, limit: int, reader: ImageReader) -> None:
        folders = class_folders(root)
        self.classes = tuple(names or [os.path.basename(f).replace("_", " ") for f in folders])
        self.reader, self.limit = reader, limit
        per_class = []
        for label, (folder, name) in enumerate(zip(folders, self.classes)):
            files = sorted(f for f in os.listdir(folder) if f.rpartition(".")[2].lower() in IMAGE_EXTENSIONS)
            if not files:
                reader.skip("empty_class_folder", f"{folder}: no images (the class stays a candidate)")
            per_class.append([(os.path.join(folder, f), label) for f in files])
        self._labels = {
            Sample(path, 0, -1, self.classes[label], path): label
            for group in itertools.zip_longest(*per_class)
            for path, label in filter(None, group)
        }
        self._batch: Batch | None = None

    def batch(self) -> Batch:
        if self._batch is None:
            images, kept = self.reader.first_readable(self._labels, self.limit)
            if not images:
                raise ValueError(f"no readable image in the class folders (skipped: {self.reader.skipped()})")
            self._batch = Batch(
                to_tensor(images),
                [s.caption for s in kept],
                torch.tensor([self._labels[s] for s in kept], dtype=torch.long),
            )
        return self._batch

    def skipped(self) -> dict[str, int]:
        return self.reader.skipped()

    def zeroshot(self, templates: tuple[str, ...]) -> ZeroShotSet:
        """The folder's images, classified over its classes with each class's templates filled in."""
        batch = self.batch()
        prompts = tuple(tuple(template.format(name) for template in templates) for name in self.classes)
        return ZeroShotSet(batch.images, (ZeroShotTask("", self.classes, prompts, batch.labels),))
