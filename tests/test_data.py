"""The data a trial sees: shapes with a compositional split and caption noise, WebDataset shards, a
CSV, and zero-shot image folders — written here as real files (PIL images in tmp_path)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from scalestudy.cli import main
from scalestudy.errors import SpecError
from scalestudy.load import validate_study
from scalestudy.datafiles import expand_braces
from scalestudy.expand import expand
from scalestudy.preflight import check_data, preflight
from scalestudy.spec import DataSpec
from scalestudy.store import RunStore
from scalestudy.train.data import (
    CLASSES, COLOURS, PROMPTS_PER_CLASS, RENDER_AHEAD_PIXELS, SHAPES, SHAPES_MEAN, SHAPES_STD,
    dup_caption_rate, mismatch_captions, normalize,
)
from scalestudy.train.datasets import make_dataset
from scalestudy.train.realdata import MEAN, STD
from scalestudy.train.shapes_vocab import ATTRIBUTES, CAPTIONS, caption
from tests.conftest import tiny_study

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def image_bytes(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def striped(size: tuple[int, int] = (48, 16)) -> bytes:
    """Red left third, green middle third, blue right third: a centre crop sees only green."""
    image = Image.new("RGB", size, GREEN)
    third = size[0] // 3
    image.paste(RED, (0, 0, third, size[1]))
    image.paste(BLUE, (2 * third, 0, size[0], size[1]))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_shard(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def good_pairs(count: int, start: int = 0) -> dict[str, bytes]:
    """`count` valid samples as img2dataset writes them: {key}.jpg, {key}.txt and {key}.json."""
    members = {}
    for i in range(start, start + count):
        key = f"{i:06d}"
        members[f"{key}.jpg"] = image_bytes((24, 20), ((i * 40) % 256, 90, 200), "JPEG")
        members[f"{key}.txt"] = f"photo number {i}".encode()
        members[f"{key}.json"] = json.dumps({"key": key}).encode()
    return members


def pixel(colour: tuple[int, int, int]) -> torch.Tensor:
    """The normalised value a pixel of `colour` must have."""
    return (torch.tensor(colour, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)


def model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as the model sees them: normalised with CLIP's mean and std."""
    assert images.dtype == torch.uint8
    return normalize(images, MEAN, STD)


def spec(**data) -> DataSpec:
    return DataSpec(image_size=16, **data)


# --- shapes: determinism, compositional split, caption noise -------------------------------------


def test_a_shapes_batch_is_a_pure_function_of_seed_and_step():
    knobs = {"holdout_pairs": 6, "caption_noise": 0.3}
    first, again = make_dataset(spec(**knobs), seed=3), make_dataset(spec(**knobs), seed=3)
    for step in (1, 2, 50):
        a, b = first.train_batch(step, 64), again.train_batch(step, 64)
        assert torch.equal(a.images, b.images) and a.captions == b.captions
        assert torch.equal(a.labels, b.labels)
    assert first.train_batch(1, 64).captions != first.train_batch(2, 64).captions
    assert make_dataset(spec(**knobs), seed=4).train_batch(1, 64).captions != first.train_batch(1, 64).captions


# sha256 of batches 1, 2 and 500 of seed 0 (B = 64, 32 px: the pixels, then the captions), as the
# committed studies (analysis/*/) were trained on them.
SHAPES_DATA_SHA256 = "183e262ad7eb42c65cedfc788bdbdba3635e70180be1aa132ad1f2681676a30d"


def test_the_shapes_data_is_byte_for_byte_the_data_the_committed_studies_trained_on():
    dataset = make_dataset(DataSpec(image_size=32), seed=0)
    digest = hashlib.sha256()
    for step in (1, 2, 500):
        batch = dataset.train_batch(step, 64)
        digest.update(batch.images.numpy().tobytes())
        digest.update("\n".join(batch.captions).encode())
    assert digest.hexdigest() == SHAPES_DATA_SHA256, (
        "the shapes data changed: every committed study result (analysis/*/) came from the old "
        "data, so either keep the data as it was or re-run the studies and update this digest")


