"""The data path at scale: the shard index (compact arrays, cached once in the run directory and
memory-mapped by every other process) and the loader (batches built in DataLoader worker processes),
checked against plain references on real files: a few hundred tiny WebDataset shards written here."""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import signal
import tarfile
import threading
import time
import tracemalloc
from contextlib import closing
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from scalestudy.datafiles import expand_braces
from scalestudy.spec import DataSpec
from scalestudy.train.data import Batch, mismatch_captions, random_stream
from scalestudy.train.datasets import make_dataset
from scalestudy.train.loader import DataWorkersFailed, train_batches
from scalestudy.train.realdata import (
    ImageReader, PairsDataset, build_index, decode, index_shard, tar_files,
)

SHARDS, PAIRS_PER_SHARD, SIDE = 300, 8, 48
SIZE = 16  # data.image_size of the trials here


@cache
def noise_png(i: int) -> bytes:
    """A 48 px PNG of noise (about 7 KB: far more bytes than its tar header)."""
    pixels = np.random.default_rng(i).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def pairs(shard: int, count: int = PAIRS_PER_SHARD) -> list[tuple[str, bytes]]:
    members = []
    for i in range(count):
        key = f"{shard:04d}-{i:02d}"
        members += [(f"{key}.png", noise_png((shard * count + i) % 16)),
                    (f"{key}.txt", f"noise {shard} {i}".encode())]
    return members


