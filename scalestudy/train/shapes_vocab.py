"""The built-in shapes data's vocabulary: the captioned attributes, their words, and the caption.

Plain Python (no torch), so the spec can check class names without importing the renderer.

A scene is one object — a size, a fill, a colour, a shape, a position — on a plain dark background,
with three digits printed in the bottom-right corner: "a large hollow red circle, top left, digits
3 7 4". Each attribute has its own words, so a caption is a bag of unambiguous words.

Why digits: 3·2·8·5·9 = 2,160 object descriptions would repeat within any large batch (at B = 4096
most rows would share their caption with another row). The caption space must grow ~1000× while
adding nothing *easier to see than the shape*: a captioned feature the image tower picks up faster
lets the contrastive loss separate a batch without the shape and suppresses shape learning
(feature suppression; Chen et al. 2021, "Intriguing properties of contrastive losses"). Measured
on the studies' CPU model (width 32, depth 1; softmax, B = 64, 16,384 examples): captioning an
8-colour background cut zero-shot top-1 from 36 % to 25 %; captioning background colour, texture
and frame left even the object's colour unlearned (3 %). Reading small printed digits is slow to
learn and never helps tell shapes apart, so they add 1000× the captions without that suppression:
2,160,000 equally likely captions, about one row in 550 repeated at B = 4096.
"""

from __future__ import annotations

from itertools import product

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
# Radius as a fraction of the image side: at 32 px even a small shape spans about two 8 px patches.
SIZES = {"small": 0.22, "medium": 0.29, "large": 0.36}
FILLS = ("solid", "hollow")
# The object's centre lies in one of the 3×3 cells of the area it can occupy inside the image.
POSITIONS = (
    "top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right",
)
DIGITS = tuple(str(d) for d in range(10))
# Plain dark backgrounds, not captioned: a nuisance the image tower learns to ignore.
BACKGROUNDS: tuple[tuple[float, float, float], ...] = (
    (0.05, 0.05, 0.05), (0.4, 0.4, 0.4), (0.4, 0.25, 0.1), (0.05, 0.08, 0.38),
    (0.42, 0.05, 0.12), (0.33, 0.35, 0.05), (0.03, 0.33, 0.33), (0.3, 0.1, 0.35),
)

# Every captioned attribute and its values, in caption order; the renderer and the zero-shot tasks
# read this. The digits are three attributes, so each is a 10-way zero-shot task.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": tuple(SIZES),
    "fill": FILLS,
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "position": POSITIONS,
    "digit1": DIGITS,
    "digit2": DIGITS,
    "digit3": DIGITS,
}
CAPTIONS = 1
for _values in ATTRIBUTES.values():
    CAPTIONS *= len(_values)

# Zero-shot classes are colour–shape pairs, so chance is 1/40.
CLASSES = tuple(f"{colour} {shape}" for colour, shape in product(COLOURS, SHAPES))
# With more held-out pairs the diagonal pattern (diagonal_holdout) would take every shape of some
# colour, and an unseen colour cannot be recombined.
MAX_HOLDOUT_PAIRS = 32


def scene(caption_text: str) -> str:
    """A shapes caption without its digits: the object it describes. Two rows with the same
    scene differ only in digits, which a model that has not learned to read them cannot tell
    apart (the proxy limit of the caption space)."""
    return caption_text.split(", digits ", 1)[0]


def caption(size: str, fill: str, colour: str, shape: str, position: str,
            digit1: str, digit2: str, digit3: str) -> str:
    """'a large hollow red circle, top left, digits 3 7 4': at most 12 words, within the default
    context of 16 tokens. Digits are separate words, so any tokenizer sees the same ten."""
    return f"a {size} {fill} {colour} {shape}, {position}, digits {digit1} {digit2} {digit3}"


def diagonal_holdout(count: int) -> tuple[str, ...]:
    """`count` colour–shape classes to hold out of training, spread so every colour and every shape
    keeps training pairs (up to MAX_HOLDOUT_PAIRS): the i-th is colour i mod 8 with shape
    (i + i // 8) mod 5.
    """
    colours = list(COLOURS)
    return tuple(
        f"{colours[i % len(colours)]} {SHAPES[(i + i // len(colours)) % len(SHAPES)]}"
        for i in range(count)
    )
