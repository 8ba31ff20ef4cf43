"""The data a trial trains and evaluates on, built from its DataSpec: the built-in shapes
(scalestudy.train.data) or real image–caption pairs (scalestudy.train.realdata), with zero-shot
classes from an image folder when data.zeroshot_dir names one."""

from __future__ import annotations

from pathlib import Path

from scalestudy.spec import DataSpec
from scalestudy.train import realdata
from scalestudy.train.data import Dataset, ShapesDataset, ZeroShotFolder
from scalestudy.train.shapes_vocab import CLASSES, diagonal_holdout


def shapes_dataset(
    spec: DataSpec, seed: int, folder: ZeroShotFolder | None, templates: tuple[str, ...] | None
) -> ShapesDataset:
    """The shapes with the spec's compositional split, caption noise and training pool."""
    names = spec.holdout_classes or diagonal_holdout(spec.holdout_pairs)
    held_out = tuple(sorted({CLASSES.index(name) for name in names}))
    seen = tuple(i for i in range(len(CLASSES)) if i not in held_out)
    return ShapesDataset(
        seed=seed,
        image_size=spec.image_size,
        eval_images=spec.eval_images,
        pool=spec.train_pool,
        train_pairs=seen if held_out else None,
        eval_pairs={"all": None, "seen": seen, "unseen": held_out}[spec.eval_pairs],
        caption_noise=spec.caption_noise,
        classes=CLASSES if folder is None else folder.classes,
        templates=templates,
        folder=folder,
    )


def make_dataset(spec: DataSpec, seed: int, cache: Path | None = None) -> Dataset:
    """The data a trial trains and evaluates on; real data is indexed here, decoded per batch.

    `cache` (the run directory's cache/ folder) keeps real data's index, built once and shared by
    every rank, trial and resume on the same files; without it the index is built in memory.
    """
    reader = realdata.ImageReader(spec.image_size)
    folder = (
        realdata.ImageFolder(spec.zeroshot_dir, spec.zeroshot_classes, spec.eval_images, reader)
        if spec.zeroshot_dir is not None
        else None
    )
    if spec.zeroshot_templates is not None:
        templates: tuple[str, ...] | None = tuple(spec.zeroshot_templates)
    else:
        # Shapes sample their prompts from the training captions; a folder's classes get CLIP's.
        templates = None if spec.kind == "shapes" and folder is None else realdata.CLIP_TEMPLATES
    if spec.kind == "shapes":
        return shapes_dataset(spec, seed, folder, templates)
    return realdata.PairsDataset.from_spec(spec, seed, reader, folder, templates or realdata.CLIP_TEMPLATES,
                                           cache)
