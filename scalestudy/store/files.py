"""Crash-safe file primitives of the store: atomic writes, JSON and parquet reads, metric parts.

Every write goes to a temp file in the target's folder, is fsynced, then renamed over the target:
a writer killed at any point leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from scalestudy.errors import StoreError

log = logging.getLogger(__name__)

# While another process holds a lock, the waiting one says so this often.
LOCK_NOTICE_S = 30.0


def umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere reading it means setting it,
    which another thread could observe for a moment."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(tmp)`, then fsync and rename: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); a run directory on a shared file system is read by
    # the whole group, so the file gets the mode `open` would have given it.
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_parquet(path: Path, frame: pl.DataFrame) -> None:
    atomic_write(path, lambda tmp: frame.write_parquet(tmp))


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StoreError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path}: expected a JSON object")
    return data


def part_name(first: int, last: int) -> str:
    """A metrics part's file name: the step range it holds, zero-padded so names sort by step."""
    return f"{first:09d}-{last:09d}.parquet"


def part_range(part: Path) -> tuple[int, int] | None:
    """(first, last) step of a metrics part, from its name; None for a file not named that way."""
    try:
        first, last = (int(x) for x in part.stem.split("-"))
    except ValueError:
        return None
    return first, last


def read_parts(paths: Iterable[Path]) -> pl.DataFrame:
    """Concatenate parquet parts (columns may differ between parts); later rows win per step."""
    frames = [pl.read_parquet(p) for p in sorted(paths)]
    if not frames:
        return pl.DataFrame()
    frame = pl.concat(frames, how="diagonal_relaxed")
    return frame.unique("step", keep="last", maintain_order=True).sort("step")


def read_ordered(parts: list[Path]) -> pl.DataFrame:
    """`read_parts`, without its de-duplication when the names already rule duplicates out.

    A trial writes each part's rows in step order and its parts over disjoint, increasing step
    ranges (a resumed trial first truncates), so then concatenating in name order is the answer;
    sorting out duplicate steps costs as much as reading, which matters for 20 traces × 10k steps.
    """
    ranges = [part_range(p) for p in parts]
    if None in ranges or any(a[1] >= b[0] for a, b in zip(ranges, ranges[1:])):  # type: ignore[index]
        return read_parts(parts)
    frames = [pl.read_parquet(p) for p in parts]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def save_torch(path: Path, payload: dict[str, Any]) -> None:
    """torch.save, atomically and fsynced like every other store write (a checkpoint killed
    mid-write must leave the previous one loadable)."""
    import torch

    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_torch(path: Path) -> dict[str, Any]:
    """A checkpoint's payload on the CPU; weights_only: a checkpoint is data, never code.

    Always to the CPU first: the RNG states must stay CPU ByteTensors, and the caller moves model
    and optimizer state to whatever device this attempt trains on (which may not be the one that
    saved it: a requeued Slurm job can land on another GPU, or a trial resume on the CPU).
    """
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on a file (flock) while `what` runs, shared by every process and
    machine that sees the file.

    On a file system that does not lock (some network mounts) it goes ahead unlocked; callers keep
    a fallback for that (an atomic rename, a re-read) rather than rely on the lock alone.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        waited, last_notice = 0.0, 0.0
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited - last_notice >= LOCK_NOTICE_S:
                    log.info("waiting %.0f s for another process to finish %s (%s)", waited, what, lock_path)
                    last_notice = waited
                time.sleep(0.2)
                waited += 0.2
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.info("%s cannot be locked (%s); %s without the lock", lock_path, err, what)
                yield
                return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
