"""Checks that touch the file system, run by `validate`, `plan` and `run` before anything is written.

The schema (scalestudy.spec) checks values only; what needs a look at the disk — the data files a
study names, the image tower it loads — is checked here, once per distinct setting among the trials. The read side
(status, report, dashboard) never calls this, so a run directory copied to a laptop without its
data still reads. Every problem is a SpecError (exit 2) naming the dotted key, the path and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from scalestudy import allocator
from scalestudy.datafiles import class_folders, csv_with_columns, expand_braces
from scalestudy.errors import SpecError
from scalestudy.spec import DataSpec, ModelSpec, TrialConfig
from scalestudy.store import Trial


def check_data(data: DataSpec) -> list[str]:
    """Every problem with the files `data` names, as `data.<key>: message` lines."""
    problems = []
    for key in ("shards", "eval_shards"):
        for pattern in getattr(data, key) or []:
            missing = [path for path in expand_braces(pattern) if not os.path.isfile(path)]
            if missing:
                origin = f" (from the pattern {pattern})" if missing[0] != pattern else ""
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                problems.append(f"data.{key}: the shard {missing[0]}{origin}{more} does not exist; "
                                "check the path")
    for key in ("csv", "eval_csv"):
        path = getattr(data, key)
        if path is not None:
            try:
                csv_with_columns(path)
            except ValueError as err:
                problems.append(f"data.{key}: {err}")
    if data.zeroshot_dir is not None:
        problems += _zeroshot_folder(data)
    return problems


def _zeroshot_folder(data: DataSpec) -> list[str]:
    path = data.zeroshot_dir
    assert path is not None
    if not os.path.isdir(path):
        return [f"data.zeroshot_dir: {path} is not a directory; give a folder with one subfolder "
                "per class"]
    folders = class_folders(path)
    if len(folders) < 2:
        return [f"data.zeroshot_dir: {path} needs at least two class subfolders (one per class) "
                "for zero-shot"]
    if data.zeroshot_classes is not None and len(data.zeroshot_classes) != len(folders):
        return [f"data.zeroshot_classes has {len(data.zeroshot_classes)} names but {path} has "
                f"{len(folders)} class subfolders; give one name per subfolder, in sorted order"]
    return []


def check_model(model: ModelSpec) -> list[str]:
    """A tokenizer file the model names must exist and fit the model."""
    if model.tokenizer != "file" or model.tokenizer_file is None:
        return []
    from scalestudy.train.tokenizers import check_tokenizer_file  # the tokenizers library

    try:
        check_tokenizer_file(model.tokenizer_file, model.vocab_size, model.context_length)
    except ValueError as err:
        return [f"model.tokenizer_file: {err}"]
    return []


def check_image_init(config: TrialConfig) -> list[str]:
    """model.image_init must name a finished trial (or a checkpoint file) whose image tower has
    this trial's shapes and settings; its shapes are read memory-mapped, not its weights."""
    if config.model.image_init is None:
        return []
    from scalestudy.train.lit import read_image_init  # torch

    try:
        read_image_init(config.model, config.data.image_size)
    except ValueError as err:
        return [f"model.image_init: {err}"]
    return []


def check_allocator(choice: allocator.Allocator) -> list[str]:
    """A named resources.allocator must be installed here (the executors preload it)."""
    try:
        allocator.resolve(choice, os.environ)
    except ValueError as err:
        return [str(err)]
    return []


def _image_init_setting(config: TrialConfig) -> str:
    return f"{config.model.model_dump_json()}|{config.data.image_size}"


def preflight(trials: Iterable[Trial], source: str, axes: Iterable[str] = ()) -> None:
    """Raise a SpecError listing every file problem of the trials (each distinct setting once).

    A problem names its key as the study file has it: `base.data.shards`, or `sweep: data.shards`
    when the key is one of the swept `axes`.
    """
    problems: dict[str, None] = {}
    seen: set[str] = set()
    for trial in trials:
        for part, check in ((trial.config.data, check_data), (trial.config.model, check_model)):
            key = part.model_dump_json()
            if key not in seen:
                seen.add(key)
                problems.update(dict.fromkeys(check(part)))
        key = _image_init_setting(trial.config)
        if key not in seen:
            seen.add(key)
            problems.update(dict.fromkeys(check_image_init(trial.config)))
        key = f"allocator|{trial.config.resources.allocator}"
        if key not in seen:
            seen.add(key)
            problems.update(dict.fromkeys(check_allocator(trial.config.resources.allocator)))
    if problems:
        swept = set(axes)
        raise SpecError("\n".join(
            f"{source}: {'sweep: ' if p.split(':', 1)[0] in swept else 'base.'}{p}" for p in problems))
