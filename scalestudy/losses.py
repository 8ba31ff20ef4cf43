"""Contrastive image–text losses as pure functions.

Both take L2-normalised features of shape (B, D) where row i of each is a positive pair, and the
logit scale t as the multiplier itself (not log t).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["softmax_loss", "sigmoid_loss"]


def softmax_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, Fig. 3 pseudo-code).

    The mean of the image→text and text→image cross-entropies over the B×B logits
    ``t · I Tᵀ`` with the diagonal as targets. Memory: the B×B logits, twice (forward + grad).
    """
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1).

    ``-Σ_ij log σ(z_ij (t xᵢ·yⱼ + b)) / B`` with z_ij = +1 on the diagonal and −1 elsewhere: every
    pair is an independent binary problem, normalised by the batch size B (not B²).
    ``logit_bias=None`` is the bias-free variant (b = 0). Memory: the B×B logits.
    """
    logits = logit_scale * image_features @ text_features.t()
    if logit_bias is not None:
        logits = logits + logit_bias
    batch = logits.shape[0]
    signs = 2 * torch.eye(batch, device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / batch
