"""The two towers: a small ViT for images, a small transformer for text, each projected to a shared
L2-normalised embedding; plus the loss's learnable logit scale t (as log t) and bias b."""

from __future__ import annotations

import math

import torch
from torch import nn

from scalestudy.spec import ModelSpec


def _encoder(width: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        width, heads, dim_feedforward=4 * width, dropout=0.0, batch_first=True, norm_first=True,
        activation="gelu",
    )
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ImageTower(nn.Module):
    """ViT (Dosovitskiy et al. 2021): patches → transformer → class token → projection."""

    def __init__(self, spec: ModelSpec, image_size: int) -> None:
        super().__init__()
        patches = (image_size // spec.patch_size) ** 2
        self.patchify = nn.Conv2d(3, spec.width, spec.patch_size, stride=spec.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, patches + 1, spec.width))
        self.encoder = _encoder(spec.width, spec.depth, spec.heads)
        self.norm = nn.LayerNorm(spec.width)
        self.proj = nn.Linear(spec.width, spec.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.norm(self.encoder(x))
        return self.proj(x[:, 0])


class TextTower(nn.Module):
    """A transformer over hashed word tokens, mean-pooled over non-padding positions."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec.vocab_size, spec.width, padding_idx=0)
        self.pos = nn.Parameter(0.02 * torch.randn(1, spec.context_length, spec.width))
        self.encoder = _encoder(spec.width, spec.depth, spec.heads)
        self.norm = nn.LayerNorm(spec.width)
        self.proj = nn.Linear(spec.width, spec.embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        # An empty caption would mask every key and give NaN attention; let it attend to padding.
        pad = pad & ~pad.all(dim=1, keepdim=True)
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.proj((x * keep).sum(1) / keep.sum(1))


class TwoTower(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        image_size: int,
        temperature_init: float,
        bias_init: float | None,
        learn_temperature: bool,
        max_temperature: float,
    ) -> None:
        super().__init__()
        self.image = ImageTower(spec, image_size)
        self.text = TextTower(spec)
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(temperature_init)), requires_grad=learn_temperature
        )
        self.bias = None if bias_init is None else nn.Parameter(torch.tensor(float(bias_init)))
        self.max_log_scale = math.log(max_temperature)
        for tower, locked in ((self.image, spec.lock_image), (self.text, spec.lock_text)):
            tower.requires_grad_(not locked)

    def logit_scale(self) -> torch.Tensor:
        # CLIP §2.5 clips the learned scale at 100 so training stays stable.
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)
