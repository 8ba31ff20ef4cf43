"""The built-in procedural image–caption dataset and the hashing word tokenizer.

Shapes: one coloured shape (circle, square, triangle, cross, diamond) of one size on a noisy tinted
background, captioned compositionally ("a large red circle on the left"). A batch is a pure function
of (seed, split, batch index), so data order needs no state beyond the step, resume is exact, and
any rank of a data-parallel trial can slice the same global batch. Rendering is vectorised over the
batch (a 256×32×32 batch takes a few milliseconds), so data never bounds a CPU step.

Two knobs turn it into an experiment: a compositional split (`data.holdout_pairs` /
`data.holdout_classes`: colour–shape pairs no training image or caption shows, evaluated with
`data.eval_pairs=unseen`) and caption noise (`data.caption_noise`: a fraction of each training batch
gets another pair's caption). Real data (WebDataset shards, CSV, image folders) is in `realdata`.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from scalestudy.spec import DataSpec
from scalestudy.train.shapes_vocab import CLASSES, COLOURS, SHAPES, SIZES, TEMPLATES, diagonal_holdout

if TYPE_CHECKING:
    from scalestudy.train.realdata import ImageFolder

# Separate random streams: training never sees an evaluation image, and the noise, data order and
# replacement draws never shift the images of a batch.
_SPLIT_SALT = {"train": 0, "eval": 0x5EED, "noise": 0x401, "order": 0x402, "replace": 0x403}


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, 3, S, S), roughly zero-mean
    captions: list[str]
    labels: torch.Tensor  # (B,) index into the dataset's classes; -1 for an image without a class


def random_stream(seed: int, split: str, index: int) -> torch.Generator:
    """The generator of one named stream (see _SPLIT_SALT) at one index (a batch, step or epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + _SPLIT_SALT[split]) * 2**20 + index)