def test_any_slice_of_rows_is_exactly_those_rows_of_the_whole_batch():
    dataset = make_dataset(spec(caption_noise=0.25, holdout_pairs=4), seed=1)
    whole = dataset.train_batch(3, 48)
    assert whole.images.dtype == torch.uint8 and whole.images.shape == (48, 3, 16, 16)
    assert dataset.train_captions(3, 48) == whole.captions
    for rows in (slice(0, 12), slice(12, 24), slice(47, 48), slice(5, 40, 7)):
        part = dataset.train_batch(3, 48, rows)
        assert torch.equal(part.images, whole.images[rows]) and part.captions == whole.captions[rows]
        assert torch.equal(part.labels, whole.labels[rows])


@settings(max_examples=30, deadline=None)
@given(first=st.integers(1, 400), length=st.integers(1, 40), batch=st.sampled_from([1, 16, 48]),
       rank=st.integers(0, 3), pool=st.sampled_from([None, 50]), images=st.booleans(),
       noise=st.sampled_from([0.0, 0.3]))
def test_a_run_of_steps_built_at_once_is_bit_for_bit_each_steps_own_batch(
        first, length, batch, rank, pool, images, noise):
    dataset = make_dataset(spec(train_pool=pool, caption_noise=noise), seed=2)
    rows = slice(rank * batch // 4, (rank + 1) * batch // 4) if batch >= 4 else slice(None)
    run = dataset.train_batch_run(first, first + length - 1, batch, rows, images=images)
    assert 1 <= len(run) <= length
    for step, built in enumerate(run, start=first):
        alone = dataset.train_batch(step, batch, rows, images=images)
        assert built.captions == alone.captions and torch.equal(built.labels, alone.labels)
        assert (built.index is None) == (pool is None)
        assert pool is None or torch.equal(built.index, alone.index)
        assert (built.images is None) == (not images)
        assert not images or torch.equal(built.images, alone.images)


def test_a_run_renders_what_fits_in_its_pixel_budget_and_never_passes_the_last_step():
    small = make_dataset(DataSpec(image_size=32), seed=0)
    assert len(small.train_batch_run(1, 10_000, 16)) == RENDER_AHEAD_PIXELS // (16 * 32 * 32) == 32
    assert len(small.train_batch_run(5, 9, 16)) == 5  # the trial's last steps
    assert len(small.train_batch_run(1, 10_000, 1024)) == 1  # one batch beyond the budget still builds
    assert len(make_dataset(DataSpec(image_size=224), seed=0).train_batch_run(1, 10_000, 16)) == 1


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), max_size=30))
def test_the_duplicate_caption_rate_counts_every_row_whose_caption_another_row_has(captions):
    shared = [c for i, c in enumerate(captions) if c in captions[:i] + captions[i + 1:]]
    assert dup_caption_rate(captions) == (len(shared) / len(captions) if captions else 0.0)


def test_identical_captions_are_rare_even_in_a_large_batch():
    assert dup_caption_rate(["a red", "a blue", "a red", "a green"]) == 0.5
    assert CAPTIONS == 2_160_000
    dataset = make_dataset(spec(), seed=0)
    rates = [dup_caption_rate(dataset.train_captions(step, 512)) for step in range(1, 9)]
    # 511 / 2.16M ≈ 0.0002 expected: the distinct captions are drawn evenly.
    assert sum(rates) / len(rates) <= 0.01
    assert dup_caption_rate(dataset.train_captions(1, 4096)) <= 0.01


def test_the_object_has_the_captioned_colour_size_and_position():
    dataset = make_dataset(DataSpec(), seed=2)  # 32 px
    batch = dataset.train_batch(1, 256)
    pixels = batch.images.float() / 255
    areas: dict[str, list[float]] = {size: [] for size in ATTRIBUTES["size"]}
    for image, text in zip(pixels, batch.captions):
        size, fill, colour, _ = text.split(",")[0].split()[1:]
        if colour == "white":  # the digits are near-white too
            continue
        rgb = torch.tensor(COLOURS[colour]).view(3, 1, 1)
        mine = ((image - rgb).abs().amax(0) < 0.2).nonzero().float() / 32  # (k, 2): y, x
        assert len(mine) >= 20, text
        if fill == "solid":
            areas[size].append(len(mine))
        position = text.split(", ")[1]
        y, x = mine.mean(0).tolist()
        assert (x < 0.42) == ("left" in position) and (x > 0.58) == ("right" in position), text
        assert (y < 0.42) == ("top" in position) and (y > 0.58) == ("bottom" in position), text
    small, medium, large = (sum(a) / len(a) for a in areas.values())
    assert small < medium < large