@pytest.fixture
def many_shards(tmp_path: Path) -> str:
    """300 shards of 8 pairs each, written in about a second (16 distinct images reused)."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(SHARDS):
        write_tar(folder / f"shard-{shard:04d}.tar", pairs(shard))
    return str(folder / f"shard-{{0000..{SHARDS - 1:04d}}}.tar")


def data(shards: str, **knobs) -> DataSpec:
    return DataSpec(kind="webdataset", shards=shards, image_size=SIZE, **{"eval_images": 32, **knobs})


def bytes_read() -> int:
    """Bytes this process has read through read()-like system calls (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


needs_proc_io = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts reads via /proc/self/io")


def same_batches(a: list[tuple[int, Batch]], b: list[tuple[int, Batch]]) -> bool:
    return [s for s, _ in a] == [s for s, _ in b] and all(
        torch.equal(x.images, y.images) and x.captions == y.captions and torch.equal(x.labels, y.labels)
        for (_, x), (_, y) in zip(a, b))


# --- the tar reader ------------------------------------------------------------------------------

NAME = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x24F, blacklist_characters="/\\"),
               min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    members=st.lists(st.tuples(st.lists(NAME, min_size=1, max_size=6).map("/".join),
                               st.integers(0, 1500), st.sampled_from(["file", "dir", "symlink"])),
                     min_size=1, max_size=12),
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
)
def test_the_header_reader_lists_the_files_of_any_tar_exactly_as_tarfile_does(tmp_path, members, fmt):
    path = tmp_path / "any.tar"
    try:
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, size, kind in members:
                info = tarfile.TarInfo(name)
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                elif kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
                else:
                    info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)) if kind == "file" else None)
    except ValueError:  # a name this format cannot hold (ustar: long or non-ASCII names)
        return
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(tar_files(fd, os.fstat(fd).st_size)) == expected
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_damaged_shard_never_crashes_or_hangs_the_index_its_damage_is_at_worst_a_skip(tmp_path, damage):
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tar:
        for name, payload in [(n, p[:300]) for n, p in pairs(0, 4)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shard = bytearray(good.getvalue())
    for where, value in damage:
        shard[where % len(shard)] = value
    (tmp_path / "damaged.tar").write_bytes(bytes(shard))
    part = index_shard(str(tmp_path / "damaged.tar"))
    assert len(part.captions) <= 4 and {reason for reason, _ in part.skips} <= {
        "unreadable_shard", "missing_image", "missing_caption", "empty_caption"}


def test_a_shard_cut_short_keeps_the_pairs_before_the_cut_and_a_non_tar_is_counted_unreadable(tmp_path):
    whole = write_tar(tmp_path / "whole.tar", pairs(0, 5)).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        fourth_image = [m for m in tar if m.name.endswith(".png")][3]
    (tmp_path / "cut.tar").write_bytes(whole[: fourth_image.offset_data + 100])
    cut = index_shard(str(tmp_path / "cut.tar"))
    assert cut.captions == ["noise 0 0", "noise 0 1", "noise 0 2"]
    assert [reason for reason, _ in cut.skips] == ["unreadable_shard"]
    (tmp_path / "text.tar").write_text("not a tar at all " * 100)
    junk = index_shard(str(tmp_path / "text.tar"))
    assert junk.captions == [] and "uncompressed .tar" in junk.skips[0][1]


# --- the index: built once, cached, equal to the eager path ----------------------------------------


def eager_pairs(pattern: str) -> list[tuple[str, bytes]]:
    """The pairs as the eager index listed them, written plainly with tarfile: (caption, image
    bytes) of every key with both, in file order."""
    out = []
    for path in expand_braces(pattern):
        with tarfile.open(path) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, _, extension = member.name.partition(".")
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
        out += [(parts["txt"].decode(), parts["png"]) for parts in members.values()]
    return out


def eager_batch(pairs: list[tuple[str, bytes]], seed: int, step: int, batch: int, noise: float) -> Batch:
    """Batch `step` by the module's definition: position p is pair perm_e[p mod N] of epoch p // N."""
    n, chosen = len(pairs), []
    for position in range((step - 1) * batch, step * batch):
        order = torch.randperm(n, generator=random_stream(seed, "order", position // n))
        chosen.append(pairs[int(order[position % n])])
    images = torch.from_numpy(np.stack([decode(image, SIZE) for _, image in chosen]).transpose(0, 3, 1, 2))
    captions = mismatch_captions([caption for caption, _ in chosen], noise, seed, step)
    return Batch(images.contiguous(), captions, torch.full((batch,), -1))


def test_batches_from_the_cached_index_equal_the_eager_indexs_across_epochs_and_rank_slices(many_shards, tmp_path):
    every = eager_pairs(many_shards)
    train = every[:-32]  # the last data.eval_images pairs are held out
    dataset = make_dataset(data(many_shards, caption_noise=0.25), seed=3, cache=tmp_path / "cache")
    assert len(dataset.train) == len(train) == SHARDS * PAIRS_PER_SHARD - 32
    assert [s.caption for s in dataset.held_out] == [caption for caption, _ in every[-32:]]
    batch = 1000  # 2368 training pairs: steps 2 and 3 straddle the epoch boundaries
    for step in (1, 3, 5):
        expected = eager_batch(train, 3, step, batch, 0.25)
        for rows in (slice(None), slice(0, 333), slice(666, 1000)):
            got = dataset.train_batch(step, batch, rows)
            assert torch.equal(got.images, expected.images[rows]) and got.captions == expected.captions[rows]
        assert dataset.train_captions(step, batch) == expected.captions


@needs_proc_io
def test_start_up_reads_only_headers_and_captions_once_and_then_nothing_but_the_cache(many_shards, tmp_path):
    shard_bytes = sum(os.path.getsize(p) for p in expand_braces(many_shards))
    header_and_captions = SHARDS * PAIRS_PER_SHARD * (2 * 512 + 16)
    make_dataset(data(many_shards), seed=0)  # imports and first-call costs out of the counts

    before = bytes_read()
    first = make_dataset(data(many_shards), seed=0, cache=tmp_path / "cache")
    built = bytes_read() - before
    assert built < 1.5 * header_and_captions < shard_bytes / 4  # no image byte was read

    tracemalloc.start()
    before = bytes_read()
    again = make_dataset(data(many_shards), seed=0, cache=tmp_path / "cache")
    cached = bytes_read() - before
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert cached < 16_000  # the index's meta.json; its arrays are memory-mapped
    # Python memory grows with the shards (their paths, sizes and times key the cache), not with the
    # pairs: a Python Sample per pair would take ~300 bytes each (2,400 pairs: ~700 KB).
    assert kept < 64_000 and peak < 64_000 + 1_000 * SHARDS
    assert isinstance(again.train.columns["offset"], np.memmap)
    assert again.train_batch(2, 64).captions == first.train_batch(2, 64).captions
    assert again.skipped() == first.skipped() == {}


def start_up(spec: DataSpec, cache: Path, barrier) -> tuple[int, int, dict[str, int]]:
    barrier.wait()
    before = bytes_read()
    dataset = make_dataset(spec, seed=0, cache=cache)
    return bytes_read() - before, len(dataset.train), dataset.skipped()


@needs_proc_io
def test_ranks_starting_together_index_the_shards_once_and_the_others_read_the_cache(many_shards, tmp_path):
    members = dict(pairs(0, 3))
    del members["0000-01.txt"]  # a skip, so the counts must travel through the cache too
    write_tar(Path(expand_braces(many_shards)[5]), list(members.items()))
    spec, context = data(many_shards), multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(3)
    with context.Pool(3) as pool:
        results = pool.starmap(start_up, [(spec, tmp_path / "cache", barrier)] * 3)
    reads = sorted(read for read, _, _ in results)
    assert reads[0] < 16_000 and reads[1] < 16_000 and reads[2] > 500_000  # one builder
    assert {(n, tuple(sorted(skipped.items()))) for _, n, skipped in results} == {
        (SHARDS * PAIRS_PER_SHARD - 5 - 1 - 32, (("missing_caption", 1),))}
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no half-built leftovers
    assert folder.name.startswith("index-") and ".tmp-" not in folder.name


def test_a_rewritten_shard_gets_a_new_index(many_shards, tmp_path):
    cache_dir = tmp_path / "cache"
    make_dataset(data(many_shards), seed=0, cache=cache_dir)
    first = Path(expand_braces(many_shards)[0])
    write_tar(first, [(name, payload if name.endswith(".png") else b"renamed " + payload)
                      for name, payload in pairs(0)])
    dataset = make_dataset(data(many_shards), seed=0, cache=cache_dir)
    assert dataset.train[0].caption == "renamed noise 0 0"
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 2


def test_a_damaged_cached_index_is_an_error_naming_the_folder_and_the_fix(many_shards, tmp_path):
    make_dataset(data(many_shards), seed=0, cache=tmp_path / "cache")
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    with (folder / "offset.bin").open("r+b") as f:
        f.truncate(8)
    with pytest.raises(ValueError, match=f"{folder}.*delete the folder"):
        make_dataset(data(many_shards), seed=0, cache=tmp_path / "cache")


def test_indexing_in_worker_processes_gives_the_same_index(many_shards):
    kind, paths = "webdataset", expand_braces(many_shards)
    alone = build_index(kind, paths, ImageReader(SIZE))
    pooled = build_index(kind, paths, ImageReader(SIZE), processes=2)
    assert alone.columns.keys() == pooled.columns.keys()
    assert all(np.array_equal(alone.columns[k], pooled.columns[k]) for k in alone.columns)


def test_a_cached_dataset_travels_to_a_spawned_worker_as_its_folder_not_its_pages(many_shards, tmp_path):
    dataset = make_dataset(data(many_shards), seed=0, cache=tmp_path / "cache")
    dataset.train_batch(1, 64)  # starts the read-ahead thread, which must not travel
    payload = pickle.dumps(dataset)
    assert len(payload) < 4_000
    copy = pickle.loads(payload)
    assert isinstance(copy, PairsDataset)
    assert torch.equal(copy.train_batch(4, 64).images, dataset.train_batch(4, 64).images)


def test_a_csv_source_is_cached_like_shards_and_gives_the_same_batches(tmp_path):
    (tmp_path / "images").mkdir()
    lines = ["image,caption"]
    for i in range(40):
        (tmp_path / "images" / f"{i}.png").write_bytes(noise_png(i % 16))
        lines.append(f"images/{i}.png,noise picture {i}")
    lines.append("images/absent.png,a picture that is not there")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    spec = DataSpec(kind="csv", csv=str(tmp_path / "pairs.csv"), image_size=SIZE, eval_images=8)
    memory = make_dataset(spec, seed=2)
    for attempt in range(2):  # builds the cache, then reads it
        cached = make_dataset(spec, seed=2, cache=tmp_path / "cache")
        assert cached.skipped() == memory.skipped() == {"missing_image": 1}
        for step in (1, 2):
            a, b = cached.train_batch(step, 24), memory.train_batch(step, 24)
            assert torch.equal(a.images, b.images) and a.captions == b.captions


# --- the loader --------------------------------------------------------------------------------


def loaded(dataset, batch: int, rows: slice, start: int, end: int, workers: int, **kw) -> list[tuple[int, Batch]]:
    with closing(train_batches(dataset, batch, rows, start, end, workers, **kw)) as batches:
        return list(batches)


@pytest.mark.parametrize("source", ["shapes", "webdataset"])
def test_worker_processes_build_exactly_the_batches_of_the_trials_process_for_any_rank_and_resume(source, many_shards, tmp_path):
    spec = data(many_shards) if source == "webdataset" else DataSpec(image_size=SIZE)
    dataset = make_dataset(spec, seed=1, cache=tmp_path / "cache")
    straight = loaded(dataset, 96, slice(None), 0, 6, workers=0)
    assert [step for step, _ in straight] == [1, 2, 3, 4, 5, 6]
    for rows in (slice(0, 48), slice(48, 96)):  # two ranks, resumed after a checkpoint at step 2
        in_workers = loaded(make_dataset(spec, seed=1, cache=tmp_path / "cache"), 96, rows, 2, 6, workers=2)
        expected = [(step, Batch(b.images[rows], b.captions[rows], b.labels[rows])) for step, b in straight[2:]]
        assert same_batches(in_workers, expected)


def test_the_trials_process_builds_shapes_steps_in_runs_exactly_as_one_by_one_from_any_resume_step():
    dataset = make_dataset(DataSpec(image_size=SIZE), seed=4)
    # 16 rows at 16 px: runs of 128 steps, so steps 7 … 300 cross two run boundaries.
    got = loaded(dataset, 32, slice(16, 32), 6, 300, workers=0)
    assert [step for step, _ in got] == list(range(7, 301))
    assert same_batches(got, [(step, dataset.train_batch(step, 32, slice(16, 32))) for step in range(7, 301)])


def test_a_trial_resumed_at_its_last_step_gets_no_batch_and_starts_no_worker():
    before = set(multiprocessing.active_children())
    assert loaded(make_dataset(DataSpec(image_size=SIZE), seed=0), 32, slice(None), 5, 5, workers=2) == []
    assert not worker_processes(before)


def test_the_loader_leaves_the_trials_random_state_alone():
    dataset = make_dataset(DataSpec(image_size=SIZE), seed=0)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    loaded(dataset, 32, slice(None), 0, 3, workers=2)
    assert torch.equal(torch.get_rng_state(), state)


class ThreadCounts:
    """A dataset whose labels say how many torch threads built the batch."""

    mean = std = (0.5, 0.5, 0.5)
    classes = ()

    def train_batch(self, step: int, batch_size: int, rows: slice = slice(None),
                    images: bool = True) -> Batch:
        n = len(range(*rows.indices(batch_size)))
        return Batch(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), [""] * n, torch.full((n,), torch.get_num_threads()))

    def skipped(self) -> dict[str, int]:
        return {}


def test_each_worker_builds_with_one_torch_thread_whatever_the_trial_uses():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        labels = [b.labels for _, b in loaded(ThreadCounts(), 4, slice(None), 0, 4, workers=2)]
    finally:
        torch.set_num_threads(threads)
    assert all(label.tolist() == [1, 1, 1, 1] for label in labels)


def test_images_a_worker_cannot_read_are_replaced_and_counted_in_the_trials_dataset(tmp_path):
    members = [("broken.png", b"not a png"), ("broken.txt", b"a broken image")] + pairs(0, 40)
    shard = str(write_tar(tmp_path / "bad.tar", members))
    counts = []
    for workers in (0, 2):
        dataset = make_dataset(data(shard, eval_images=4), seed=0)
        batches = loaded(dataset, 37, slice(None), 0, 2, workers=workers)  # 2 epochs: all seen twice
        counts.append(dataset.skipped())
        assert all("a broken image" not in b.captions for _, b in batches)
    assert counts[0] == counts[1] == {"unreadable_image": 1}


def test_a_worker_that_raises_ends_the_trial_naming_the_step_and_the_cause(many_shards):
    dataset = make_dataset(data(many_shards), seed=0)
    for path in expand_braces(many_shards):  # after indexing, every image becomes unreadable
        Path(path).write_bytes(b"")
    with pytest.raises(DataWorkersFailed, match=r"step 1's batch \(data.workers=2\): ValueError: 100 random"):
        loaded(dataset, 16, slice(None), 0, 3, workers=2)


def test_a_worker_stuck_on_a_read_ends_the_trial_after_the_timeout(many_shards):
    dataset = make_dataset(data(many_shards), seed=0)
    for path in expand_braces(many_shards):  # opening a FIFO with no writer blocks for ever
        os.remove(path)
        os.mkfifo(path)
    started = time.monotonic()
    with pytest.raises(DataWorkersFailed, match="data.worker_timeout_s=2 s while waiting for step 1"):
        loaded(dataset, 16, slice(None), 0, 3, workers=2, timeout_s=2)
    assert time.monotonic() - started < 60  # the stuck workers are killed, not waited for
    assert not multiprocessing.active_children()


def worker_processes(before: set) -> list:
    return [p for p in multiprocessing.active_children() if p not in before]


def test_a_worker_that_dies_ends_the_trial_with_a_clear_error_not_a_hang():
    dataset = make_dataset(DataSpec(image_size=SIZE), seed=0)
    before = set(multiprocessing.active_children())
    batches = train_batches(dataset, 64, slice(None), 0, 200, workers=2, timeout_s=60)
    started = time.monotonic()
    # DataLoader's SIGCHLD handler may raise its own "killed by signal" between our calls.
    with closing(batches), pytest.raises(RuntimeError, match="killed by signal|process died"):
        next(batches)
        os.kill(worker_processes(before)[0].pid, signal.SIGKILL)
        for _ in batches:
            pass
    assert time.monotonic() - started < 30


def test_a_preemption_signal_to_the_process_group_leaves_the_workers_building():
    dataset = make_dataset(DataSpec(image_size=SIZE), seed=0)
    before = set(multiprocessing.active_children())
    with closing(train_batches(dataset, 32, slice(None), 0, 8, workers=2, timeout_s=60)) as batches:
        got = [next(batches)]
        for worker in worker_processes(before):
            os.kill(worker.pid, signal.SIGTERM)
        got += list(batches)
    assert same_batches(got, loaded(dataset, 32, slice(None), 0, 8, workers=0))


def test_a_preemption_signal_while_the_workers_start_does_not_kill_them():
    # The signal reaches each worker the moment it exists, before its own handler can run.
    dataset = make_dataset(DataSpec(image_size=SIZE), seed=0)
    before = set(multiprocessing.active_children())
    stop, signalled = threading.Event(), set()

    def signal_each_new_worker() -> None:
        while not stop.is_set():
            try:
                pids = {p.pid for p in worker_processes(before)}
            except RuntimeError:  # the main thread added a child while this one read the set
                continue
            for pid in pids - signalled:
                os.kill(pid, signal.SIGTERM)
                signalled.add(pid)
            time.sleep(0.0002)

    sender = threading.Thread(target=signal_each_new_worker)
    sender.start()
    try:
        with closing(train_batches(dataset, 32, slice(None), 0, 8, workers=2, timeout_s=60)) as batches:
            got = list(batches)
    finally:
        stop.set()
        sender.join()
    assert len(signalled) == 2
    assert same_batches(got, loaded(dataset, 32, slice(None), 0, 8, workers=0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_on_a_gpu_worker_batches_arrive_in_pinned_memory():
    dataset = make_dataset(DataSpec(image_size=SIZE), seed=0)
    batches = loaded(dataset, 32, slice(None), 0, 2, workers=2, pin_memory=True)
    assert all(b.images.is_pinned() for _, b in batches)
