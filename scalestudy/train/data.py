"""The built-in procedural image–caption dataset, what a trial asks of any dataset, and the hashing
word tokenizer.

Shapes: one object — a size, a fill, a colour, a shape, a position — on a plain dark background,
with three small digits printed in the bottom-right corner, captioned with all of it ("a large
hollow red circle, top left, digits 3 7 4"; shapes_vocab explains the choice). Its 2,160,000
equally likely captions make a caption repeated within a batch rare (dup_caption_rate ≈ B / 2.16M:
0.2 % of the rows at B = 4096), so the contrastive losses' negatives are true negatives.

A batch is a pure function of (seed, split, batch index): data order needs no state beyond the step,
resume is exact, and a data-parallel rank renders only its own rows of the global batch. What the
whole batch shows is drawn first (a few numbers per row, `draw_scenes`) and only the asked-for rows
are rendered; a row's pixel noise is picked by a key drawn with the row, so any slice of rows renders
exactly as in the full batch. Rendering is vectorised over the batch (and over a run of steps,
`ShapesDataset.train_batch_run`, each batch bit for bit its own render) and images travel as uint8;
`normalize` turns them into the model's float input on whatever device holds them.

By default every step renders new scenes (an endless stream). `data.train_pool` makes the training
data a finite pool of N scenes drawn once from the seed, batches taking rows of a seeded permutation
of the pool per epoch (`pool_index`, the same order real data uses); each row carries its pool index
(`Batch.index`), which is what lets a locked image tower's features be computed once per pool
(scalestudy.train.lit). The pool keeps its scenes (a few numbers each), not images: 50,000 scenes
are drawn in a few milliseconds, and images are rendered only for the rows asked for.

Two knobs turn it into an experiment: a compositional split (`data.holdout_pairs` /
`data.holdout_classes`: colour–shape pairs no training image or caption shows, evaluated with
`data.eval_pairs=unseen`) and caption noise (`data.caption_noise`: a fraction of each training batch
gets another row's caption). Real data (WebDataset shards, CSV, image folders) is in `realdata`.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from scalestudy.train.shapes_vocab import (
    ATTRIBUTES, BACKGROUNDS, CLASSES, COLOURS, SHAPES, SIZES, caption,
)


# Separate random streams: training never sees an evaluation image, and the noise, data order,
# replacement and prompt draws never shift the images of a batch.
_SPLIT_SALT = {
    "train": 0, "eval": 0x5EED, "noise": 0x401, "order": 0x402, "replace": 0x403, "prompts": 0x404,
    "pool": 0x405,
}

# Per-channel mean and std of rendered shapes pixels (x / 255), measured over 8 × 512 training
# images at 32 px; tests/test_data.py checks them against fresh batches.
SHAPES_MEAN = (0.3223, 0.2838, 0.2890)
SHAPES_STD = (0.2674, 0.2529, 0.2566)
# Zero-shot prompts per class, sampled from the training captions with the class's attributes fixed
# (see sampled_prompts). Every class of a task shares the same draws of the free attributes, so
# class embeddings differ only in what the classes differ in; 16 keeps an evaluation cheap.
PROMPTS_PER_CLASS = 16

_OBJECT_RGB = torch.tensor(list(COLOURS.values()))
_BACKGROUND_RGB = torch.tensor(BACKGROUNDS)
_RADII = torch.tensor(list(SIZES.values()))
_DIGIT_RGB = torch.tensor([0.85, 0.85, 0.85])
# 3×5 bitmaps of the digits 0–9 (rows top to bottom, "#" inked), drawn 1 px apart at 32 px.
_FONT = torch.tensor([[[c == "#" for c in row] for row in digit.split()] for digit in (
    "### #.# #.# #.# ###", ".#. ##. .#. .#. ###", "### ..# ### #.. ###", "### ..# ### ..# ###",
    "#.# #.# ### ..# ..#", "### #.. ### ..# ###", "### #.. ### #.# ###", "### ..# ..# ..# ..#",
    "### #.# ### #.# ###", "### #.# ### ..# ###",
)])
_HOLLOW_INNER = 0.5  # a hollow shape is its outline: the shape minus itself at this scale
# The attributes drawn independently of the colour–shape pair, and the place value of each in the
# one combined draw (see draw_scenes).
_FREE = tuple(name for name in ATTRIBUTES if name not in ("colour", "shape"))
_FREE_COUNTS = torch.tensor([len(ATTRIBUTES[name]) for name in _FREE])
_FREE_PLACES = torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), _FREE_COUNTS[:-1]]), 0)
_FREE_COMBINATIONS = math.prod(len(ATTRIBUTES[name]) for name in _FREE)
_GRAIN = 0.05  # pixel noise, uniform in ±_GRAIN
_GRAIN_FIELDS = 64
# Pixels (rows × S²) of the training images rendered in one call when a run of steps is built
# ahead (ShapesDataset.train_batch_run): 512 images at 32 px, whose float RGB intermediate is 6 MB.
RENDER_AHEAD_PIXELS = 512 * 32 * 32


@dataclass(frozen=True)
class Batch:
    # (B, 3, S, S) uint8; normalize() makes the model's input on the device. None when the batch
    # was asked for without images (a locked tower's cached features stand in for them).
    images: torch.Tensor | None
    captions: list[str]
    labels: torch.Tensor  # (B,) index into the dataset's classes; -1 for an image without a class
    # (B,) long: each row's item in the dataset's finite training pool (None for an endless stream).
    index: torch.Tensor | None = None


@dataclass(frozen=True)
class ZeroShotTask:
    """One classification of the zero-shot images: class c's text embedding is the normalised mean
    of the embeddings of prompts[c] (prompt ensembling, CLIP §3.1.4)."""

    name: str  # "" for the dataset's classes; an attribute ("colour") for a per-attribute task
    classes: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    labels: torch.Tensor  # (N,) each zero-shot image's index into `classes`


@dataclass(frozen=True)
class ZeroShotSet:
    """Held-out labelled images and the tasks that classify them; tasks[0] is over the dataset's
    classes (zeroshot_top1/top5 and the linear probe), any further task over one attribute."""

    images: torch.Tensor  # (N, 3, S, S) uint8
    tasks: tuple[ZeroShotTask, ...]


class ZeroShotFolder(Protocol):
    """Zero-shot classes from image files (scalestudy.train.realdata.ImageFolder)."""

    classes: tuple[str, ...]

    def zeroshot(self, templates: tuple[str, ...] | None) -> ZeroShotSet:
        """The folder's images with their class labels, prompted by `templates`."""
        ...

    def skipped(self) -> dict[str, int]:
        """Images skipped so far because they could not be read, counted by reason."""
        ...


