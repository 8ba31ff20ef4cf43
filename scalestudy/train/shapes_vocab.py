"""The built-in shapes data's vocabulary: colours, shapes, sizes, zero-shot classes and templates.

Plain Python (no torch), so the spec can check class names without importing the renderer.
"""

from __future__ import annotations

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
# With more held-out pairs the diagonal pattern (diagonal_holdout) would take every shape of some
# colour, and an unseen colour cannot be recombined.
MAX_HOLDOUT_PAIRS = 32


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