def test_images_travel_as_uint8_and_normalise_on_the_device_with_the_datasets_mean_and_std():
    dataset = make_dataset(DataSpec(), seed=5)
    images = dataset.train_batch(1, 1024).images
    pixels = images.float() / 255
    # The constants are the statistics of rendered shapes (measured on other batches).
    assert torch.allclose(pixels.mean((0, 2, 3)), torch.tensor(SHAPES_MEAN), atol=0.01)
    assert torch.allclose(pixels.std((0, 2, 3)), torch.tensor(SHAPES_STD), atol=0.01)
    x = normalize(images[:4], dataset.mean, dataset.std)
    assert x.dtype == torch.float32
    c, i, j = 2, 7, 11
    expected = (images[3, c, i, j].item() / 255 - SHAPES_MEAN[c]) / SHAPES_STD[c]
    assert x[3, c, i, j].item() == pytest.approx(expected, abs=1e-6)
    assert abs(normalize(images, dataset.mean, dataset.std).mean().item()) < 0.05


def held_out_names(dataset) -> set[str]:
    seen = set(dataset.train_pairs)
    return {name for i, name in enumerate(CLASSES) if i not in seen}


@pytest.mark.parametrize("knob", [{"holdout_pairs": 12}, {"holdout_classes": ["red circle", "blue cross"]}])
def test_held_out_colour_shape_pairs_never_appear_in_a_training_image_or_caption(knob):
    dataset = make_dataset(spec(caption_noise=0.5, **knob), seed=0)
    held_out = held_out_names(dataset)
    assert len(held_out) == knob.get("holdout_pairs", 2)
    for step in range(1, 11):
        batch = dataset.train_batch(step, 128)
        assert not {CLASSES[i] for i in batch.labels.tolist()} & held_out
        assert not [c for c in batch.captions if any(f" {name}," in c for name in held_out)]


def test_eval_pairs_restricts_the_held_out_images_to_unseen_or_seen_combinations():
    unseen = make_dataset(spec(holdout_pairs=12, eval_pairs="unseen", eval_images=400), seed=0)
    seen = make_dataset(spec(holdout_pairs=12, eval_pairs="seen", eval_images=400), seed=0)
    held_out = {CLASSES.index(n) for n in held_out_names(unseen)}
    assert set(unseen.eval_set().labels.tolist()) == held_out
    assert not set(seen.eval_set().labels.tolist()) & held_out
    # Zero-shot on unseen pairs still chooses among all 40 classes (the generalised setting).
    assert unseen.classes == CLASSES and unseen.zeroshot_set() is not None


