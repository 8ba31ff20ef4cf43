"""The two towers: a ViT for images, a transformer for text, each projected to a shared
L2-normalised embedding; plus the loss's learnable logit scale t (as log t) and bias b.

Both towers are stacks of one pre-norm residual attention block written on
`scaled_dot_product_attention`, with as few tensor ops as the architecture allows: the canonical
studies train a one-layer, width-32 model on CPU, where every op's dispatch and autograd overhead
costs more than its arithmetic. The same code builds the published CLIP and SigLIP architectures
(`model.preset`, scalestudy/train/presets.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scalestudy.spec import ModelSpec, TrialConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(1.702x): the GELU approximation OpenAI's CLIP release trained with (clip/model.py)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu, "quick_gelu": quick_gelu,
}


def normal(*shape: int, std: float) -> nn.Parameter:
    """A parameter drawn from N(0, std²); on the meta device (count_params) nothing is drawn, as
    torch's meta normal_ is a Python reference whose first call imports its compiler (~2.5 s)."""
    weight = torch.empty(*shape)
    if not weight.is_meta:
        weight.normal_(0.0, std)
    return nn.Parameter(weight)


def eot_index(tokens: torch.Tensor) -> torch.Tensor:
    """Position of each row's last non-padding token (0 for an empty row): the end-of-text token
    of tokenizers that append one, which is where CLIP pools its text (its argmax over ids)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return (positions * (tokens != 0)).argmax(dim=1)


class Block(nn.Module):
    """Pre-norm residual attention block: x + attn(ln_1 x), then x + mlp(ln_2 x), MLP 4× wide.

    The parameters mirror nn.TransformerEncoderLayer(norm_first=True) and CLIP's
    ResidualAttentionBlock (one fused q|k|v projection with bias, biased output projection and
    MLP); the init is PyTorch's (xavier-uniform q|k|v, zero attention biases).
    """

    def __init__(self, width: int, heads: int, activation: str, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)
        self.act = ACTIVATIONS[activation]
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        # F.* on the parameters rather than calling the submodules: a module call costs about as
        # much CPU as the tiny model's op itself.
        batch, length, width = x.shape
        h = F.layer_norm(x, (width,), self.ln_1.weight, self.ln_1.bias, self.ln_1.eps)
        q, k, v = (
            F.linear(h, self.qkv.weight, self.qkv.bias)
            .view(batch, length, 3, self.heads, width // self.heads)
            .permute(2, 0, 3, 1, 4)
        )
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        x = x + F.linear(h.transpose(1, 2).reshape(batch, length, width), self.out.weight, self.out.bias)
        h = F.layer_norm(x, (width,), self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        h = self.act(F.linear(h, self.fc.weight, self.fc.bias))
        return x + F.linear(h, self.proj.weight, self.proj.bias)


class Encoder(nn.Module):
    """`depth` blocks; with checkpointing each block's activations are recomputed in backward."""

    def __init__(
        self, width: int, depth: int, heads: int, activation: str, eps: float, checkpointing: bool
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, activation, eps) for _ in range(depth))
        self.checkpointing = checkpointing

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
    ) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, causal, use_reentrant=False)
            else:
                x = block(x, mask, causal)
        return x


class AttentionPool(nn.Module):
    """Multi-head attention pooling with one learned query (MAP; SigLIP's image head, timm's
    AttentionPoolLatent): attend from the latent to all tokens, project, then a residual MLP."""

    def __init__(self, width: int, heads: int, activation: str, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.latent = normal(1, 1, width, std=width**-0.5)  # timm: std width^-½
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_out = nn.Linear(4 * width, width)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head = width // self.heads
        q = self.q(self.latent).view(1, 1, self.heads, head).transpose(1, 2).expand(batch, -1, -1, -1)
        k, v = self.kv(x).view(batch, length, 2, self.heads, head).permute(2, 0, 3, 1, 4)
        pooled = self.proj(F.scaled_dot_product_attention(q, k, v).reshape(batch, width))
        return pooled + self.fc_out(self.act(self.fc(self.norm(pooled))))


# The model.* keys that decide what the image tower computes (data.image_size too, through the
# position embedding): a loaded tower (model.image_init) must agree on them, and a cache of its
# features (scalestudy.train.lit) is keyed by them. Activation checkpointing changes no value.
IMAGE_TOWER_KEYS = ("image_tower", "patch_size", "width", "depth", "heads", "embed_dim", "activation",
                    "norm_eps", "image_pool", "ln_pre", "patch_bias", "image_projection")


class ImageTower(nn.Module):
    """ViT (Dosovitskiy et al. 2021): patches → [class token] → transformer → pool → projection.

    The patch embedding is a stride-p convolution, computed as one matmul over the unfolded
    patches (flattened channel-major like a conv weight, so `patchify.weight.view(w, 3, p, p)` is
    that conv's kernel); on CPU this is cheaper than the conv and its backward.
    """

    def __init__(self, spec: ModelSpec, image_size: int) -> None:
        super().__init__()
        width, patch = spec.width, spec.patch_size
        self.patch = patch
        self.grid = image_size // patch
        tokens = self.grid**2 + (spec.image_pool == "cls")
        self.patchify = nn.Linear(3 * patch * patch, width, bias=spec.patch_bias)
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if spec.image_pool == "cls" else None
        self.pos = normal(1, tokens, width, std=0.02)
        self.ln_pre = nn.LayerNorm(width, eps=spec.norm_eps) if spec.ln_pre else None
        self.encoder = Encoder(width, spec.depth, spec.heads, spec.activation, spec.norm_eps,
                               spec.grad_checkpointing)
        self.norm = nn.LayerNorm(width, eps=spec.norm_eps)
        self.pool = (
            AttentionPool(width, spec.heads, spec.activation, spec.norm_eps)
            if spec.image_pool == "map" else None
        )
        self.proj = (
            nn.Linear(width, spec.embed_dim, bias=False) if spec.image_projection == "linear" else None
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, grid, p = images.shape[0], self.grid, self.patch
        patches = (
            images.reshape(batch, 3, grid, p, grid, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, grid * grid, 3 * p * p)
        )
        x = self.patchify(patches)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(batch, -1, -1), x], dim=1)
        x = x + self.pos
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.encoder(x)
        # LayerNorm acts per token, so normalising only the class token equals CLIP's ln_post.
        x = self.norm(x[:, 0]) if self.pool is None else self.pool(self.norm(x))
        return x if self.proj is None else self.proj(x)


