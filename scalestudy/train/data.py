"""The built-in procedural image–caption dataset and the hashing word tokenizer.

Shapes: one coloured shape (circle, square, triangle, cross, diamond) of one size on a noisy tinted
background, captioned compositionally ("a large red circle on the left"). A batch is a pure function
of (seed, split, batch index), so data order needs no state beyond the step, resume is exact, and
any rank of a data-parallel trial can slice the same global batch. Rendering is vectorised over the
batch (a 256×32×32 batch takes a few milliseconds), so data never bounds a CPU step.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Protocol

import torch

from scalestudy.spec import DataSpec

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "orange": (1.0, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
    "cyan": (0.1, 0.9, 0.9),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
SIZES = {"small": 0.14, "large": 0.24}  # radius as a fraction of the image side
# Zero-shot classes are colour–shape pairs, so chance is 1/40; prompts ensemble as in CLIP §3.1.4.
CLASSES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
TEMPLATES = ("a {}", "a small {}", "a large {}", "a picture of a {}")

# Separate streams so training never sees an evaluation image.
_SPLIT_SALT = {"train": 0, "eval": 0x5EED}


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, 3, S, S), roughly zero-mean
    captions: list[str]
    labels: torch.Tensor  # (B,) index into CLASSES


def _generator(seed: int, split: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + _SPLIT_SALT[split]) * 2**20 + index)


def _position_phrase(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.08:
        return "in the centre"
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def render(seed: int, split: str, index: int, batch_size: int, image_size: int) -> Batch:
    """Batch number `index` of a split: a pure function of its arguments."""
    g = _generator(seed, split, index)
    n = batch_size
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
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
    """What a trial needs from its data: training batches by step, and a held-out evaluation set."""

    classes: tuple[str, ...]  # zero-shot class names
    templates: tuple[str, ...]  # prompt templates, each with one "{}" for the class name

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of 1-based `step`; the same arguments always give the same batch."""
        ...

    def eval_set(self) -> Batch:
        """Held-out images with their captions and class labels."""
        ...


@dataclass(frozen=True)
class ShapesDataset:
    seed: int
    image_size: int
    eval_images: int
    classes: tuple[str, ...] = CLASSES
    templates: tuple[str, ...] = TEMPLATES

    def train_batch(self, step: int, batch_size: int) -> Batch:
        return render(self.seed, "train", step, batch_size, self.image_size)

    def eval_set(self) -> Batch:
        return render(self.seed, "eval", 0, self.eval_images, self.image_size)


def make_dataset(spec: DataSpec, seed: int) -> Dataset:
    return ShapesDataset(seed=seed, image_size=spec.image_size, eval_images=spec.eval_images)


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