def test_the_largest_diagonal_holdout_still_trains_on_every_colour_and_every_shape():
    dataset = make_dataset(spec(holdout_pairs=32), seed=0)
    labels = torch.cat([dataset.train_batch(step, 256).labels for step in range(1, 5)])
    assert {int(i) // len(SHAPES) for i in labels} == set(range(len(COLOURS)))
    assert {int(i) % len(SHAPES) for i in labels} == set(range(len(SHAPES)))


def test_caption_noise_mismatches_the_stated_fraction_of_every_batch_and_leaves_images_alone():
    clean = make_dataset(spec(), seed=1)
    noisy = make_dataset(spec(caption_noise=0.25), seed=1)
    for step in (1, 2):
        a, b = clean.train_batch(step, 1000), noisy.train_batch(step, 1000)
        assert torch.equal(a.images, b.images)
        changed = sum(x != y for x, y in zip(a.captions, b.captions))
        # 250 rows get another row's caption; a few of those happen to read the same.
        assert 240 <= changed <= 250
        assert set(b.captions) <= set(a.captions)
    assert mismatch_captions(["a", "b", "c"], 0.0, 0, 1) == ["a", "b", "c"]


def test_the_evaluation_set_is_never_noisy():
    assert make_dataset(spec(caption_noise=0.9), seed=0).eval_set().captions == (
        make_dataset(spec(), seed=0).eval_set().captions
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "csv", "holdout_pairs": 3}, "holdout"),
        ({"eval_pairs": "unseen"}, "data.eval_pairs=unseen needs a held-out split"),
        ({"holdout_classes": ["red elephant"]}, "red elephant"),
        ({"holdout_pairs": 33}, "holdout_pairs"),
        ({"holdout_pairs": 2, "holdout_classes": ["red circle"]}, "keep one"),
        ({"caption_noise": 1.0}, "caption_noise"),
        ({"zeroshot_templates": ["a photo"]}, "exactly one '{}'"),
    ],
)
def test_data_options_that_cannot_work_are_rejected_naming_the_key(data, message):
    with pytest.raises(ValidationError, match=message):
        DataSpec(**data)


# --- WebDataset shards and CSV ------------------------------------------------------------------


def test_brace_patterns_expand_like_webdataset_shard_lists():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.fixture
def shards(tmp_path: Path) -> str:
    """Two shards: 59 good pairs, a striped flag, and one of each kind of bad sample."""
    write_shard(tmp_path / "shard-000.tar", {**good_pairs(30), "striped.png": striped(),
                                             "striped.txt": b"a striped flag"})
    bad = {
        "corrupt.jpg": b"this is not a jpeg",
        "corrupt.txt": b"a caption for an unreadable image",
        "blank.png": image_bytes((16, 16), RED),
        "blank.txt": b"   \n",
        "lonely.png": image_bytes((16, 16), RED),
        "orphan.txt": b"a caption without its image",
    }
    # The bad samples come first, so none of them is in the held-out tail.
    write_shard(tmp_path / "shard-001.tar", {**bad, **good_pairs(28, start=30)})
    return str(tmp_path / "shard-{000..001}.tar")


def test_webdataset_shards_load_resized_and_normalised_and_bad_samples_are_counted(shards):
    dataset = make_dataset(spec(kind="webdataset", shards=shards, eval_images=8), seed=0)
    assert dataset.skipped() == {"empty_caption": 1, "missing_caption": 1, "missing_image": 1}
    # 60 indexed pairs (the corrupt one is only found when decoded); the last 8 are held out.
    assert (len(dataset.train), len(dataset.held_out)) == (52, 8)

    batches = [dataset.train_batch(step, 16) for step in range(1, 5)]  # more than one epoch
    assert all(b.images.shape == (16, 3, 16, 16) for b in batches)
    assert dataset.skipped()["unreadable_image"] == 1
    captions = [c for b in batches for c in b.captions]
    assert "a caption for an unreadable image" not in captions
    assert "a striped flag" in captions
    flag = next(model_input(b.images)[b.captions.index("a striped flag")] for b in batches
                if "a striped flag" in b.captions)
    # Centre crop, then resize: the square from the middle third is green all over.
    assert torch.allclose(flag.mean(dim=(1, 2)), pixel(GREEN), atol=0.02)
    assert dataset.eval_set().images.shape == (8, 3, 16, 16)
    assert dataset.eval_set().images.dtype == torch.uint8 and (dataset.mean, dataset.std) == (MEAN, STD)
    assert dataset.zeroshot_set() is None and dataset.classes == ()


