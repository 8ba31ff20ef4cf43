"""Evaluation with known answers: toy encoders whose embeddings are fixed by hand, so every
accuracy and recall has one right value; then the real datasets' zero-shot sets (an image folder,
real data without classes, the shapes)."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from scalestudy.spec import DataSpec, ModelSpec
from scalestudy.train.data import Batch, ZeroShotSet, ZeroShotTask
from scalestudy.train.tokenizers import HashTokenizer
from scalestudy.train.datasets import make_dataset
from scalestudy.train.evaluate import class_embeddings, evaluate, linear_probe_top1, recall_at
from scalestudy.train.models import TwoTower
from scalestudy.train.shapes_vocab import ATTRIBUTES

CPU = torch.device("cpu")
DIM = 16


def unit(*weights: tuple[int, float]) -> torch.Tensor:
    """A unit vector from (axis, weight) pairs."""
    v = torch.zeros(DIM)
    for axis, weight in weights:
        v[axis] += weight
    return v / v.norm()


def word_tokenizer(texts: list[str]) -> torch.Tensor:
    """Each word's index in a fixed vocabulary (0: padding, and any other word), as any tokenizer
    returns ids."""
    rows = [[VOCAB.index(w) if w in VOCAB else 0 for w in re.findall(r"[a-z0-9]+", t)] for t in texts]
    out = torch.zeros(len(texts), max(map(len, rows), default=1), dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


VOCAB = ["<pad>", "a", "photo", "of", "red", "green", "blue", "thing", "sky", "grass", "fire", "left", "right"]
VOCAB += [f"c{i}" for i in range(10)]


class Toy(nn.Module):
    """Text: the normalised sum of fixed word vectors. Images: a fixed vector per image, found by
    the image's id (written into its first pixel), so the geometry of both sides is set by hand."""

    def __init__(self, words: dict[str, torch.Tensor], images: list[torch.Tensor]) -> None:
        super().__init__()
        table = torch.zeros(len(VOCAB), DIM)
        for word, vector in words.items():
            table[VOCAB.index(word)] = vector
        self.words = nn.Embedding.from_pretrained(table)
        self.images = torch.stack(images) if images else torch.zeros(0, DIM)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.words(tokens).sum(1), dim=-1)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, 0, 0, 0] * 255).round().long()  # mean 0, std 1: x is the pixel / 255
        return self.images[ids]


