"""Real image–caption data: WebDataset tar shards, a CSV of image paths, and zero-shot image folders.

A trial builds an index of its samples once (where each image's bytes are, and its caption) and
decodes images lazily, only for the rows asked for. Batch s is a pure function of (seed, s):
stream position p = (s−1)·B + i is sample perm_e[p mod N] of epoch e = p // N, each epoch its own
seeded permutation of the N training samples. So resume is exact, and a data-parallel rank decodes
only its own rows of the global batch without talking to the others; the captions of the whole
batch come from the index alone (`train_captions`), with no image decoded.

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
import io
import itertools
import logging
import os
import tarfile
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from scalestudy.datafiles import class_folders, expand_braces
from scalestudy.spec import DataSpec
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
        self._unreadable: set[tuple[str, int]] = set()
        # The prefetch thread and an evaluation in the trial's thread may skip at the same time.
        self._lock = threading.Lock()

    def skip(self, reason: str, what: str) -> None:
        with self._lock:
            self.counts[reason] += 1
            seen = self.counts[reason]
        if seen <= WARNINGS_PER_REASON:
            more = " (further ones are only counted)" if seen == WARNINGS_PER_REASON else ""
            log.warning("skipped %s [%s]%s", what, reason, more)

    def skipped(self) -> dict[str, int]:
        return dict(self.counts)

    def known_unreadable(self, sample: Sample) -> bool:
        """Whether reading `sample` already failed (it is not read again)."""
        return (sample.path, sample.offset) in self._unreadable

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
                self._unreadable.add(where)
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


def index_shard(path: str, reader: ImageReader) -> list[Sample]:
    """The pairs of one WebDataset shard, in tar order.

    A sample is the members sharing a key (the member name up to the first '.' of its base name,
    as `webdataset` groups them): an image ({key}.jpg, .png, …) and a caption ({key}.txt). Other
    members (img2dataset's .json) are ignored. A truncated shard yields the samples before the break.
    """
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, str] = {}
    keys: dict[str, None] = {}  # every key in tar order
    try:
        # "r:" reads uncompressed tars only: images are read later by seeking to their offset,
        # which a compressed stream cannot do.
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                folder, _, base = member.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if not (member.isfile() and dot):
                    continue
                key = f"{folder}/{stem}" if folder else stem
                extension = extension.lower()
                if extension in IMAGE_EXTENSIONS:
                    images.setdefault(key, member)
                elif extension == "txt":
                    captions[key] = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                else:
                    continue
                keys[key] = None
    except (tarfile.TarError, OSError) as err:
        reader.skip("unreadable_shard", f"the rest of {path} after {len(keys)} keys: {err} (shards "
                    "must be uncompressed .tar files)")
    samples = []
    for key in keys:
        name = f"{path}:{key}"
        if key not in images:
            reader.skip("missing_image", f"{name}: a caption without an image")
        elif key not in captions:
            reader.skip("missing_caption", f"{name}: an image without a .txt caption")
        elif not captions[key]:
            reader.skip("empty_caption", f"{name}: its caption is empty")
        else:
            member = images[key]
            samples.append(Sample(path, member.offset_data, member.size, captions[key], name))
    return samples


def index_csv(path: str, reader: ImageReader) -> list[Sample]:
    """The pairs of a CSV with `image` and `caption` columns; relative image paths are resolved
    against the CSV's folder."""
    folder = os.path.dirname(path)
    samples = []
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
                reader.skip("missing_image", f"{where}: {problem}")
            elif not caption:
                reader.skip("empty_caption", f"{where}: empty caption for {full}")
            else:
                samples.append(Sample(full, 0, -1, caption, full))
    return samples


def index_source(shards: list[str] | None, csv_path: str | None, reader: ImageReader) -> list[Sample]:
    """The samples of data.shards-style patterns or a data.csv-style file, whichever is given."""
    if csv_path is not None:
        return index_csv(csv_path, reader)
    paths = [path for pattern in shards or [] for path in expand_braces(pattern)]
    return [sample for path in paths for sample in index_shard(path, reader)]


class PairsDataset:
    """Image–caption pairs from WebDataset shards or a CSV: scalestudy.train.data's Dataset."""

    def __init__(
        self, train: list[Sample], held_out: list[Sample], seed: int, eval_images: int,
        caption_noise: float, reader: ImageReader, folder: ImageFolder | None,
        templates: tuple[str, ...],
    ) -> None:
        self.train, self.held_out = train, held_out
        self.seed, self.eval_images, self.caption_noise = seed, eval_images, caption_noise
        self.reader, self.folder = reader, folder
        self.classes: tuple[str, ...] = () if folder is None else folder.classes
        self.templates = templates
        self.mean, self.std = MEAN, STD
        self._orders: dict[int, list[int]] = {}
        self._eval: Batch | None = None
        # Decoding the next step's batch while the model trains on this one: PIL and torch release
        # the GIL, and the step's single-threaded stretches leave a core free.
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scalestudy-prefetch")
        self._ahead: tuple[tuple[int, int, tuple[int, int, int]], Future[Batch]] | None = None

    @classmethod
    def from_spec(
        cls, spec: DataSpec, seed: int, reader: ImageReader, folder: ImageFolder | None,
        templates: tuple[str, ...],
    ) -> PairsDataset:
        source = "data.shards" if spec.kind == "webdataset" else "data.csv"
        train = index_source(spec.shards, spec.csv, reader)
        if spec.eval_shards is not None or spec.eval_csv is not None:
            held_out = index_source(spec.eval_shards, spec.eval_csv, reader)
        elif len(train) > spec.eval_images:
            # No held-out source given: the last eval_images samples (in file order, the same for
            # every seed) are held out of training.
            train, held_out = train[: -spec.eval_images], train[-spec.eval_images:]
        else:
            raise ValueError(
                f"{source} has {len(train)} usable samples, too few to hold out "
                f"data.eval_images={spec.eval_images} for evaluation; lower data.eval_images or "
                "give data.eval_shards / data.eval_csv"
            )
        if not train or not held_out:
            empty = source if not train else "the held-out set"
            raise ValueError(f"{empty} has no usable samples (skipped: {reader.skipped()})")
        return cls(train, held_out, seed, spec.eval_images, spec.caption_noise, reader, folder, templates)

    def _order(self, epoch: int) -> list[int]:
        # The prefetch thread and the trial's thread both read orders: each call works on the dict
        # it found and publishes a new one whole, so neither can see the other's half-made cache.
        orders = self._orders
        if epoch not in orders:
            order = torch.randperm(len(self.train), generator=random_stream(self.seed, "order", epoch)).tolist()
            self._orders = {**{e: o for e, o in orders.items() if e == epoch - 1}, epoch: order}
            return order
        return orders[epoch]

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

    def _item(self, position: int) -> int:
        """The index of the training sample at a stream position (see the module docstring)."""
        n = len(self.train)
        return self._order(position // n)[position % n]

    def _sample(self, position: int) -> Sample:
        return self.train[self._item(position)]

    @property
    def pool_size(self) -> int:
        return len(self.train)

    @property
    def pool_key(self) -> str:
        return "training samples"  # the DataSpec alone fixes them, whatever the seed

    def pool_images(self, start: int, stop: int) -> torch.Tensor:
        size = self.reader.image_size
        blank = np.zeros((size, size, 3), dtype=np.uint8)
        images = [self.reader.read(sample) for sample in self.train[start:stop]]
        return to_tensor([blank if image is None else image for image in images])

    def train_captions(self, step: int, batch_size: int) -> list[str]:
        """The global batch's captions from the index (no image decoded), caption noise applied."""
        first = (step - 1) * batch_size
        captions = [self._sample(first + row).caption for row in range(batch_size)]
        return mismatch_captions(captions, self.caption_noise, self.seed, step)

    def train_batch(
        self, step: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> Batch:
        """Rows `rows` of batch `step` (prefetched when the previous call asked for the same rows of
        step − 1); starts decoding the same rows of step + 1."""
        if not images:
            return self.assemble(step, batch_size, rows, images=False)  # nothing to read ahead
        key = (batch_size, rows.indices(batch_size))
        ahead = self._ahead
        if ahead is not None and ahead[0] == (step, *key):
            batch = ahead[1].result()
        else:
            if ahead is not None and not ahead[1].cancel():
                ahead[1].exception()  # let it finish unused: one batch is decoded at a time
            batch = self.assemble(step, batch_size, rows)
        self._ahead = ((step + 1, *key), self._prefetch.submit(self.assemble, step + 1, batch_size, rows))
        return batch

    def assemble(
        self, step: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> Batch:
        """Decode rows `rows` of batch `step`: a pure function of (seed, step, batch_size, row) and
        the files, so any slice equals the same rows of the whole batch."""
        first = (step - 1) * batch_size
        captions = [self._sample(first + row).caption for row in range(batch_size)]
        decoded, items = [], []
        mine = range(*rows.indices(batch_size))
        for row in mine:
            item = self._item(first + row)
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