def test_a_real_data_batch_is_a_pure_function_of_seed_and_step_so_resume_is_exact(shards):
    def fresh():
        return make_dataset(spec(kind="webdataset", shards=shards, eval_images=8, caption_noise=0.2), seed=5)

    straight = fresh()
    ran = [straight.train_batch(step, 20) for step in range(1, 8)]  # spans several epochs
    resumed = fresh()
    for step in (7, 3):
        again = resumed.train_batch(step, 20)
        assert torch.equal(again.images, ran[step - 1].images) and again.captions == ran[step - 1].captions
    # Without noise an epoch is a permutation: the first 52 positions hold each training caption
    # once, except the unreadable image's, which a random draw (maybe a repeat) replaces.
    clean = make_dataset(spec(kind="webdataset", shards=shards, eval_images=8), seed=5)
    epoch = [c for step in (1, 2, 3) for c in clean.train_batch(step, 20).captions][:52]
    assert len(set(epoch)) in (50, 51) and "a caption for an unreadable image" not in epoch
    other_seed = make_dataset(spec(kind="webdataset", shards=shards, eval_images=8), seed=6)
    assert other_seed.train_batch(1, 20).captions != ran[0].captions


def test_a_real_data_rank_decodes_only_its_rows_and_gets_exactly_those_rows_of_the_batch(shards, tmp_path):
    def fresh(source: str, **knobs):
        return make_dataset(spec(kind="webdataset", shards=source, eval_images=8, **knobs), seed=5)

    good = str(write_shard(tmp_path / "good.tar", good_pairs(40)))
    for source, knobs in ((shards, {}), (good, {"caption_noise": 0.3})):
        whole_data = fresh(source, **knobs)
        for step in (1, 2, 3):  # with `shards`, these rows hold the corrupt image
            whole = whole_data.train_batch(step, 20)
            ranks = fresh(source, **knobs)
            for rows in (slice(0, 7), slice(7, 14), slice(14, 20)):
                part = ranks.train_batch(step, 20, rows)
                assert torch.equal(part.images, whole.images[rows]) and part.captions == whole.captions[rows]
            if source == good:  # every image readable: the index alone knows every caption
                assert fresh(source, **knobs).train_captions(step, 20) == whole.captions


def test_the_whole_batchs_captions_come_from_the_index_without_decoding_an_image(shards):
    def fresh():
        return make_dataset(spec(kind="webdataset", shards=shards, eval_images=8), seed=5)

    decoded, listed = fresh(), fresh()
    differ = []
    for step in (1, 2, 3):
        built, index = decoded.train_batch(step, 20).captions, listed.train_captions(step, 20)
        differ += [(a, b) for a, b in zip(index, built) if a != b]
    assert listed.skipped().get("unreadable_image") is None  # nothing was decoded
    # Only the unreadable image's row differs: the batch replaced it, the index cannot know.
    assert differ and {a for a, _ in differ} == {"a caption for an unreadable image"}


def test_a_csv_loads_relative_paths_and_skips_missing_files_empty_captions_and_corrupt_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG truncated")
    # The bad rows come first, so none of them is in the held-out tail.
    rows = [
        {"image": "images/absent.png", "caption": "a missing file"},
        {"image": "images/0.png", "caption": ""},
        {"image": "images/broken.png", "caption": "a corrupt image"},
    ]
    for i in range(12):
        (images / f"{i}.png").write_bytes(image_bytes((20, 20), BLUE if i % 2 else RED))
        rows.append({"image": f"images/{i}.png", "caption": "a blue square" if i % 2 else "a red square"})
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    dataset = make_dataset(spec(kind="csv", csv=str(path), eval_images=4), seed=0)
    assert dataset.skipped() == {"missing_image": 1, "empty_caption": 1}
    batch = dataset.train_batch(1, 9)  # the 9 training rows: 8 good ones and the corrupt one
    assert dataset.skipped()["unreadable_image"] == 1
    for image, text in zip(model_input(batch.images), batch.captions):
        expected = pixel(BLUE if text == "a blue square" else RED)
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.02)


def test_held_out_shards_are_the_retrieval_set(shards, tmp_path):
    held = write_shard(tmp_path / "held.tar", good_pairs(5, start=100))
    dataset = make_dataset(spec(kind="webdataset", shards=shards, eval_shards=str(held)), seed=0)
    assert dataset.eval_set().captions == [f"photo number {i}" for i in range(100, 105)]
    assert len(dataset.train) == 60  # nothing held out of training


def test_too_few_samples_to_hold_out_the_eval_images_is_an_error_naming_the_fix(shards):
    with pytest.raises(ValueError, match="data.eval_images"):
        make_dataset(spec(kind="webdataset", shards=shards, eval_images=512), seed=0)


