"""Data files named in a study: brace patterns of shards, CSV headers, zero-shot class folders.

Plain Python (no torch): the preflight checks and the real-data readers share these.
"""

from __future__ import annotations

import csv
import os
import re

# WebDataset shard lists are brace patterns (`shard-{000..009}.tar`), as `webdataset` and
# img2dataset write them; a group is a zero-padded integer range or a comma list (no nesting).
BRACE_GROUP = re.compile(r"\{(\d+\.\.\d+|[^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Every path a brace pattern names, leftmost group slowest: `s-{0..1}{a,b}` → s-0a s-0b s-1a s-1b.

    `{000..009}` keeps the zero padding (as bash does when a bound has a leading zero).
    """
    match = BRACE_GROUP.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body and "," not in body:
        lo, hi = body.split("..")
        width = max(len(lo), len(hi)) if any(len(b) > 1 and b[0] == "0" for b in (lo, hi)) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


def absolute(path: str) -> str:
    # Trials may run in another working directory (a Ray worker, a Slurm job), so the config
    # records where the data is, not where the study was validated from.
    return os.path.abspath(os.path.expanduser(path))


def csv_with_columns(path: str) -> str:
    path = absolute(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; give the path of a CSV file with image,caption columns")
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    missing = {"image", "caption"} - {column.strip() for column in header}
    if missing:
        raise ValueError(
            f"{path} has columns {header} but needs {sorted(missing)}: the first line must name "
            "the columns, e.g. `image,caption`"
        )
    return path


def class_folders(zeroshot_dir: str) -> list[str]:
    """The class subfolders of a zero-shot folder, sorted by name (hidden ones left out)."""
    return sorted(
        entry.path for entry in os.scandir(zeroshot_dir) if entry.is_dir() and not entry.name.startswith(".")
    )