def _position_phrase(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.08:
        return "in the centre"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def render(
    seed: int, split: str, index: int, batch_size: int, image_size: int,
    pairs: tuple[int, ...] | None = None,
) -> Batch:
    """Batch number `index` of a split: a pure function of its arguments.

    `pairs` restricts the colour–shape pairs drawn (indices into CLASSES); None draws all 40.
    """
    g = random_stream(seed, split, index)
    n = batch_size
    if pairs is None:
        colour = torch.randint(len(COLOURS), (n,), generator=g)
        shape = torch.randint(len(SHAPES), (n,), generator=g)
    else:
        pair = torch.tensor(pairs)[torch.randint(len(pairs), (n,), generator=g)]
        colour, shape = pair // len(SHAPES), pair % len(SHAPES)
    large = torch.randint(2, (n,), generator=g).bool()
    radius = torch.where(large, SIZES["large"], SIZES["small"]) * (
        0.9 + 0.2 * torch.rand(n, generator=g)
    )
    cx = 0.3 + 0.4 * torch.rand(n, generator=g)
    cy = 0.3 + 0.4 * torch.rand(n, generator=g)
    background = 0.25 * torch.rand(n, 3, generator=g)

    axis = (torch.arange(image_size) + 0.5) / image_size
    dx = axis.view(1, 1, -1) - cx.view(-1, 1, 1)  # (B, 1, S)
    dy = axis.view(1, -1, 1) - cy.view(-1, 1, 1)  # (B, S, 1)
    r = radius.view(-1, 1, 1)
    adx, ady = dx.abs(), dy.abs()
    masks = torch.stack(
        [
            dx**2 + dy**2 < r**2,
            torch.maximum(adx, ady) < 0.8 * r,
            (dy < 0.7 * r) & (dy > -r) & (adx < 0.55 * (dy + r)),
            ((adx < 0.3 * r) & (ady < r)) | ((ady < 0.3 * r) & (adx < r)),
            adx + ady < r,
        ],
        dim=1,
    )  # (B, shapes, S, S)
    mask = masks[torch.arange(n), shape].unsqueeze(1).float()  # (B, 1, S, S)
    rgb = torch.tensor(list(COLOURS.values()))[colour].view(n, 3, 1, 1)
    image = background.view(n, 3, 1, 1) * (1 - mask) + rgb * mask
    image = image + 0.05 * torch.randn(n, 3, image_size, image_size, generator=g)
    images = (image - 0.4) / 0.3

    colour_names, sizes = list(COLOURS), list(SIZES)
    captions = [
        f"a {sizes[int(l)]} {colour_names[int(c)]} {SHAPES[int(s)]} {_position_phrase(float(x), float(y))}"
        for c, s, l, x, y in zip(colour, shape, large.long(), cx, cy)
    ]
    labels = colour * len(SHAPES) + shape
    return Batch(images=images, captions=captions, labels=labels)


class Dataset(Protocol):
    """What a trial needs from its data: training batches by step, and held-out evaluation sets."""

    classes: tuple[str, ...]  # zero-shot class names; empty when the data has no zero-shot set
    templates: tuple[str, ...]  # prompt templates, each with one "{}" for the class name

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of 1-based `step`; the same arguments always give the same batch."""
        ...

    def eval_set(self) -> Batch:
        """Held-out image–caption pairs for retrieval (labels: their class, or -1 without one)."""
        ...

    def zeroshot_set(self) -> Batch | None:
        """Held-out images labelled with indices into `classes`; None when there are no classes."""
        ...

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far because they could not be used, counted by reason."""
        ...


def mismatch_captions(captions: list[str], fraction: float, seed: int, step: int) -> list[str]:
    """Label noise as in SigLIP's robustness study (Zhai et al. 2023; batch-alignment noise):
    round(fraction × B) rows, chosen at random from (seed, step), each get the caption of another
    row of the batch, so their caption no longer describes their image.
    """
    n = len(captions)
    count = round(fraction * n)
    if count == 0 or n < 2:
        return captions
    g = random_stream(seed, "noise", step)
    rows = torch.randperm(n, generator=g)[:count].tolist()
    offsets = torch.randint(1, n, (count,), generator=g).tolist()
    noisy = list(captions)
    for row, offset in zip(rows, offsets):
        noisy[row] = captions[(row + offset) % n]
    return noisy


@dataclass(frozen=True)
class ShapesDataset:
    """The procedural shapes; `train_pairs`/`eval_pairs` restrict the colour–shape pairs (None: all)."""

    seed: int
    image_size: int
    eval_images: int
    train_pairs: tuple[int, ...] | None = None
    eval_pairs: tuple[int, ...] | None = None
    caption_noise: float = 0.0
    classes: tuple[str, ...] = CLASSES
    templates: tuple[str, ...] = TEMPLATES
    # Zero-shot on an image folder instead of the built-in classes (data.zeroshot_dir).
    folder: ImageFolder | None = field(default=None, compare=False)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        batch = render(self.seed, "train", step, batch_size, self.image_size, self.train_pairs)
        captions = mismatch_captions(batch.captions, self.caption_noise, self.seed, step)
        return Batch(images=batch.images, captions=captions, labels=batch.labels)

    def eval_set(self) -> Batch:
        batch = render(self.seed, "eval", 0, self.eval_images, self.image_size, self.eval_pairs)
        if self.folder is None:
            return batch
        # The classes are the folder's, so the shapes' own labels index nothing.
        return Batch(batch.images, batch.captions, torch.full_like(batch.labels, -1))

    def zeroshot_set(self) -> Batch | None:
        return self.eval_set() if self.folder is None else self.folder.batch()

    def skipped(self) -> dict[str, int]:
        return {} if self.folder is None else self.folder.reader.skipped()


def shapes_dataset(
    spec: DataSpec, seed: int, folder: ImageFolder | None, templates: tuple[str, ...]
) -> ShapesDataset:
    """The shapes with the spec's compositional split and caption noise."""
    names = spec.holdout_classes or diagonal_holdout(spec.holdout_pairs)
    held_out = tuple(sorted({CLASSES.index(name) for name in names}))
    seen = tuple(i for i in range(len(CLASSES)) if i not in held_out)
    return ShapesDataset(
        seed=seed,
        image_size=spec.image_size,
        eval_images=spec.eval_images,
        train_pairs=seen if held_out else None,
        eval_pairs={"all": None, "seen": seen, "unseen": held_out}[spec.eval_pairs],
        caption_noise=spec.caption_noise,
        classes=CLASSES if folder is None else folder.classes,
        templates=templates,
        folder=folder,
    )


def make_dataset(spec: DataSpec, seed: int) -> Dataset:
    """The data a trial trains and evaluates on; real data is indexed here, decoded per batch."""
    # realdata builds on this module's Batch and random streams, so it is imported at call time.
    from scalestudy.train import realdata

    reader = realdata.ImageReader(spec.image_size)
    folder = (
        realdata.ImageFolder(spec.zeroshot_dir, spec.zeroshot_classes, spec.eval_images, reader)
        if spec.zeroshot_dir is not None
        else None
    )
    if spec.zeroshot_templates is not None:
        templates = tuple(spec.zeroshot_templates)
    else:
        templates = TEMPLATES if spec.kind == "shapes" and folder is None else realdata.CLIP_TEMPLATES
    if spec.kind == "shapes":
        return shapes_dataset(spec, seed, folder, templates)
    return realdata.PairsDataset.from_spec(spec, seed, reader, folder, templates)


class HashTokenizer:
    """Lower-cased words hashed (crc32, stable across processes) into `vocab_size − 1` ids.

    Needs no vocabulary file or download; 0 is padding. Collisions are rare at a few thousand
    buckets for caption vocabularies of a few hundred words.
    """

    def __init__(self, vocab_size: int, context_length: int) -> None:
        self.vocab_size = vocab_size
        self.context_length = context_length
        self._cache: dict[str, int] = {}

    def _id(self, word: str) -> int:
        if word not in self._cache:
            self._cache[word] = 1 + zlib.crc32(word.encode()) % (self.vocab_size - 1)
        return self._cache[word]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self._id(w) for w in re.findall(r"[a-z0-9]+", text.lower())]
            ids = ids[: self.context_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