def test_a_shard_path_that_does_not_exist_is_a_validation_error_naming_the_key_and_path(shards, write_study, capsys):
    missing = shards.replace("{000..001}", "{000..002}")
    study = tiny_study(base={"data": {"kind": "webdataset", "shards": [missing]}})
    assert main(["validate", str(write_study(study))]) == 2
    err = capsys.readouterr().err
    assert "base.data.shards" in err and "shard-002.tar" in err


def test_real_data_kinds_need_their_source_and_shapes_rejects_one(tmp_path):
    with pytest.raises(ValidationError, match="data.kind=webdataset needs data.shards"):
        DataSpec(kind="webdataset")
    with pytest.raises(ValidationError, match="data.kind=shapes"):
        DataSpec(kind="csv")
    # Whether the files are there is the preflight's question, not the schema's.
    [problem] = check_data(DataSpec(kind="csv", csv=str(tmp_path / "absent.csv")))
    assert problem.startswith("data.csv:") and "does not exist" in problem
    (tmp_path / "bad.csv").write_text("path,text\nx.png,hello\n")
    [problem] = check_data(DataSpec(kind="csv", csv=str(tmp_path / "bad.csv")))
    assert "caption" in problem


# --- zero-shot on an image folder ---------------------------------------------------------------


@pytest.fixture
def classes_dir(tmp_path: Path) -> Path:
    root = tmp_path / "zeroshot"
    for name, colour in (("red_thing", RED), ("green_thing", GREEN), ("blue_thing", BLUE)):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.png").write_bytes(image_bytes((20, 20), colour))
    (root / "blue_thing" / "notes.txt").write_text("not an image")
    (root / "red_thing" / "broken.png").write_bytes(b"not a png")
    return root


def test_an_image_folder_gives_zero_shot_classes_from_its_subfolders(classes_dir, shards):
    dataset = make_dataset(
        spec(kind="webdataset", shards=shards, eval_images=8, zeroshot_dir=str(classes_dir)), seed=0
    )
    assert dataset.classes == ("blue thing", "green thing", "red thing")
    assert all("{}" in t for t in dataset.templates) and len(dataset.templates) == 7
    (task,) = dataset.zeroshot_set().tasks
    assert task.classes == dataset.classes
    assert task.prompts[0] == tuple(t.format("blue thing") for t in dataset.templates)
    assert task.labels.tolist() == [0, 1, 2] * 2 + [0, 1]  # round-robin, capped at eval_images
    for image, label in zip(model_input(dataset.zeroshot_set().images), task.labels):
        assert torch.allclose(image.mean(dim=(1, 2)), pixel((BLUE, GREEN, RED)[label]), atol=0.02)


def test_zero_shot_class_names_can_be_given_and_must_match_the_folders(classes_dir):
    names = ["sky", "grass", "fire"]
    dataset = make_dataset(spec(zeroshot_dir=str(classes_dir), zeroshot_classes=names,
                                zeroshot_templates=["a {}"], eval_images=100), seed=0)
    assert dataset.classes == tuple(names) and dataset.templates == ("a {}",)
    zeroshot = dataset.zeroshot_set()
    assert [len(t.labels) for t in zeroshot.tasks] == [12] and dataset.skipped() == {"unreadable_image": 1}
    assert zeroshot.tasks[0].prompts == (("a sky",), ("a grass",), ("a fire",))
    assert (dataset.eval_set().labels == -1).all()  # shapes' own labels index no folder class
    [problem] = check_data(DataSpec(zeroshot_dir=str(classes_dir), zeroshot_classes=["sky"]))
    assert "one name per subfolder" in problem
    [problem] = check_data(DataSpec(zeroshot_dir=str(classes_dir / "absent")))
    assert "not a directory" in problem


