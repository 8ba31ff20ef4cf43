"""Zero-shot classification (CLIP §3.1.4: class prompts from templates, ensembled) and retrieval."""

from __future__ import annotations

import torch

from scalestudy.train.data import Batch, Dataset, HashTokenizer
from scalestudy.train.models import TwoTower


def recall_at(
    similarity: torch.Tensor, row_keys: torch.Tensor, column_keys: torch.Tensor, k: int
) -> float:
    """Fraction of rows with a column of the same key among the row's k highest scores."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    return (column_keys[top] == row_keys.unsqueeze(1)).any(dim=1).float().mean().item()


def class_embeddings(
    model: TwoTower, classes: tuple[str, ...], templates: tuple[str, ...],
    tokenizer: HashTokenizer, device: torch.device,
) -> torch.Tensor:
    """One unit vector per class: the normalised mean of its prompt embeddings."""
    prompts = [template.format(name) for name in classes for template in templates]
    text = model.encode_text(tokenizer(prompts).to(device))
    text = text.view(len(classes), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(text, dim=-1)


@torch.no_grad()
def evaluate(
    model: TwoTower, dataset: Dataset, batch: Batch, tokenizer: HashTokenizer, device: torch.device
) -> dict[str, float]:
    """Zero-shot top-1/5 over the classes and image↔text recall@1/5 over the held-out captions."""
    was_training = model.training
    model.eval()
    images = model.encode_image(batch.images.to(device))
    texts = model.encode_text(tokenizer(batch.captions).to(device))
    classes = class_embeddings(model, dataset.classes, dataset.templates, tokenizer, device)
    model.train(was_training)
    labels = batch.labels.to(device)
    class_ids = torch.arange(len(dataset.classes), device=device)
    # Procedural captions repeat (a "small red circle on the left" can occur twice), so a retrieved
    # item counts as a hit when its caption is the same text as the query's, not only its own pair.
    caption_ids = {caption: i for i, caption in enumerate(dict.fromkeys(batch.captions))}
    keys = torch.tensor([caption_ids[c] for c in batch.captions], device=device)
    zeroshot, similarity = images @ classes.t(), images @ texts.t()
    return {
        "zeroshot_top1": recall_at(zeroshot, labels, class_ids, 1),
        "zeroshot_top5": recall_at(zeroshot, labels, class_ids, 5),
        "retrieval_i2t_r1": recall_at(similarity, keys, keys, 1),
        "retrieval_i2t_r5": recall_at(similarity, keys, keys, 5),
        "retrieval_t2i_r1": recall_at(similarity.t(), keys, keys, 1),
        "retrieval_t2i_r5": recall_at(similarity.t(), keys, keys, 5),
    }