class Dataset(Protocol):
    """What a trial needs from its data: training batches by step, and held-out evaluation sets."""

    classes: tuple[str, ...]  # zero-shot class names; empty when the data has no zero-shot set
    mean: tuple[float, float, float]  # per-channel pixel mean (of x / 255) for normalize()
    std: tuple[float, float, float]

    def train_batch(
        self, step: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> Batch:
        """Rows `rows` of the global batch of 1-based `step`, equal to slicing the whole batch; the
        same arguments always give the same batch. images=False renders or decodes no image
        (Batch.images is None), everything else as with them."""
        ...

    def train_captions(self, step: int, batch_size: int) -> list[str]:
        """The captions of the whole global batch of `step`, without decoding or rendering images."""
        ...

    def eval_set(self) -> Batch:
        """Held-out image–caption pairs for retrieval (labels: their class, or -1 without one)."""
        ...

    def zeroshot_set(self) -> ZeroShotSet | None:
        """Held-out labelled images and their zero-shot tasks; None when there are no classes."""
        ...

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far because they could not be used, counted by reason."""
        ...

    @property
    def pool_size(self) -> int | None:
        """Items of the finite training pool that Batch.index points into; None for an endless
        stream (no index)."""
        ...

    @property
    def pool_key(self) -> str:
        """What fixes the pool's images beyond the DataSpec (e.g. the seed that draws them)."""
        ...

    def pool_images(self, start: int, stop: int) -> torch.Tensor:
        """(stop − start, 3, S, S) uint8 images of pool items [start, stop); an item that cannot
        be read is all zeros (it never appears in a batch: its rows are replaced)."""
        ...


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, C, 1, 1) float32 tensors on `device`, made once: a tensor built from
    Python numbers on a GPU is a blocking host→device copy, which would stall every step."""
    def column(values: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    return column(mean), column(std)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x / 255 − mean) / std per channel of uint8 (B, 3, S, S) images, in float32 on their device:
    a batch travels as a quarter of the bytes, and the device does the arithmetic."""
    m, s = _channel_constants(tuple(mean), tuple(std), images.device)
    return (images.to(torch.float32) / 255 - m) / s