def test_shapes_score_zero_shot_on_their_held_out_images_over_the_classes_and_every_attribute():
    dataset = make_dataset(spec(), seed=0)
    zeroshot = dataset.zeroshot_set()
    assert dataset.classes == CLASSES and zeroshot.tasks[0].classes == CLASSES
    assert torch.equal(zeroshot.tasks[0].labels, dataset.eval_set().labels)
    assert torch.equal(zeroshot.images, dataset.eval_set().images)
    assert [t.name for t in zeroshot.tasks[1:]] == list(ATTRIBUTES)
    assert all(task.classes == ATTRIBUTES[task.name] for task in zeroshot.tasks[1:])
    # Each image's attribute labels spell out its caption.
    rebuilt = [caption(*(task.classes[int(task.labels[i])] for task in zeroshot.tasks[1:]))
               for i in range(len(zeroshot.images))]
    assert rebuilt == dataset.eval_set().captions


def test_zero_shot_prompts_are_training_captions_that_differ_between_classes_only_in_the_class():
    dataset = make_dataset(spec(holdout_classes=["red square", "red cross"]), seed=0)
    joint, *attributes = dataset.zeroshot_set().tasks
    assert all(len(prompts) == PROMPTS_PER_CLASS for task in (joint, *attributes) for prompts in task.prompts)
    for name, prompts in zip(joint.classes, joint.prompts):
        assert all(f" {name}," in p and p in caption_space() for p in prompts)
        # Shared draws: replacing the class name gives the first class's prompts back.
        assert [p.replace(f" {name},", f" {joint.classes[0]},") for p in prompts] == list(joint.prompts[0])
    colour = next(t for t in attributes if t.name == "colour")
    red = colour.prompts[colour.classes.index("red")]
    # A free shape is drawn as training draws it: never a held-out pair.
    assert not [p for p in red if " red square," in p or " red cross," in p]
    assert {p.split(",")[0].split()[-1] for p in red} == {"circle", "triangle", "diamond"}


def caption_space() -> _CaptionSpace:
    return _CaptionSpace()


class _CaptionSpace:
    """`text in caption_space()`: whether the text is a caption the shapes can have."""

    def __contains__(self, text: str) -> bool:
        head, position, digits = text.split(", ")
        article, *words = head.split()
        first, *rest = digits.split()
        values = [*words, position, *rest]
        return (article == "a" and first == "digits" and len(values) == len(ATTRIBUTES)
                and all(v in options for v, options in zip(values, ATTRIBUTES.values())))


# --- a real study on real files -----------------------------------------------------------------


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail the test (instead of hanging the suite) if the block runs longer than `seconds`."""
    def fail(*_: object) -> None:
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.train
def test_a_tiny_study_on_a_tiny_webdataset_runs_to_done(tmp_path, write_study, classes_dir):
    for k in range(2):
        write_shard(tmp_path / f"train-{k}.tar", good_pairs(48, start=48 * k))
    held = write_shard(tmp_path / "held.tar", good_pairs(16, start=500))
    data = {"kind": "webdataset", "shards": str(tmp_path / "train-{0..1}.tar"), "eval_shards": str(held),
            "zeroshot_dir": str(classes_dir), "caption_noise": 0.1}
    study = tiny_study(name="realdata", grid={"loss.kind": ["sigmoid"]}, base={"data": data})
    study["base"]["train"].update(examples_seen=128, eval_every=0)
    out = tmp_path / "runs"
    with deadline(180):
        assert main(["run", str(write_study(study)), "--out", str(out)]) == 0
    results = pl.read_parquet(RunStore(out / "realdata").results_path)
    assert results["status"].to_list() == ["done"]
    assert results["retrieval_i2t_r1"][0] is not None
    config = yaml.safe_load((out / "realdata" / "study.yaml").read_text())
    assert config["base"]["data"]["kind"] == "webdataset"


def test_a_study_with_a_relative_shard_path_records_it_absolute(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = validate_study(tiny_study(base={"data": {"kind": "webdataset", "shards": "shard-{000..001}.tar"}}),
                           "s.yaml")
    assert study.base.data.shards == [shards]
    missing = validate_study(tiny_study(base={"data": {"kind": "webdataset", "shards": "shard-009.tar"}}),
                             "s.yaml")
    with pytest.raises(SpecError, match=str(tmp_path / "shard-009.tar")):
        preflight(expand(missing), "s.yaml")