def id_images(count: int) -> torch.Tensor:
    """uint8 images whose first pixel is their index."""
    images = torch.zeros(count, 3, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    return images


@dataclass
class ToyData:
    """A Dataset with hand-made held-out sets (mean 0, std 1, so images reach Toy unchanged)."""

    eval: Batch
    zeroshot: ZeroShotSet | None = None
    classes: tuple[str, ...] = ()
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    calls: list[str] = field(default_factory=list)

    def eval_set(self) -> Batch:
        return self.eval

    def zeroshot_set(self) -> ZeroShotSet | None:
        return self.zeroshot


def class_words() -> dict[str, torch.Tensor]:
    return {f"c{i}": unit((i, 1.0)) for i in range(10)}


def test_zero_shot_top1_and_top5_are_the_fractions_of_images_ranking_their_class_first_and_in_the_top_five():
    # Ten classes, two images each, one prompt per class whose embedding is axis c. Images of
    # classes 0–6 point at their class; class 7's and 8's point mostly at class 6, their own class
    # second (a top-1 miss, a top-5 hit); class 9's rank six other classes above their own (both miss).
    vectors = {c: unit((c, 1.0)) for c in range(7)}
    vectors[7] = unit((6, 1.0), (7, 0.5))
    vectors[8] = unit((6, 1.0), (8, 0.5))
    vectors[9] = unit((0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6), (5, 0.5), (9, 0.1))
    labels = torch.arange(10).repeat(2)
    images = [vectors[int(c)] for c in labels]
    task = ZeroShotTask("", tuple(f"c{i}" for i in range(10)), tuple((f"c{i}",) for i in range(10)), labels)
    data = ToyData(Batch(id_images(20), ["a"] * 20, labels), ZeroShotSet(id_images(20), (task,)), task.classes)
    metrics = evaluate(Toy(class_words(), images), data, word_tokenizer, CPU)
    assert metrics["zeroshot_top1"] == pytest.approx(0.7)
    assert metrics["zeroshot_top5"] == pytest.approx(0.9)


def test_each_attribute_task_is_scored_on_its_own_labels_and_reported_under_its_name():
    words = {"red": unit((0, 1.0)), "blue": unit((1, 1.0)), "left": unit((2, 1.0)), "right": unit((3, 1.0))}
    # Four images: colour always right; the position of image 3 wrong (it points at "left").
    images = [unit((0, 1), (2, 1)), unit((1, 1), (3, 1)), unit((0, 1), (3, 1)), unit((1, 1), (2, 1))]
    colour = ZeroShotTask("colour", ("red", "blue"), (("red",), ("blue",)), torch.tensor([0, 1, 0, 1]))
    side = ZeroShotTask("side", ("left", "right"), (("left",), ("right",)), torch.tensor([0, 1, 1, 1]))
    joint = ZeroShotTask("", ("red", "blue"), (("red",), ("blue",)), torch.tensor([0, 1, 0, 1]))
    data = ToyData(Batch(id_images(4), ["red"] * 4, torch.zeros(4)), ZeroShotSet(id_images(4), (joint, colour, side)))
    metrics = evaluate(Toy(words, images), data, word_tokenizer, CPU)
    assert metrics["zeroshot_top1_colour"] == 1.0 and metrics["zeroshot_top1_side"] == 0.75
    assert "zeroshot_top5_colour" not in metrics and metrics["zeroshot_top1"] == 1.0


def test_a_class_embedding_is_the_normalised_mean_of_its_prompts_unit_embeddings():
    g = torch.Generator().manual_seed(0)
    words = {w: torch.randn(DIM, generator=g) for w in VOCAB[1:]}
    model = Toy(words, [])
    prompts = (("a red thing", "a photo of red", "red"), ("blue",), ("a green thing", "green grass"))
    task = ZeroShotTask("", ("r", "b", "g"), prompts, torch.zeros(0))
    other = ZeroShotTask("side", ("l",), (("left", "right thing"),), torch.zeros(0))
    got, _ = class_embeddings(model, (task, other), word_tokenizer, CPU)
    for row, texts in zip(got, prompts):
        each = [model.encode_text(word_tokenizer([t]))[0] for t in texts]
        mean = torch.stack(each).mean(0)
        assert torch.allclose(row, mean / mean.norm(), atol=1e-6)


def test_ensembling_recovers_classes_that_a_single_prompt_gets_wrong():
    # Class c's two prompts are its axis plus a nuisance word, "left" (+3 on axis 0) or "right"
    # (−3); only their mean is the class's axis. Every image leans a little towards +axis 0, so
    # with the first prompt alone the classes whose first prompt says "right" lose their images.
    words = {**class_words(), "left": unit((0, 1.0)) * 3, "right": -unit((0, 1.0)) * 3}
    prompts = tuple((f"c{i} right", f"c{i} left") if i % 2 else (f"c{i} left", f"c{i} right") for i in range(1, 10))
    labels = torch.arange(9)
    task = ZeroShotTask("", tuple(f"c{i}" for i in range(1, 10)), prompts, labels)
    images = [unit((c, 1.0), (0, 0.5)) for c in range(1, 10)]
    data = ToyData(Batch(id_images(9), ["a"] * 9, labels), ZeroShotSet(id_images(9), (task,)))
    model = Toy(words, images)
    assert evaluate(model, data, word_tokenizer, CPU)["zeroshot_top1"] == 1.0
    first_only = ZeroShotTask("", task.classes, tuple(p[:1] for p in prompts), labels)
    data.zeroshot = ZeroShotSet(id_images(9), (first_only,))
    assert evaluate(model, data, word_tokenizer, CPU)["zeroshot_top1"] == pytest.approx(4 / 9)


def test_retrieval_counts_an_item_with_the_same_caption_text_as_a_hit():
    words = {"red": unit((0, 1.0)), "blue": unit((1, 1.0)), "green": unit((2, 1.0))}
    captions = ["red", "red", "blue", "green"]
    # Image 0 is closest to caption 1 (same text: a hit); image 2 is closer to "green" than to its
    # own "blue" (a miss at rank 1, a hit at rank 2), and the only image "blue" can find.
    images = [unit((0, 1.0)), unit((0, 1.0)), unit((2, 1.0), (1, 0.5)), unit((2, 1.0))]
    data = ToyData(Batch(id_images(4), captions, torch.full((4,), -1)))
    metrics = evaluate(Toy(words, images), data, word_tokenizer, CPU)
    assert metrics["retrieval_i2t_r1"] == 0.75 and metrics["retrieval_i2t_r5"] == 1.0
    assert metrics["retrieval_t2i_r1"] == 1.0
    keys = torch.tensor([0, 0, 1, 2])
    similarity = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0], [0.0, 0.05, 0.1, 0.9], [0, 0, 0, 1.0]])
    assert recall_at(similarity, keys, keys, 1) == 0.75 and recall_at(similarity, keys, keys, 2) == 1.0


def test_without_zero_shot_classes_the_zero_shot_and_probe_values_are_none_and_retrieval_is_scored():
    words = {"red": unit((0, 1.0)), "blue": unit((1, 1.0))}
    data = ToyData(Batch(id_images(2), ["red", "blue"], torch.full((2,), -1)))
    metrics = evaluate(Toy(words, [unit((0, 1.0)), unit((1, 1.0))]), data, word_tokenizer, CPU)
    assert metrics["zeroshot_top1"] is None and metrics["zeroshot_top5"] is None
    assert metrics["linear_probe_top1"] is None and metrics["retrieval_i2t_r1"] == 1.0
    assert not [k for k in metrics if k.startswith("zeroshot_top1_")]