def dup_caption_rate(captions: list[str]) -> float:
    """The fraction of rows whose caption occurs in another row of the batch too: rows the
    contrastive losses score against an identical caption as if it were a negative."""
    if not captions:
        return 0.0
    counts = Counter(captions)
    return sum(counts[c] > 1 for c in captions) / len(captions)


def random_stream(seed: int, split: str, index: int) -> torch.Generator:
    """The generator of one named stream (see _SPLIT_SALT) at one index (a batch, step or epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + _SPLIT_SALT[split]) * 2**20 + index)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, n: int, epoch: int) -> torch.Tensor:
    """The seeded permutation of n pool items that `epoch` visits them in (read-only: shared)."""
    return torch.randperm(n, generator=random_stream(seed, "order", epoch))


def pool_index(seed: int, n: int, step: int, batch_size: int) -> torch.Tensor:
    """(B,) the pool items of global batch `step` (1-based): stream position p = (s−1)·B + i is
    item epoch_order(e)[p mod n] of epoch e = p // n, so every epoch shows each item once."""
    first = (step - 1) * batch_size
    positions = torch.arange(first, first + batch_size)
    if first // n == (first + batch_size - 1) // n:  # the usual case: one epoch
        return epoch_order(seed, n, first // n)[positions % n]
    index = torch.empty(batch_size, dtype=torch.long)
    epochs = positions // n
    for epoch in range(first // n, (first + batch_size - 1) // n + 1):
        where = epochs == epoch
        index[where] = epoch_order(seed, n, epoch)[positions[where] % n]
    return index


@dataclass(frozen=True)
class Scenes:
    """What n images show: each attribute's value index (into ATTRIBUTES) and the continuous draws
    that place and tint the object; rendering and captions are functions of this alone."""

    attributes: dict[str, torch.Tensor]  # name → (n,) long
    centre: torch.Tensor  # (n, 2): x, y as fractions of the side
    radius: torch.Tensor  # (n,) as a fraction of the side
    tint: torch.Tensor  # (n, 3) added to the object's colour
    background: torch.Tensor  # (n,) long: index into BACKGROUNDS (not captioned)
    shade: torch.Tensor  # (n, 3) added to the background's colour
    margin: torch.Tensor  # (n, 2) long: the digits' gap to the right and bottom edges, 1–3 px
    grain: torch.Tensor  # (n,) long: the key of the row's pixel noise

    def __len__(self) -> int:
        return len(self.radius)

    def rows(self, rows: slice | torch.Tensor) -> Scenes:
        """The scenes of a slice, or of a (k,) long index (rows may repeat)."""
        return Scenes({k: v[rows] for k, v in self.attributes.items()}, self.centre[rows],
                      self.radius[rows], self.tint[rows], self.background[rows], self.shade[rows],
                      self.margin[rows], self.grain[rows])

    def labels(self) -> torch.Tensor:
        """Index into CLASSES (colour-major, as CLASSES is ordered)."""
        return self.attributes["colour"] * len(SHAPES) + self.attributes["shape"]

    def captions(self) -> list[str]:
        columns = [[values[i] for i in self.attributes[name].tolist()] for name, values in ATTRIBUTES.items()]
        return [caption(*words) for words in zip(*columns)]


def draw_scenes(seed: int, split: str, index: int, n: int, pairs: tuple[int, ...] | None) -> Scenes:
    """The scenes of batch `index` of a split: a pure function of its arguments. `pairs` restricts
    the colour–shape pairs (indices into CLASSES); None draws all 40. Every other attribute is
    uniform and independent, so all 2,160,000 captions of the full set are equally likely."""
    return draw_scenes_run(seed, split, [index], n, pairs)


def draw_scenes_run(
    seed: int, split: str, indices: Sequence[int], n: int, pairs: tuple[int, ...] | None
) -> Scenes:
    """`draw_scenes` of each of `indices`, one after another, bit for bit: each batch's numbers
    come from its own stream, and turning them into scenes is per row, so it is done once for all
    (at B = 16 the ~20 ops of that cost more in per-call overhead than in arithmetic)."""
    allowed = torch.arange(len(CLASSES)) if pairs is None else torch.tensor(pairs)
    draws = [_draws(random_stream(seed, split, index), n, len(allowed)) for index in indices]
    code, size_jitter, cell_jitter, tint, background, shade, margin, grain = (
        parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*draws))
    # One draw over all combinations, decoded digit by digit: separate small torch.randint calls
    # on one generator are not jointly independent (at B = 4096 they repeat a caption twice as
    # often as independent draws would). Digit i is code // (c_0⋯c_{i−1}) % c_i, all at once.
    digits = code.unsqueeze(1) // _FREE_PLACES % _FREE_COUNTS
    attributes = dict(zip(_FREE, digits.unbind(1)))
    pair = allowed[code // _FREE_COMBINATIONS]
    attributes["colour"], attributes["shape"] = pair // len(SHAPES), pair % len(SHAPES)
    radius = _RADII[attributes["size"]] * (0.93 + 0.14 * size_jitter)
    cell = torch.stack([attributes["position"] % 3, attributes["position"] // 3], dim=1)
    # Cells 0, 1, 2 put the centre at the start, middle or end of the range it can take (the object
    # may cross the edge by 5 % of its radius), jittered by ±8 % of the range: cells stay apart
    # even for a large object, whose centre has the least room.
    t = (cell / 2 + 0.16 * (cell_jitter - 0.5)).clamp(0, 1)
    reach = 0.95 * radius.unsqueeze(1)
    centre = reach + t * (1 - 2 * reach)
    # The digits move a little (margin 1–3 px), so reading them takes more than one fixed pattern.
    return Scenes(attributes, centre, radius, 0.12 * (tint - 0.5), background, 0.08 * (shade - 0.5),
                  1 + margin, grain)


def _draws(g: torch.Generator, n: int, pairs: int) -> tuple[torch.Tensor, ...]:
    """The random numbers of n scenes, in the order they are taken from `g`: the combination
    code, the size and cell jitters, the tint, the background, the shade, the digits' margin and
    the grain key (uniform [0, 1) or integer draws; `draw_scenes_run` turns them into scenes)."""
    return (torch.randint(pairs * _FREE_COMBINATIONS, (n,), generator=g),
            torch.rand(n, generator=g), torch.rand(n, 2, generator=g),
            torch.rand(n, 3, generator=g), torch.randint(len(BACKGROUNDS), (n,), generator=g),
            torch.rand(n, 3, generator=g), torch.randint(3, (n, 2), generator=g),
            torch.randint(2**31, (n,), generator=g))


def _digits_mask(scenes: Scenes, size: int) -> torch.Tensor:
    """(n, S, S): the pixels of each scene's three digits in the bottom-right corner (3×5 px each
    at 32 px, scaled by S // 32)."""
    n, scale = len(scenes), max(1, size // 32)
    gap = torch.zeros(n, 5, 1, dtype=torch.bool)
    parts = [_FONT[scenes.attributes["digit1"]], gap, _FONT[scenes.attributes["digit2"]], gap,
             _FONT[scenes.attributes["digit3"]]]
    glyphs = torch.cat(parts, dim=2)
    if scale > 1:
        glyphs = glyphs.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    height, width = glyphs.shape[1:]
    top_left = torch.tensor([size - width, size - height]) - scale * scenes.margin  # (n, 2): x, y
    ys = top_left[:, 1].view(n, 1, 1) + torch.arange(height).view(1, -1, 1)
    xs = top_left[:, 0].view(n, 1, 1) + torch.arange(width).view(1, 1, -1)
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    mask[torch.arange(n).view(n, 1, 1), ys.clamp(0, size - 1), xs.clamp(0, size - 1)] = glyphs
    return mask


class _Offsets:
    """A block of rows' pixel offsets from their centres, dx (n, 1, S) and dy (n, S, 1), with the
    per-shape quantities that do not depend on the radius computed once (a hollow shape asks
    again at half the radius)."""

    def __init__(self, dx: torch.Tensor, dy: torch.Tensor) -> None:
        self.dx, self.dy = dx, dy
        self._cache: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor:
        """|dx| ("adx"), |dy| ("ady"), dx² + dy² ("square"), max(|dx|, |dy|) ("max") or
        |dx| + |dy| ("sum")."""
        if name not in self._cache:
            if name == "adx":
                value = self.dx.abs()
            elif name == "ady":
                value = self.dy.abs()
            elif name == "square":
                value = self.dx**2 + self.dy**2
            elif name == "max":
                value = torch.maximum(self.get("adx"), self.get("ady"))
            else:
                value = self.get("adx") + self.get("ady")
            self._cache[name] = value
        return self._cache[name]

    def rows(self, rows: slice) -> _Offsets:
        part = _Offsets(self.dx[rows], self.dy[rows])
        part._cache = {name: value[rows] for name, value in self._cache.items()}
        return part


def _shape_mask(shape: int, at: _Offsets, r: torch.Tensor) -> torch.Tensor:
    """(n, S, S): where a shape of radius r (n, 1, 1) covers the pixels at offsets `at` from its
    centre."""
    name, dy = SHAPES[shape], at.dy
    if name == "circle":
        return at.get("square") < r**2
    if name == "square":
        return at.get("max") < 0.8 * r
    if name == "triangle":
        return (dy < 0.7 * r) & (dy > -r) & (at.get("adx") < 0.55 * (dy + r))
    if name == "cross":
        adx, ady = at.get("adx"), at.get("ady")
        return ((adx < 0.3 * r) & (ady < r)) | ((ady < 0.3 * r) & (adx < r))
    return at.get("sum") < r  # diamond


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> torch.Tensor:
    """The pixel centres along one side, as fractions of the side."""
    return (torch.arange(size) + 0.5) / size


def _object_mask(scenes: Scenes, size: int) -> torch.Tensor:
    """(n, S, S): the pixels each scene's object covers (a hollow one: its outline only). Each
    row's own shape only: the rows are sorted by (shape, fill) once, each shape computed over its
    block of rows (its hollow rows also at half the radius), and the blocks put back in place."""
    axis = _pixel_centres(size)
    shapes, hollow = scenes.attributes["shape"], scenes.attributes["fill"] == 1
    key = 2 * shapes + hollow
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=2 * len(SHAPES)).tolist()
    placed = torch.cat([scenes.centre, scenes.radius.unsqueeze(1)], dim=1)[order]
    cx, cy, radius = (column.view(-1, 1, 1) for column in placed.unbind(1))
    parts, start = [], 0
    for k in range(len(SHAPES)):
        solid, outlined = counts[2 * k], counts[2 * k + 1]
        rows = slice(start, start + solid + outlined)
        start = rows.stop
        if rows.start == rows.stop:
            continue
        at = _Offsets(axis.view(1, 1, -1) - cx[rows], axis.view(1, -1, 1) - cy[rows])
        r = radius[rows]
        mask = _shape_mask(k, at, r)
        if outlined:  # the block's last rows are hollow: the shape minus itself at half size
            inner = slice(solid, None)
            mask[inner] &= ~_shape_mask(k, at.rows(inner), _HOLLOW_INNER * r[inner])
        parts.append(mask)
    mask = torch.empty(len(scenes), size, size, dtype=torch.bool)
    mask[order] = torch.cat(parts)
    return mask


@functools.lru_cache(maxsize=8)
def _grain(size: int) -> torch.Tensor:
    """(_GRAIN_FIELDS, 3, S, S) fixed noise fields, uniform in ±_GRAIN; each image adds one, chosen
    by its row's grain key, so a row's noise needs neither a generator nor the rest of the batch."""
    g = torch.Generator().manual_seed(size)
    return (2 * _GRAIN) * (torch.rand(_GRAIN_FIELDS, 3, size, size, generator=g) - 0.5)


def render(scenes: Scenes, image_size: int) -> torch.Tensor:
    """(n, 3, S, S) uint8 images of the scenes: background, object, digits, noise."""
    n, a, size = len(scenes), scenes.attributes, image_size
    background = (_BACKGROUND_RGB[scenes.background] + scenes.shade).clamp(0, 1)
    colour = (_OBJECT_RGB[a["colour"]] + scenes.tint).clamp(0, 1)
    # Each pixel shows its row's background (0), object (1) or digit colour (2): one gather from
    # a 3-colour palette per row, where two broadcast `where`s took 3.5× as long at 512 images.
    palette = torch.stack([background, colour, _DIGIT_RGB.expand(n, 3)], dim=2)  # (n, 3, 3)
    which = _object_mask(scenes, size).to(torch.long).masked_fill_(_digits_mask(scenes, size), 2)
    pixels = which.view(n, 1, size * size).expand(n, 3, size * size)
    image = palette.gather(2, pixels).view(n, 3, size, size)
    image += _grain(image_size).index_select(0, scenes.grain % _GRAIN_FIELDS)
    return image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def sampled_prompts(
    fixed: tuple[str, ...], classes: list[tuple[int, ...]], count: int, pairs: tuple[int, ...] | None,
    seed: int,
) -> tuple[tuple[str, ...], ...]:
    """For each class (a value index per attribute in `fixed`), `count` training-like captions: the
    fixed attributes set to the class's values, the free ones drawn as training draws them.

    The draws of the free attributes are shared by all classes (and stratified: each value appears
    count / len(values) times, ± 1), so two classes' prompt ensembles differ only in their fixed
    attributes and no class is favoured by a lucky background. A free colour or shape is drawn
    among the training `pairs` consistent with the class (held-out pairs never appear).
    """
    g = random_stream(seed, "prompts", 0)
    draws = {name: (torch.arange(count) % len(values))[torch.randperm(count, generator=g)].tolist()
             for name, values in ATTRIBUTES.items()}
    allowed = list(range(len(CLASSES))) if pairs is None else sorted(pairs)
    pair_draws = (torch.arange(count) % len(allowed))[torch.randperm(count, generator=g)].tolist()
    prompts = []
    for values in classes:
        given = dict(zip(fixed, values))
        texts = []
        for j in range(count):
            chosen = {name: given.get(name, draws[name][j]) for name in ATTRIBUTES}
            colour, shape = given.get("colour"), given.get("shape")
            if colour is None and shape is None:
                colour, shape = divmod(allowed[pair_draws[j]], len(SHAPES))
            elif colour is None or shape is None:
                # The free one among those the training pairs combine with the fixed one.
                options = [p for p in allowed if (p // len(SHAPES) == colour if shape is None
                                                  else p % len(SHAPES) == shape)] or allowed
                colour, shape = divmod(options[pair_draws[j] % len(options)], len(SHAPES))
            chosen.update(colour=colour, shape=shape)
            texts.append(caption(*(ATTRIBUTES[name][chosen[name]] for name in ATTRIBUTES)))
        prompts.append(tuple(texts))
    return tuple(prompts)


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
    """The procedural shapes; `train_pairs`/`eval_pairs` restrict the colour–shape pairs (None: all).

    Zero-shot prompts are sampled training captions (sampled_prompts), unless `templates` are given
    (data.zeroshot_templates): then the class task formats them with the class names, as CLIP does.
    """

    seed: int
    image_size: int
    eval_images: int
    pool: int | None = None  # data.train_pool: training scenes in the finite pool; None: endless
    train_pairs: tuple[int, ...] | None = None
    eval_pairs: tuple[int, ...] | None = None
    caption_noise: float = 0.0
    classes: tuple[str, ...] = CLASSES
    templates: tuple[str, ...] | None = None
    # Zero-shot on an image folder instead of the built-in classes (data.zeroshot_dir).
    folder: ZeroShotFolder | None = field(default=None, compare=False)
    mean: tuple[float, float, float] = SHAPES_MEAN
    std: tuple[float, float, float] = SHAPES_STD

    @property
    def pool_size(self) -> int | None:
        return self.pool

    @property
    def pool_key(self) -> str:
        return f"shapes pool of seed {self.seed}"  # the seed draws the pool's scenes

    @functools.cached_property
    def _pool(self) -> tuple[Scenes, list[str]]:
        """The pool's scenes and captions, drawn once (draw_scenes is vectorised over them)."""
        assert self.pool is not None
        scenes = draw_scenes(self.seed, "pool", 0, self.pool, self.train_pairs)
        return scenes, scenes.captions()

    def _whole(self, step: int, batch_size: int) -> tuple[Scenes, list[str], torch.Tensor | None]:
        """Where the rows of global batch `step` come from: the scenes that `index` (the batch's
        pool items, or None: the scenes are the batch's own) picks from, and the clean captions."""
        if self.pool is None:
            scenes = draw_scenes(self.seed, "train", step, batch_size, self.train_pairs)
            return scenes, scenes.captions(), None
        scenes, captions = self._pool
        index = pool_index(self.seed, self.pool, step, batch_size)
        return scenes, [captions[i] for i in index.tolist()], index

    def train_captions(self, step: int, batch_size: int) -> list[str]:
        _, captions, _ = self._whole(step, batch_size)
        return mismatch_captions(captions, self.caption_noise, self.seed, step)

    def train_batch(
        self, step: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> Batch:
        return self.train_batch_run(step, step, batch_size, rows, images)[0]

    def train_batch_run(
        self, first: int, last: int, batch_size: int, rows: slice = slice(None), images: bool = True
    ) -> list[Batch]:
        """`train_batch` of steps first, first + 1, … up to `last`, as many as fit in
        RENDER_AHEAD_PIXELS (always step `first`'s): each step's scenes drawn from its own stream,
        their images rendered in one call and split. Rendering is elementwise per row, so each
        batch is bit for bit `train_batch`'s; at a small batch the per-call cost of the ~40 tensor
        ops that render one is most of its time (0.76 ms for one B = 16 batch at 32 px, 0.35 ms
        each for 32 at once, on the 2-core machine)."""
        local = len(range(batch_size)[rows])
        count = min(last - first + 1,
                    max(1, RENDER_AHEAD_PIXELS // (max(1, local) * self.image_size**2)))
        steps = range(first, first + count)
        indices: list[torch.Tensor | None]
        if self.pool is None:  # every step's scenes drawn at once, then this rank's rows of each
            whole = draw_scenes_run(self.seed, "train", steps, batch_size, self.train_pairs)
            clean = whole.captions()
            block = torch.arange(batch_size)[rows]
            scenes = whole if local == batch_size else whole.rows(
                torch.cat([i * batch_size + block for i in range(count)]))
            captions = [mismatch_captions(clean[i * batch_size:(i + 1) * batch_size],
                                          self.caption_noise, self.seed, step)[rows]
                        for i, step in enumerate(steps)]
            indices = [None] * count
        else:
            wholes = [self._whole(step, batch_size) for step in steps]
            indices = [index[rows] for _, _, index in wholes]
            scenes = self._pool[0].rows(torch.cat(indices))
            captions = [mismatch_captions(clean, self.caption_noise, self.seed, step)[rows]
                        for step, (_, clean, _) in zip(steps, wholes)]
        sizes = [local] * count
        pixels: Sequence[torch.Tensor | None] = (
            render(scenes, self.image_size).split(sizes) if images else [None] * count)
        return [Batch(*batch) for batch in zip(pixels, captions, scenes.labels().split(sizes),
                                                indices)]

    def pool_images(self, start: int, stop: int) -> torch.Tensor:
        scenes, _ = self._pool
        return render(scenes.rows(slice(start, stop)), self.image_size)

    @functools.cached_property
    def _eval_scenes(self) -> tuple[Scenes, torch.Tensor]:
        scenes = draw_scenes(self.seed, "eval", 0, self.eval_images, self.eval_pairs)
        return scenes, render(scenes, self.image_size)

    def eval_set(self) -> Batch:
        scenes, images = self._eval_scenes
        labels = scenes.labels() if self.folder is None else torch.full((len(scenes),), -1)
        # With a folder the classes are the folder's, so the shapes' own labels index nothing.
        return Batch(images, scenes.captions(), labels)

    @functools.cached_property
    def _zeroshot(self) -> ZeroShotSet:
        if self.folder is not None:
            return self.folder.zeroshot(self.templates)
        scenes, images = self._eval_scenes
        if self.templates is not None:
            prompts = tuple(tuple(t.format(name) for t in self.templates) for name in CLASSES)
        else:
            pairs = [divmod(i, len(SHAPES)) for i in range(len(CLASSES))]
            prompts = sampled_prompts(("colour", "shape"), pairs, PROMPTS_PER_CLASS, self.train_pairs, self.seed)
        tasks = [ZeroShotTask("", CLASSES, prompts, scenes.labels())]
        for name, values in ATTRIBUTES.items():
            prompts = sampled_prompts((name,), [(i,) for i in range(len(values))], PROMPTS_PER_CLASS,
                                      self.train_pairs, self.seed)
            tasks.append(ZeroShotTask(name, values, prompts, scenes.attributes[name]))
        return ZeroShotSet(images, tuple(tasks))

    def zeroshot_set(self) -> ZeroShotSet | None:
        return self._zeroshot

    def skipped(self) -> dict[str, int]:
        return {} if self.folder is None else self.folder.skipped()
