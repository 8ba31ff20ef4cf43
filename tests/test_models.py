"""The towers compute what their architecture says (against naive references and the previous
nn.TransformerEncoder towers), presets build the published models, checkpointing changes nothing."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from scalestudy.spec import ModelSpec, TrialConfig
from scalestudy.train.models import (
    AttentionPool, Block, ImageTower, TextTower, TwoTower, count_params, eot_index, quick_gelu,
)
from scalestudy.train.presets import PRESETS
from tests.conftest import checkout_env

TINY = {"width": 32, "depth": 1, "heads": 2, "embed_dim": 32, "patch_size": 8, "context_length": 16}
# Every architecture a preset can express, shrunk to a few thousand parameters.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "clip": {"image_pool": "cls", "ln_pre": True, "patch_bias": False, "activation": "quick_gelu",
             "text_pool": "eot", "causal_text": True, "text_width": 16, "text_heads": 4,
             "text_depth": 2},
    "siglip": {"image_pool": "map", "image_projection": "none", "activation": "gelu",
               "norm_eps": 1e-6, "text_pool": "last", "text_projection_bias": True},
    "eot_bidirectional": {"text_pool": "eot", "depth": 2},
}


def spec_of(variant: str, **keys: Any) -> ModelSpec:
    return ModelSpec(**{**TINY, **VARIANTS[variant], **keys})


def captions(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Random ids with random lengths, padding (0) after the text, one empty caption."""
    tokens = torch.randint(1, 4096, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = 0
    return tokens * (torch.arange(length) < lengths[:, None])


# ---- naive references: loops and explicit softmax, written from the architecture's description


def naive_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, allowed: torch.Tensor
) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head; `allowed` (B, Lq, Lk) says which keys each query sees."""
    outputs = []
    for h in range(heads):
        part = slice(h * q.shape[-1] // heads, (h + 1) * q.shape[-1] // heads)
        scores = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(part.stop - part.start)
        scores = scores.masked_fill(~allowed, -math.inf)
        outputs.append(torch.exp(scores - scores.amax(-1, keepdim=True)) @ v[..., part]
                       / torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1, keepdim=True))
    return torch.cat(outputs, dim=-1)


def naive_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return x / (1 + torch.exp(-1.702 * x))


def naive_block(block: Block, x: torch.Tensor, allowed: torch.Tensor, activation: str) -> torch.Tensor:
    width = x.shape[-1]
    h = naive_layer_norm(x, block.ln_1)
    w, b = block.qkv.weight, block.qkv.bias
    q, k, v = (h @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
    x = x + naive_attention(q, k, v, block.heads, allowed) @ block.out.weight.T + block.out.bias
    h = naive_layer_norm(x, block.ln_2) @ block.fc.weight.T + block.fc.bias
    return x + naive_activation(h, activation) @ block.proj.weight.T + block.proj.bias


def naive_pool(pool: AttentionPool, x: torch.Tensor, activation: str) -> torch.Tensor:
    width = x.shape[-1]
    q = (pool.latent @ pool.q.weight.T + pool.q.bias).expand(x.shape[0], 1, width)
    kv = x @ pool.kv.weight.T + pool.kv.bias
    allowed = torch.ones(x.shape[0], 1, x.shape[1], dtype=torch.bool)
    y = naive_attention(q, kv[..., :width], kv[..., width:], pool.heads, allowed)
    y = y @ pool.proj.weight.T + pool.proj.bias
    h = naive_layer_norm(y, pool.norm) @ pool.fc.weight.T + pool.fc.bias
    return (y + naive_activation(h, activation) @ pool.fc_out.weight.T + pool.fc_out.bias)[:, 0]


def naive_image(tower: ImageTower, spec: ModelSpec, images: torch.Tensor) -> torch.Tensor:
    kernel = tower.patchify.weight.view(spec.width, 3, spec.patch_size, spec.patch_size)
    x = F.conv2d(images, kernel, tower.patchify.bias, stride=spec.patch_size)
    x = x.flatten(2).transpose(1, 2)
    if spec.image_pool == "cls":
        x = torch.cat([tower.cls.expand(len(x), 1, -1), x], dim=1)
    x = x + tower.pos
    if spec.ln_pre:
        x = naive_layer_norm(x, tower.ln_pre)
    allowed = torch.ones(len(x), x.shape[1], x.shape[1], dtype=torch.bool)
    for block in tower.encoder.blocks:
        x = naive_block(block, x, allowed, spec.activation)
    x = naive_layer_norm(x, tower.norm)
    x = x[:, 0] if spec.image_pool == "cls" else naive_pool(tower.pool, x, spec.activation)
    return x if spec.image_projection == "none" else x @ tower.proj.weight.T


def naive_text(tower: TextTower, spec: ModelSpec, tokens: torch.Tensor) -> torch.Tensor:
    batch, length = tokens.shape
    x = tower.token_embedding[tokens] + tower.pos[:, :length]
    real = tokens != 0
    allowed = torch.ones(batch, length, length, dtype=torch.bool)
    if spec.causal_text:
        allowed &= torch.ones(length, length, dtype=torch.bool).tril()
    elif spec.text_pool != "last":
        for row in range(batch):
            if real[row].any():
                allowed[row] &= real[row]
    for block in tower.encoder.blocks:
        x = naive_block(block, x, allowed, spec.activation)
    x = naive_layer_norm(x, tower.norm)
    pooled = []
    for row in range(batch):
        ids = [i for i in range(length) if tokens[row, i] != 0]
        if spec.text_pool == "mean":
            pooled.append(x[row, ids].mean(0) if ids else x[row].mean(0))
        elif spec.text_pool == "eot":
            pooled.append(x[row, ids[-1] if ids else 0])
        else:
            pooled.append(x[row, -1])
    out = torch.stack(pooled) @ tower.proj.weight.T
    return out + tower.proj.bias if spec.text_projection_bias else out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_tower_computes_what_its_architecture_describes(variant: str) -> None:
    torch.manual_seed(0)
    spec = spec_of(variant)
    image, text = ImageTower(spec, 32), TextTower(spec)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 32, 32, generator=generator)
    tokens = captions(6, 16, generator)
    with torch.no_grad():
        torch.testing.assert_close(image(images), naive_image(image, spec, images),
                                   atol=5e-6, rtol=1e-5)
        torch.testing.assert_close(text(tokens), naive_text(text, spec, tokens),
                                   atol=5e-6, rtol=1e-5)


# ---- the previous towers (nn.TransformerEncoder), which the default model must still compute


def old_encoder(width: int, depth: int, heads: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                       batch_first=True, norm_first=True, activation="gelu")
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


def load_old_blocks(new: nn.Module, old: nn.TransformerEncoder) -> None:
    for block, layer in zip(new.blocks, old.layers, strict=True):
        block.qkv.weight.copy_(layer.self_attn.in_proj_weight)
        block.qkv.bias.copy_(layer.self_attn.in_proj_bias)
        for mine, theirs in ((block.out, layer.self_attn.out_proj), (block.fc, layer.linear1),
                             (block.proj, layer.linear2), (block.ln_1, layer.norm1),
                             (block.ln_2, layer.norm2)):
            mine.load_state_dict(theirs.state_dict())


def test_default_towers_compute_what_the_previous_transformer_encoder_towers_computed() -> None:
    torch.manual_seed(0)
    spec = ModelSpec()  # the spec's defaults: width 64, depth 2, heads 4, patch 8
    image, text = ImageTower(spec, 32), TextTower(spec)
    old_image, old_text = old_encoder(64, 2, 4), old_encoder(64, 2, 4)
    generator = torch.Generator().manual_seed(2)
    images, tokens = torch.randn(4, 3, 32, 32, generator=generator), captions(5, 16, generator)
    with torch.no_grad():
        load_old_blocks(image.encoder, old_image)
        load_old_blocks(text.encoder, old_text)
        # The previous image tower: conv patches, class token, encoder, LayerNorm, projection.
        kernel = image.patchify.weight.view(64, 3, 8, 8)
        x = F.conv2d(images, kernel, image.patchify.bias, stride=8).flatten(2).transpose(1, 2)
        x = torch.cat([image.cls.expand(4, -1, -1), x], dim=1) + image.pos
        expected_image = image.proj(image.norm(old_image(x))[:, 0])
        # The previous text tower: padding masked (an empty caption attends to it), mean pooled.
        pad = tokens == 0
        pad = pad & ~pad.all(dim=1, keepdim=True)
        x = old_text(nn.Embedding.from_pretrained(text.token_embedding, padding_idx=0)(tokens)
                     + text.pos, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        expected_text = text.proj((text.norm(x) * keep).sum(1) / keep.sum(1))
        torch.testing.assert_close(image(images), expected_image, atol=5e-6, rtol=1e-5)
        torch.testing.assert_close(text(tokens), expected_text, atol=5e-6, rtol=1e-5)
    assert sum(p.numel() for p in image.parameters()) == sum(
        p.numel() for p in [image.patchify.weight, image.patchify.bias, image.cls, image.pos,
                            *old_image.parameters(), *image.norm.parameters(), image.proj.weight])


def test_quick_gelu_is_x_times_sigmoid_of_1702x() -> None:
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(quick_gelu(x), x * torch.sigmoid(1.702 * x))


# ---- what a user of the text tower notices


@settings(max_examples=25, deadline=None)
@given(words=st.lists(st.integers(1, 4095), min_size=1, max_size=7),
       extra=st.integers(1, 8), variant=st.sampled_from(["default", "clip", "eot_bidirectional"]))
def test_more_padding_after_a_caption_does_not_change_its_embedding(
    words: list[int], extra: int, variant: str
) -> None:
    torch.manual_seed(0)
    text = TextTower(spec_of(variant))
    short = torch.tensor([words + [0]])
    longer = torch.tensor([words + [0] * (1 + extra)])
    with torch.no_grad():
        torch.testing.assert_close(text(short), text(longer), atol=1e-5, rtol=1e-5)


def test_last_token_pooling_reads_the_final_position_padding_included() -> None:
    torch.manual_seed(0)
    text = TextTower(spec_of("siglip"))
    with torch.no_grad():
        assert not torch.allclose(text(torch.tensor([[5, 6, 0, 0]])), text(torch.tensor([[5, 6, 0]])))


def test_eot_index_is_the_last_non_padding_position_even_with_a_zero_id_inside() -> None:
    # CLIP's vocabulary gives id 0 to "!", so a zero may sit inside a caption.
    tokens = torch.tensor([[49406, 0, 320, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0], [0] * 6])
    assert eot_index(tokens).tolist() == [3, 1, 0]


def test_an_empty_caption_gets_a_finite_embedding() -> None:
    torch.manual_seed(0)
    for variant in VARIANTS:
        with torch.no_grad():
            assert TextTower(spec_of(variant))(torch.zeros(2, 16, dtype=torch.long)).isfinite().all()


def test_the_padding_embedding_stays_zero_only_under_mean_pooling() -> None:
    # Id 0 is a real token in CLIP's vocabulary ("!"), so eot/last pooling must learn it.
    for variant, frozen in (("default", True), ("clip", False), ("siglip", False)):
        text = TextTower(spec_of(variant))
        text(torch.tensor([[0, 7, 0, 0], [3, 0, 0, 0]])).sum().backward()
        row, grad = text.token_embedding[0], text.token_embedding.grad[0]
        assert (not row.any() and not grad.any()) if frozen else (row.any() and grad.any()), variant


# ---- presets: the published parameter counts


def preset_config(name: str, **model: Any) -> TrialConfig:
    loss = "sigmoid" if "SigLIP" in name else "softmax"
    return TrialConfig.model_validate(
        {"data": {"image_size": 224}, "model": {"preset": name, **model}, "loss": {"kind": loss}}
    )


@pytest.mark.parametrize(("name", "published"), [
    # OpenAI's CLIP release, logit scale included (the softmax loss has no bias).
    ("ViT-B-32", 151_277_313),
    ("ViT-B-16", 149_620_737),
    ("ViT-L-14", 427_616_513),
    # Derived from open_clip's ViT-B-16-SigLIP.json: timm's vit_base_patch16_siglip_224 without a
    # head (92,884,224: patch conv 590,592 + 196 positions 150,528 + 12 blocks of 7,087,872 +
    # LayerNorm 1,536 + MAP head 7,087,104) + the text tower (110,271,744: 32,000 × 768 ids +
    # 64 × 768 positions + 12 blocks + ln_final 1,536 + biased projection 590,592) + t and b.
    ("ViT-B-16-SigLIP", 203_155_970),
])
def test_a_preset_builds_the_published_number_of_parameters(name: str, published: int) -> None:
    config = preset_config(name)
    assert count_params(config) == published
    with torch.device("meta"):
        model = TwoTower(config.model, 224, 10.0, -10.0 if "SigLIP" in name else None, True, 100.0)
    assert sum(p.numel() for p in model.parameters()) == published
    assert all(p.is_meta for p in model.parameters())


def test_count_params_matches_a_real_model_of_the_default_config() -> None:
    config = TrialConfig()
    model = TwoTower(config.model, 32, 10.0, -10.0, True, 100.0)
    assert count_params(config) == sum(p.numel() for p in model.parameters()) == 485_058


def test_a_shrunk_preset_trains_a_step_on_cpu() -> None:
    config = preset_config("ViT-B-16-SigLIP", depth=1, text_depth=1, width=64, heads=4,
                           text_width=64, text_heads=4, embed_dim=64, vocab_size=512)
    model = TwoTower(config.model, 224, 10.0, -10.0, True, 100.0)
    images_, texts_ = model(torch.randn(2, 3, 224, 224), torch.randint(1, 512, (2, 64)))
    (images_ * texts_).sum().backward()
    assert images_.shape == texts_.shape == (2, 64)
    assert all(p.grad is not None for tower in (model.image, model.text) for p in tower.parameters())


# ---- the spec side of presets


def test_a_preset_fills_the_keys_the_study_did_not_set() -> None:
    spec = ModelSpec(preset="ViT-B-32", depth=2)
    assert (spec.width, spec.depth, spec.heads, spec.text_tower) == (768, 2, 12, (512, 12, 8))
    assert (spec.activation, spec.text_pool, spec.causal_text, spec.context_length,
            spec.vocab_size) == ("quick_gelu", "eot", True, 77, 49408)


def test_a_resolved_preset_reloads_unchanged() -> None:
    spec = ModelSpec(preset="ViT-L-14", text_depth=3)
    assert ModelSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_overrides_let_a_sweep_switch_presets_and_keep_the_studys_own_keys() -> None:
    resolved = ModelSpec(preset="ViT-B-32", depth=2, grad_checkpointing=True)
    assert resolved.overrides() == {"preset": "ViT-B-32", "depth": 2, "grad_checkpointing": True}
    switched = ModelSpec(**{**resolved.overrides(), "preset": "ViT-L-14"})
    assert (switched.width, switched.depth, switched.patch_size) == (1024, 2, 14)
    assert ModelSpec(width=32).overrides() == {"preset": None, "width": 32}


def test_every_preset_names_every_architecture_key_it_relies_on() -> None:
    # A preset must not lean on a default that may change; only these keys are left to the study.
    left_to_the_study = {"preset", "tokenizer", "tokenizer_file", "grad_checkpointing",
                         "lock_image", "lock_text", "image_init"}
    for name, keys in PRESETS.items():
        assert set(keys) == set(ModelSpec.model_fields) - left_to_the_study, name


def test_new_keys_default_to_todays_architecture() -> None:
    spec = ModelSpec()
    assert (spec.preset, spec.text_tower, spec.activation, spec.norm_eps, spec.image_pool,
            spec.ln_pre, spec.patch_bias, spec.image_projection, spec.text_pool, spec.causal_text,
            spec.text_projection_bias, spec.tokenizer, spec.grad_checkpointing) == (
        None, (64, 2, 4), "gelu", 1e-5, "cls", False, True, "linear", "mean", False, False,
        "hash", False)


@pytest.mark.parametrize(("keys", "message"), [
    ({"preset": "ViT-H-14"}, "model.preset='ViT-H-14' is not a known architecture"),
    ({"text_width": 48, "text_heads": 5}, "model.text_heads=5 must divide the text tower's width"),
    ({"width": 48, "heads": 5}, "model.heads=5 must divide the image tower's width"),
    ({"image_projection": "none", "embed_dim": 32}, "model.embed_dim=32 must equal model.width=64"),
    ({"tokenizer": "file"}, "set model.tokenizer_file"),
    ({"tokenizer_file": "tok.json"}, "remove it or set model.tokenizer=file"),
    ({"tokenizer": "bpe", "vocab_size": 200}, "model.vocab_size=200 is too small"),
    ({"vocab_size": 1}, "model.vocab_size=1 is too small for model.tokenizer=hash"),
])
def test_bad_model_keys_are_named_with_a_fix(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        ModelSpec(**keys)


def test_a_preset_whose_patch_does_not_tile_the_image_says_what_resolution_it_was_published_at() -> None:
    with pytest.raises(ValidationError, match="model.preset=ViT-L-14 sets it.*224"):
        TrialConfig.model_validate({"model": {"preset": "ViT-L-14"}})
    # A patch size the study sets itself makes a preset fit small images.
    assert TrialConfig.model_validate(
        {"model": {"preset": "ViT-L-14", "patch_size": 8}}
    ).model.patch_size == 8


# ---- activation checkpointing


def saved_bytes(model: TwoTower, images: torch.Tensor, tokens: torch.Tensor) -> int:
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        image_features, text_features = model(images, tokens)
    return total


@pytest.mark.parametrize("variant", ["default", "clip", "siglip"])
def test_checkpointed_blocks_give_the_same_gradients_and_save_less(variant: str) -> None:
    generator = torch.Generator().manual_seed(3)
    images, tokens = torch.randn(6, 3, 32, 32, generator=generator), captions(6, 16, generator)
    grads, saved = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        spec = spec_of(variant, depth=3, grad_checkpointing=checkpointing)
        model = TwoTower(spec, 32, 10.0, -10.0, True, 100.0)
        image_features, text_features = model(images, tokens)
        logits = model.logit_scale() * image_features @ text_features.T + model.bias
        F.logsigmoid((2 * torch.eye(6) - 1) * logits).sum().neg().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
        saved.append(saved_bytes(model, images, tokens))
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        # Measured: bitwise equal on CPU (the recomputed forward repeats the same kernels).
        assert torch.equal(plain[name], checkpointed[name]), name
    assert saved[1] < saved[0] / 2


def test_count_params_draws_no_random_numbers_on_the_meta_device() -> None:
    # torch's meta normal_/randn are Python references that import its compiler and sympy on first
    # use (seconds); counting must stay as quick as building the modules.
    script = (
        "import sys; from scalestudy.spec import TrialConfig; "
        "from scalestudy.train.models import count_params; "
        "config = TrialConfig.model_validate({'data': {'image_size': 224}, "
        "'model': {'preset': 'ViT-B-16-SigLIP'}, 'loss': {'kind': 'sigmoid'}}); "
        "print(count_params(config), 'torch._dynamo' in sys.modules, 'sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=checkout_env())
    assert out.stdout.split() == ["203155970", "False", "False"]


# --- presets and tokenizers in studies -------------------------------------------------------


def test_a_sweep_over_presets_builds_each_presets_own_architecture() -> None:
    from scalestudy.expand import expand
    from scalestudy.load import validate_study

    study = validate_study({"name": "p", "base": {"model": {"depth": 1}, "data": {"image_size": 224}},
                            "sweep": {"grid": {"model.preset": ["ViT-B-32", "ViT-B-16-SigLIP"]}}}, "p")
    clip, siglip = (t.config.model for t in expand(study))
    assert (clip.width, clip.patch_size, clip.image_pool, clip.depth) == (768, 32, "cls", 1)
    assert (siglip.patch_size, siglip.image_pool, siglip.vocab_size, siglip.depth) == (16, "map", 32000, 1)


def test_plan_shows_each_trials_parameter_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from scalestudy.cli import main

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nbase: {model: {preset: ViT-B-32}, data: {image_size: 224}, "
                    "loss: {kind: softmax}}\n")
    assert main(["plan", str(path), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["trials"]
    assert row["derived.params"] == 151_277_313


def test_a_tokenizer_file_that_does_not_fit_the_model_stops_validate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scalestudy.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {{model: {{tokenizer: file, tokenizer_file: {tmp_path}/absent.json}}}}\n")
    assert main(["validate", str(path)]) == 2
    assert "base.model.tokenizer_file" in capsys.readouterr().err


@pytest.mark.train
def test_a_shrunk_clip_preset_with_a_bpe_tokenizer_trains_to_done(tmp_path: Path) -> None:
    import polars as pl

    from scalestudy.cli import main
    from scalestudy.store import RunStore

    path = tmp_path / "s.yaml"
    path.write_text(
        "name: preset\n"
        "base:\n"
        "  model: {preset: ViT-B-32, width: 32, heads: 2, depth: 1, text_width: 32, text_heads: 2,\n"
        "          embed_dim: 32, patch_size: 8, context_length: 24, tokenizer: bpe, vocab_size: 400}\n"
        "  data: {image_size: 32, eval_images: 64}\n"
        "  train: {batch_size: 32, examples_seen: 1024, eval_every: 16}\n"
        "sweep: {grid: {loss.kind: [softmax, sigmoid]}}\n")
    out = tmp_path / "runs"
    assert main(["run", str(path), "--out", str(out)]) == 0
    store = RunStore(out / "preset")
    results = pl.read_parquet(store.results_path)
    assert results["status"].to_list() == ["done", "done"]
    assert results["zeroshot_top1"].null_count() == 0 and results["model.activation"].to_list() == ["quick_gelu"] * 2
    [vocabulary] = list((out / "preset" / "tokenizers").glob("bpe-*.json"))  # one for both trials
    for tid in results["trial_id"]:
        steps = store.trial(tid).metrics()
        assert steps["grad_norm_image"].null_count() == 0 and steps["grad_norm_text"].null_count() == 0
