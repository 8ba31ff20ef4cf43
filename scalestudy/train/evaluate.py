"""Evaluation: zero-shot classification (ensembled prompts, CLIP §3.1.4) over the dataset's classes
and each attribute it has, a linear probe on frozen image features, and image↔text retrieval.

Nothing here knows the dataset or the tokenizer: the dataset gives its held-out sets and, for each
zero-shot task, the prompts that stand for each class (for shapes: training-like captions with the
class's attributes fixed, so no evaluation ceiling comes from prompts the model never read); the
tokenizer is any callable from texts to token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from scalestudy.train.data import Dataset, ZeroShotTask, normalize

Tokenizer = Callable[[list[str]], torch.Tensor]
# Images (and prompts) are encoded this many at a time, so a large held-out set fits any device.
ENCODE_CHUNK = 1024
# The linear probe's L2 penalty on its weights (features standardised first) and its L-BFGS budget.
PROBE_WEIGHT_DECAY = 1e-3
PROBE_ITERATIONS = 100


class Encoders(Protocol):
    """The two towers as evaluation sees them: unit-norm embeddings of images and token ids."""

    training: bool

    def train(self, mode: bool = True) -> Encoders: ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


def recall_at(
    similarity: torch.Tensor, row_keys: torch.Tensor, column_keys: torch.Tensor, k: int
) -> float:
    """Fraction of rows with a column of the same key among the row's k highest scores."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    return (column_keys[top] == row_keys.unsqueeze(1)).any(dim=1).float().mean().item()


def _chunked(encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([encode(part) for part in inputs.split(ENCODE_CHUNK)])


def encode_images(
    model: Encoders, dataset: Dataset, images: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Unit-norm embeddings of uint8 images, normalised on the device as in training."""
    return _chunked(lambda x: model.encode_image(normalize(x.to(device), dataset.mean, dataset.std)), images)


def encode_texts(
    model: Encoders, texts: list[str], tokenizer: Tokenizer, device: torch.device
) -> torch.Tensor:
    return _chunked(lambda t: model.encode_text(t.to(device)), tokenizer(texts))


def ensemble(text: torch.Tensor, task: ZeroShotTask) -> torch.Tensor:
    """One unit vector per class of the task: the normalised mean of its prompts' (unit)
    embeddings, `text` holding them class by class in task.prompts order."""
    sizes = torch.tensor([len(prompts) for prompts in task.prompts], device=text.device)
    owner = torch.repeat_interleave(torch.arange(len(task.prompts), device=text.device), sizes)
    sums = torch.zeros(len(task.prompts), text.shape[1], device=text.device, dtype=text.dtype)
    sums.index_add_(0, owner, text)
    return torch.nn.functional.normalize(sums / sizes.unsqueeze(1), dim=-1)


def class_embeddings(
    model: Encoders, tasks: tuple[ZeroShotTask, ...], tokenizer: Tokenizer, device: torch.device
) -> list[torch.Tensor]:
    """Each task's class embeddings (see `ensemble`); all prompts are encoded in one pass."""
    texts = [prompt for task in tasks for prompts in task.prompts for prompt in prompts]
    text = encode_texts(model, texts, tokenizer, device)
    counts = [sum(len(prompts) for prompts in task.prompts) for task in tasks]
    return [ensemble(part, task) for part, task in zip(text.split(counts), tasks)]


def linear_probe_top1(features: torch.Tensor, labels: torch.Tensor, classes: int) -> float | None:
    """Top-1 of a multinomial logistic regression fitted on the first half of the images and scored
    on the second half (CLIP §3.2's linear probe, with a fixed L2 penalty instead of a sweep).

    Features are standardised with the first half's statistics; the fit is full-batch L-BFGS in
    float64 on the CPU from zero weights, so the same features always give the same accuracy.
    None with fewer than two images in either half.
    """
    half = len(labels) // 2
    if half < 2:
        return None
    x = features.detach().to("cpu", torch.float64)
    y = labels.to("cpu")
    mean, std = x[:half].mean(0), x[:half].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=PROBE_ITERATIONS, history_size=10,
                                  line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x[:half] @ weight + bias, y[:half])
        value = value + PROBE_WEIGHT_DECAY * weight.pow(2).sum()
        value.backward()
        return value

    # One thread: the ops are tiny, and a thread team's hand-offs cost far more than the maths
    # (measured on a busy 2-core machine: 0.17 s on one thread, 5.8 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            optimizer.step(loss)
    finally:
        torch.set_num_threads(threads)
    predicted = (x[half:] @ weight + bias).argmax(1)
    return (predicted == y[half:]).double().mean().item()


@torch.no_grad()
def evaluate(
    model: Encoders, dataset: Dataset, tokenizer: Tokenizer, device: torch.device
) -> dict[str, float | None]:
    """The evaluation metrics of the model now, on the dataset's held-out sets.

    zeroshot_top1/top5 over the dataset's classes, zeroshot_top1_<attribute> for each attribute
    task the dataset has (shapes: colour, shape, size, …), linear_probe_top1 on the same images
    and labels; retrieval recall@1/5 both ways over the held-out captions. Without zero-shot
    classes (real data without data.zeroshot_dir) the zero-shot and probe values are None.
    """
    was_training = model.training
    model.train(False)
    try:
        return _metrics(model, dataset, tokenizer, device)
    finally:
        model.train(was_training)


def _metrics(
    model: Encoders, dataset: Dataset, tokenizer: Tokenizer, device: torch.device
) -> dict[str, float | None]:
    held_out = dataset.eval_set()
    images = encode_images(model, dataset, held_out.images, device)
    texts = encode_texts(model, held_out.captions, tokenizer, device)
    # Captions can repeat (two held-out images described alike), so a retrieved item is a hit when
    # its caption is the same text as the query's, not only when it is the query's own pair.
    caption_ids = {caption: i for i, caption in enumerate(dict.fromkeys(held_out.captions))}
    keys = torch.tensor([caption_ids[c] for c in held_out.captions], device=device)
    similarity = images @ texts.t()
    metrics: dict[str, float | None] = {
        "zeroshot_top1": None, "zeroshot_top5": None, "linear_probe_top1": None,
        "retrieval_i2t_r1": recall_at(similarity, keys, keys, 1),
        "retrieval_i2t_r5": recall_at(similarity, keys, keys, 5),
        "retrieval_t2i_r1": recall_at(similarity.t(), keys, keys, 1),
        "retrieval_t2i_r5": recall_at(similarity.t(), keys, keys, 5),
    }
    zeroshot = dataset.zeroshot_set()
    if zeroshot is None:
        return metrics
    # Shapes score zero-shot on the retrieval images themselves: encode them once.
    same = zeroshot.images is held_out.images
    features = images if same else encode_images(model, dataset, zeroshot.images, device)
    for task, classes in zip(zeroshot.tasks, class_embeddings(model, zeroshot.tasks, tokenizer, device)):
        scores = features @ classes.t()
        labels = task.labels.to(device)
        class_ids = torch.arange(len(task.classes), device=device)
        suffix = f"_{task.name}" if task.name else ""
        metrics[f"zeroshot_top1{suffix}"] = recall_at(scores, labels, class_ids, 1)
        if not task.name:
            metrics["zeroshot_top5"] = recall_at(scores, labels, class_ids, 5)
    first = zeroshot.tasks[0]
    metrics["linear_probe_top1"] = linear_probe_top1(features, first.labels, len(first.classes))
    return metrics