class TextTower(nn.Module):
    """A transformer over token ids (0 is padding), pooled by `model.text_pool`.

    Padding keys are masked out of attention unless the attention is causal (padding comes after
    every real token, so no real token sees it) or the pooling reads the last position, which is
    padding for short captions and attends to all of it (SigLIP, open_clip's default without a
    pad mask). The padding embedding is held at zero only under mean pooling, where id 0 never
    carries text; CLIP's and SigLIP's vocabularies give id 0 to a real token.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        width, depth, heads = spec.text_tower
        self.pooling = spec.text_pool
        self.causal = spec.causal_text
        self.masks_padding = not spec.causal_text and spec.text_pool != "last"
        self.padding_idx = 0 if spec.text_pool == "mean" else None
        self.token_embedding = normal(spec.vocab_size, width, std=1.0)  # nn.Embedding's init
        if self.padding_idx is not None:
            with torch.no_grad():
                self.token_embedding[self.padding_idx] = 0.0
        self.pos = normal(1, spec.context_length, width, std=0.02)
        self.encoder = Encoder(width, depth, heads, spec.activation, spec.norm_eps,
                               spec.grad_checkpointing)
        self.norm = nn.LayerNorm(width, eps=spec.norm_eps)
        self.proj = nn.Linear(width, spec.embed_dim, bias=spec.text_projection_bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.pos if tokens.shape[1] == self.pos.shape[1] else self.pos[:, : tokens.shape[1]]
        x = F.embedding(tokens, self.token_embedding, self.padding_idx) + pos
        mask = None
        if self.masks_padding or self.pooling == "mean":
            keep = tokens != 0
            # An empty caption would mask every key (NaN attention); let it attend to padding.
            keep = keep | ~keep.any(dim=1, keepdim=True)
            mask = keep[:, None, None, :] if self.masks_padding else None
        x = self.encoder(x, mask, self.causal)
        if self.pooling == "mean":
            weights = keep.to(x.dtype)
            weights = weights / weights.sum(dim=1, keepdim=True)
            x = torch.bmm(weights.unsqueeze(1), self.norm(x)).squeeze(1)
        elif self.pooling == "eot":
            x = self.norm(x[torch.arange(x.shape[0], device=x.device), eot_index(tokens)])
        else:
            x = self.norm(x[:, -1])
        return self.proj(x)


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

    # Features leave the towers as float32 (a no-op in float32): under bf16/fp16 autocast the
    # normalisation and everything after it, the loss above all, computes in float32.
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens).float(), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)


def image_tower_shapes(spec: ModelSpec, image_size: int) -> dict[str, torch.Size]:
    """The image tower's tensors (state-dict keys without `image.`) and their shapes, from a tower
    built on the meta device: no memory, no init arithmetic."""
    with torch.device("meta"):
        tower = ImageTower(spec, image_size)
    return {key: value.shape for key, value in tower.state_dict().items()}


def count_params(config: TrialConfig) -> int:
    """Parameters of the trial's model (frozen ones and t, b included), built on the meta device:
    no memory and no init arithmetic, so `plan` can show it for a ViT-L in well under a second."""
    has_bias = config.loss.kind == "sigmoid" and config.loss.use_bias
    with torch.device("meta"):
        model = TwoTower(config.model, config.data.image_size, 1.0, 0.0 if has_bias else None,
                         True, config.loss.max_temperature)
    return sum(p.numel() for p in model.parameters())
