"""Published CLIP and SigLIP architectures as `model.*` keys (torch-free: the spec reads it).

A study names one with `model.preset`; the spec fills every key below that the study did not set,
so `--set model.depth=2` shrinks a preset and the resolved config records the values trained.

Sources:
- ViT-B-32, ViT-B-16, ViT-L-14: the OpenAI CLIP release (Radford et al. 2021, Table 20, and
  openai/CLIP clip/model.py): conv patch embedding without bias, class token, ln_pre, QuickGELU
  MLPs, class-token pooling, projections without bias; a causal text transformer pooled at the
  end-of-text token, context 77, vocabulary 49,408. Image heads are width / 64 (clip/model.py).
- ViT-B-16-SigLIP: open_clip's model_configs/ViT-B-16-SigLIP.json (Zhai et al. 2023): the image
  tower is timm's vit_base_patch16_siglip_224 (no class token, conv patch embedding with bias,
  MAP attention-pooling head, exact GELU, LayerNorm eps 1e-6, no projection: timm_proj none with
  embed_dim = width), the text tower open_clip's TextTransformer with no_causal_mask, pool_type
  last, proj_bias and eps 1e-6, context 64, vocabulary 32,000.
"""

from __future__ import annotations

from typing import Any

_OPENAI: dict[str, Any] = {
    "image_tower": "vit",
    "depth": 12,
    "image_pool": "cls",
    "ln_pre": True,
    "patch_bias": False,
    "image_projection": "linear",
    "activation": "quick_gelu",
    "norm_eps": 1e-5,
    "text_depth": 12,
    "text_pool": "eot",
    "causal_text": True,
    "text_projection_bias": False,
    "context_length": 77,
    "vocab_size": 49408,
}

PRESETS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {
        **_OPENAI, "patch_size": 32, "width": 768, "heads": 12, "embed_dim": 512,
        "text_width": 512, "text_heads": 8,
    },
    "ViT-B-16": {
        **_OPENAI, "patch_size": 16, "width": 768, "heads": 12, "embed_dim": 512,
        "text_width": 512, "text_heads": 8,
    },
    "ViT-L-14": {
        **_OPENAI, "patch_size": 14, "width": 1024, "depth": 24, "heads": 16, "embed_dim": 768,
        "text_width": 768, "text_heads": 12,
    },
    "ViT-B-16-SigLIP": {
        "image_tower": "vit",
        "patch_size": 16,
        "width": 768,
        "depth": 12,
        "heads": 12,
        "embed_dim": 768,
        "image_pool": "map",
        "ln_pre": False,
        "patch_bias": True,
        "image_projection": "none",
        "activation": "gelu",
        "norm_eps": 1e-6,
        "text_width": 768,
        "text_depth": 12,
        "text_heads": 12,
        "text_pool": "last",
        "causal_text": False,
        "text_projection_bias": True,
        "context_length": 64,
        "vocab_size": 32000,
    },
}

# The resolution each preset was published at (all four configs say image_size 224).
PRESET_IMAGE_SIZE: dict[str, int] = {name: 224 for name in PRESETS}