def clusters(classes: int, per_class: int, seed: int, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, DIM, generator=g)
    labels = torch.arange(classes).repeat(per_class)
    return centres[labels] + spread * torch.randn(len(labels), DIM, generator=g), labels


def test_the_linear_probe_separates_separable_features_and_is_deterministic():
    features, labels = clusters(10, 8, seed=1)
    assert linear_probe_top1(features, labels, 10) == 1.0
    noisy, labels = clusters(10, 8, seed=2, spread=2.0)
    assert linear_probe_top1(noisy, labels, 10) == linear_probe_top1(noisy.clone(), labels, 10)


def test_the_linear_probe_is_scored_only_on_images_it_was_not_fitted_on():
    features, labels = clusters(10, 8, seed=3)
    half = len(labels) // 2
    # In the scored half every class wears the next class's features: a probe that fitted the
    # first half gets every one wrong; one that had seen the second half would not.
    swapped = labels.clone()
    swapped[half:] = (labels[half:] - 1) % 10
    assert linear_probe_top1(features, swapped, 10) == 0.0
    assert linear_probe_top1(features[:1], labels[:1], 10) is None


# --- the real datasets' zero-shot sets --------------------------------------------------------


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    for name, colour in (("blue_thing", BLUE), ("green_thing", GREEN), ("red_thing", RED)):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(png(colour))
    return root


@pytest.fixture
def pairs_csv(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(12):
            colour, word = ((RED, "red"), (GREEN, "green"), (BLUE, "blue"))[i % 3]
            (tmp_path / "images" / f"{i}.png").write_bytes(png(colour))
            writer.writerow([f"images/{i}.png", f"a {word} thing"])
    return path


class ColourReader(Toy):
    """Images: the axis of their brightest channel (red 0, green 1, blue 2), read off the
    normalised pixels; text: the colour word's axis."""

    def __init__(self) -> None:
        super().__init__({"red": unit((0, 1.0)), "green": unit((1, 1.0)), "blue": unit((2, 1.0)),
                          "fire": unit((0, 1.0)), "grass": unit((1, 1.0)), "sky": unit((2, 1.0))}, [])

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x.mean((2, 3)).argmax(1), DIM).float()


@pytest.mark.parametrize("kind", ["shapes", "csv"])
def test_zero_shot_on_an_image_folder_is_scored_against_the_folders_labels(kind, folder, pairs_csv):
    source = {"kind": "csv", "csv": str(pairs_csv)} if kind == "csv" else {}
    spec = DataSpec(image_size=8, eval_images=6, zeroshot_dir=str(folder), zeroshot_templates=["a {}"], **source)
    metrics = evaluate(ColourReader(), make_dataset(spec, seed=0), word_tokenizer, CPU)
    assert metrics["zeroshot_top1"] == 1.0 and metrics["linear_probe_top1"] is not None
    # Names that describe the folders wrongly (blue_thing called "grass", green_thing "sky"):
    # only the red folder, still called "fire", is classified right.
    wrong = spec.model_copy(update={"zeroshot_classes": ["grass", "sky", "fire"]})
    metrics = evaluate(ColourReader(), make_dataset(wrong, seed=0), word_tokenizer, CPU)
    assert metrics["zeroshot_top1"] == pytest.approx(1 / 3)


def test_real_data_without_an_image_folder_has_no_zero_shot_score_and_still_scores_retrieval(pairs_csv):
    spec = DataSpec(kind="csv", csv=str(pairs_csv), image_size=8, eval_images=6)
    metrics = evaluate(ColourReader(), make_dataset(spec, seed=0), word_tokenizer, CPU)
    assert metrics["zeroshot_top1"] is None and metrics["linear_probe_top1"] is None
    assert metrics["retrieval_i2t_r1"] == 1.0  # the reader matches every colour to its caption


def test_a_real_model_on_the_shapes_reports_every_metric_between_zero_and_one():
    spec = DataSpec(image_size=16, eval_images=64)
    model_spec = ModelSpec(width=16, depth=1, heads=2, embed_dim=16, context_length=16, vocab_size=512)
    torch.manual_seed(0)
    model = TwoTower(model_spec, 16, 10.0, None, True, 100.0)
    model.train()
    metrics = evaluate(model, make_dataset(spec, seed=0), HashTokenizer(512, 16), CPU)
    expected = {"zeroshot_top1", "zeroshot_top5", "linear_probe_top1", "retrieval_i2t_r1", "retrieval_i2t_r5",
                "retrieval_t2i_r1", "retrieval_t2i_r5", *(f"zeroshot_top1_{name}" for name in ATTRIBUTES)}
    assert set(metrics) == expected
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert model.training  # evaluation leaves the model in the mode it found it
