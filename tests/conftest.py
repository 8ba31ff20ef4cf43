"""Shared fixtures: tiny studies that train for real in a second or two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

# A model and budget small enough that a trial trains in about a second on one CPU core.
TINY_BASE: dict[str, Any] = {
    "data": {"image_size": 16, "eval_images": 64},
    "model": {"patch_size": 8, "width": 16, "depth": 1, "heads": 2, "embed_dim": 16,
              "context_length": 12, "vocab_size": 512},
    "train": {"examples_seen": 512, "batch_size": 32, "eval_every": 8, "checkpoint_every": 4},
    "resources": {"cpus": 1},
}


def tiny_study(name: str = "tiny", grid: dict[str, list[Any]] | None = None,
               base: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    merged = {section: dict(values) for section, values in TINY_BASE.items()}
    for section, values in (base or {}).items():
        merged.setdefault(section, {}).update(values)
    sweep = {"grid": grid if grid is not None else {"loss.kind": ["softmax", "sigmoid"]}}
    return {"name": name, "base": merged, "sweep": sweep, **top}


@pytest.fixture
def write_study(tmp_path: Path):
    def write(study: dict[str, Any] | str, filename: str = "study.yaml") -> Path:
        path = tmp_path / filename
        path.write_text(study if isinstance(study, str) else yaml.safe_dump(study))
        return path

    return write
