"""The study file's schema: one Pydantic tree, `extra="forbid"` everywhere, a description on every field.

A `StudySpec` holds a `base` TrialConfig, a `sweep` over dotted keys of it, and executor settings.
Expansion (`scalestudy.expand`) turns it into fully resolved trials; nothing here derives values.
Validation here checks values only and never touches the file system or a cluster: whether data
files exist is `scalestudy.preflight`'s question, and Slurm profiles are read by
`scalestudy.load`, both only for `validate`, `plan` and `run`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from scalestudy.allocator import Allocator
from scalestudy.datafiles import absolute
from scalestudy.train.presets import PRESET_IMAGE_SIZE, PRESETS
from scalestudy.train.shapes_vocab import CLASSES, COLOURS, MAX_HOLDOUT_PAIRS, SHAPES


class Spec(BaseModel):
    """Base of every spec model: unknown keys are errors, so a typo never silently runs a default."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


PositiveInt = Annotated[int, Field(gt=0)]


class DataSpec(Spec):
    kind: Literal["shapes", "webdataset", "csv"] = Field(
        "shapes",
        description="shapes: the built-in procedural set (deterministic from the seed): one coloured "
        "shape of some size, fill and position plus three printed digits per image, 2.16 million "
        "equally likely captions, so a caption rarely repeats within a batch; webdataset: tar shards "
        "of {key}.jpg|png + {key}.txt; csv: a file of image paths and captions.",
    )
    shards: list[str] | None = Field(
        None,
        description="data.kind=webdataset: uncompressed .tar shards of {key}.jpg|png + {key}.txt "
        "(img2dataset's output), as paths or brace patterns like data/shard-{000..009}.tar; every "
        "file must exist. Recorded as absolute paths.",
    )
    csv: str | None = Field(
        None,
        description="data.kind=csv: a CSV file whose header names `image` (a path, relative ones "
        "resolved against the CSV's folder) and `caption` columns. Recorded as an absolute path.",
    )
    eval_shards: list[str] | None = Field(
        None,
        description="Held-out WebDataset shards for retrieval evaluation (real data). Without "
        "data.eval_shards or data.eval_csv the last data.eval_images training samples are held out.",
    )
    eval_csv: str | None = Field(
        None, description="Held-out CSV (same format as data.csv) for retrieval evaluation (real data)."
    )
    image_size: PositiveInt = Field(
        32, description="Square image side in pixels (real images: centre crop, then resize)."
    )
    eval_images: PositiveInt = Field(
        512,
        description="Held-out images for evaluation: the retrieval set's size, and the most "
        "zero-shot images taken from data.zeroshot_dir (evenly across its classes); the linear "
        "probe fits on the first half of the zero-shot images and scores the second.",
    )
    holdout_pairs: int = Field(
        0,
        ge=0,
        le=MAX_HOLDOUT_PAIRS,
        description="Shapes: this many colour–shape pairs never appear in training (a compositional "
        "split; chosen on a diagonal so every colour and shape is still seen).",
    )
    holdout_classes: list[str] | None = Field(
        None,
        description="Shapes: the colour–shape pairs held out of training, named like 'red circle' "
        "(instead of data.holdout_pairs).",
    )
    eval_pairs: Literal["all", "seen", "unseen"] = Field(
        "all",
        description="Shapes: which colour–shape pairs the held-out images show: all, only those "
        "trained on, or only the held-out ones (zero-shot on unseen combinations; all 40 classes "
        "stay candidates).",
    )
    caption_noise: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Fraction of every training batch whose caption is replaced by another pair's "
        "(the label-noise robustness study of SigLIP, Zhai et al. 2023); which rows, from "
        "train.seed and the step. Evaluation data stays clean.",
    )
    train_pool: PositiveInt | None = Field(
        None,
        description="Shapes: train on a finite pool of this many scenes, drawn once from "
        "train.seed, instead of the endless stream (None, where every step renders new images). "
        "Batch s takes stream positions p = (s−1)·B + i, pool item perm_e[p mod N] of epoch "
        "e = p // N, each epoch its own seeded permutation of the pool (as real data, which is "
        "always a finite pool: its training samples). With model.lock_image the pool's image "
        "features are computed once and cached in the run directory (RUN_DIR/cache/"
        "image_features), so a step costs only the text tower and the loss (LiT, Zhai et al. "
        "2022; SigLiT, SigLIP §4.1).",
    )
    zeroshot_dir: str | None = Field(
        None,
        description="Zero-shot evaluation on a folder with one subfolder of images per class; "
        "class names are the subfolder names with '_' as ' ' (or data.zeroshot_classes). Default: "
        "the built-in classes for shapes, no zero-shot for real data.",
    )
    zeroshot_classes: list[str] | None = Field(
        None,
        description="Class names for data.zeroshot_dir's subfolders in sorted order, one each "
        "(e.g. ImageNet's names for its wnid folders).",
    )
    zeroshot_templates: list[str] | None = Field(
        None,
        description="Zero-shot prompt templates, each with one '{}' for the class name; the "
        "class embedding averages them (CLIP §3.1.4). Default: for shapes, 16 training-like "
        "captions per class with the class's colour and shape fixed (so prompts read like what "
        "the model trained on); CLIP's 7 ImageNet templates for an image folder.",
    )
    workers: int = Field(
        0,
        ge=0,
        description="Processes that build training batches, per rank (a PyTorch DataLoader over "
        "steps; pinned memory when the trial trains on a GPU), each with one torch thread; real "
        "data also indexes its shards in this many processes. 0: batches are built in the trial's "
        "own process (real data one step ahead in a background thread). The batches are the same "
        "either way; count these processes in resources.cpus.",
    )
    worker_timeout_s: float = Field(
        600.0,
        gt=0,
        description="With data.workers > 0: the trial stops with an error when no batch arrives "
        "from its workers for this long (a worker stuck on a stalled read). One worker builds a "
        "rank's whole batch, so raise it for very large batches of large images on slow storage.",
    )

    @field_validator("shards", "eval_shards", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("shards", "eval_shards")
    @classmethod
    def _shards_absolute(cls, patterns: list[str] | None) -> list[str] | None:
        # Whether the files exist is the preflight's question (scalestudy.preflight): the schema
        # never touches the file system, so a run directory copied without its data still reads.
        if patterns is None:
            return None
        if not patterns:
            raise ValueError("the list of shards is empty; give at least one path or brace pattern")
        return [absolute(pattern) for pattern in patterns]

    @field_validator("csv", "eval_csv", "zeroshot_dir")
    @classmethod
    def _path_absolute(cls, path: str | None) -> str | None:
        return None if path is None else absolute(path)

    @field_validator("zeroshot_templates")
    @classmethod
    def _templates_have_one_slot(cls, templates: list[str] | None) -> list[str] | None:
        if templates is not None and not templates:
            raise ValueError("the list of templates is empty; give at least one, e.g. 'a photo of a {}.'")
        for template in templates or []:
            if template.count("{}") != 1:
                raise ValueError(f"template {template!r} needs exactly one '{{}}' for the class name")
        return templates

    @model_validator(mode="after")
    def _sources_match_kind(self) -> DataSpec:
        sources = {"shards": self.shards, "csv": self.csv}
        needed = {"webdataset": "shards", "csv": "csv"}.get(self.kind)
        if needed is not None and sources[needed] is None:
            what = {"shards": "tar shard paths or patterns", "csv": "a CSV file with image,caption columns"}
            raise ValueError(
                f"data.kind={self.kind} needs data.{needed} ({what[needed]}); or use data.kind=shapes "
                "(the built-in procedural dataset)"
            )
        for key, value in sources.items():
            if value is not None and key != needed:
                raise ValueError(f"data.{key} is set but data.kind={self.kind} does not read it; remove it")
        if self.eval_shards is not None and self.eval_csv is not None:
            raise ValueError("data.eval_shards and data.eval_csv are both set; keep one held-out set")
        if self.kind == "shapes":
            for key in ("eval_shards", "eval_csv"):
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"data.{key} is set but data.kind=shapes renders its own held-out set; remove it"
                    )
        return self

    @model_validator(mode="after")
    def _holdout_is_shapes_only(self) -> DataSpec:
        held_out = self.holdout_pairs > 0 or self.holdout_classes is not None
        if held_out and self.kind != "shapes":
            raise ValueError(
                f"data.holdout_pairs/holdout_classes split the built-in shapes classes; data.kind="
                f"{self.kind} has none, remove them"
            )
        if self.holdout_pairs > 0 and self.holdout_classes is not None:
            raise ValueError("data.holdout_pairs and data.holdout_classes are both set; keep one")
        if self.eval_pairs != "all" and not held_out:
            raise ValueError(
                f"data.eval_pairs={self.eval_pairs} needs a held-out split: set data.holdout_pairs "
                "or data.holdout_classes"
            )
        if self.holdout_classes is not None:
            unknown = [name for name in self.holdout_classes if name not in CLASSES]
            if unknown:
                raise ValueError(
                    f"data.holdout_classes: {unknown} are not shapes classes; name them "
                    f"'<colour> <shape>' with a colour from {list(COLOURS)} and a shape from "
                    f"{list(SHAPES)}"
                )
            if not self.holdout_classes or len(set(self.holdout_classes)) > MAX_HOLDOUT_PAIRS:
                raise ValueError(
                    f"data.holdout_classes must name 1 to {MAX_HOLDOUT_PAIRS} distinct classes, "
                    f"got {len(set(self.holdout_classes))}"
                )
        return self

    @model_validator(mode="after")
    def _pool_is_shapes_only(self) -> DataSpec:
        if self.train_pool is not None and self.kind != "shapes":
            raise ValueError(
                f"data.train_pool={self.train_pool} sets the size of a pool of rendered shapes; "
                f"data.kind={self.kind} is already a finite pool (its training samples), remove it"
            )
        return self

    @model_validator(mode="after")
    def _class_names_need_a_folder(self) -> DataSpec:
        if self.zeroshot_classes is not None and self.zeroshot_dir is None:
            raise ValueError("data.zeroshot_classes names the classes of data.zeroshot_dir; set it too")
        return self


class ModelSpec(Spec):
    preset: str | None = Field(
        None,
        description="A published architecture: ViT-B-32, ViT-B-16 or ViT-L-14 (OpenAI CLIP, Radford "
        "et al. 2021, Table 20) or ViT-B-16-SigLIP (open_clip's config of Zhai et al. 2023). It "
        "fills every model.* key the study does not set (see scalestudy/train/presets.py), so "
        "model.depth=2 shrinks it; the resolved config records the values used.",
    )
    image_tower: Literal["vit"] = Field("vit", description="Image encoder architecture.")
    patch_size: PositiveInt = Field(8, description="ViT patch side in pixels; must divide data.image_size.")
    width: PositiveInt = Field(
        64, description="Transformer width of the image tower, and of the text tower unless "
        "model.text_width is set."
    )
    depth: PositiveInt = Field(
        2, description="Transformer layers of the image tower, and of the text tower unless "
        "model.text_depth is set."
    )
    heads: PositiveInt = Field(
        4, description="Attention heads of the image tower (and of the text tower unless "
        "model.text_heads is set); must divide model.width."
    )
    embed_dim: PositiveInt = Field(64, description="Dimension of the shared embedding space.")
    text_width: PositiveInt | None = Field(
        None, description="Width of the text tower; default model.width (CLIP's ViT-B/32 text is "
        "512 wide against its image tower's 768)."
    )
    text_depth: PositiveInt | None = Field(None, description="Layers of the text tower; default model.depth.")
    text_heads: PositiveInt | None = Field(
        None, description="Attention heads of the text tower; default model.heads. Must divide its width."
    )
    activation: Literal["gelu", "quick_gelu"] = Field(
        "gelu",
        description="MLP activation of both towers: gelu (exact, erf) or quick_gelu, "
        "x·sigmoid(1.702x), the approximation OpenAI's CLIP release trained with (its clip/model.py).",
    )
    norm_eps: float = Field(
        1e-5, gt=0, description="LayerNorm epsilon of both towers (PyTorch's 1e-5; SigLIP uses 1e-6)."
    )
    image_pool: Literal["cls", "map"] = Field(
        "cls",
        description="cls: a class token, read after the last block (ViT, CLIP); map: no class "
        "token, multihead attention pooling with one learned query (Lee et al. 2019's PMA; "
        "SigLIP's ViTs, timm's AttentionPoolLatent).",
    )
    ln_pre: bool = Field(
        False,
        description="LayerNorm on the patch and position embeddings before the first block "
        "(ln_pre: CLIP §2.4's one change to the ViT).",
    )
    patch_bias: bool = Field(
        True, description="Bias in the patch embedding (CLIP's conv has none; timm's ViT has one)."
    )
    image_projection: Literal["linear", "none"] = Field(
        "linear",
        description="linear: project the pooled image feature to model.embed_dim (no bias); none: "
        "use it as is (SigLIP), which needs model.embed_dim = model.width.",
    )
    text_pool: Literal["mean", "eot", "last"] = Field(
        "mean",
        description="How a caption becomes one vector: mean over its non-padding tokens (id 0 is "
        "padding); eot: the last non-padding token, the end-of-text token of tokenizers that append "
        "one (CLIP §2.4 reads the [EOS] activation); last: the final position, padding included "
        "(SigLIP, as open_clip configures it).",
    )
    causal_text: bool = Field(
        False,
        description="Causal (masked) self-attention in the text tower, as CLIP §2.4; false is "
        "bidirectional.",
    )
    text_projection_bias: bool = Field(
        False, description="Bias in the text projection (SigLIP's open_clip config has one; CLIP not)."
    )
    vocab_size: PositiveInt = Field(
        4096,
        description="Token ids of the text tower: the buckets of the hash tokenizer, the tokens the "
        "bpe tokenizer learns, or the vocabulary of model.tokenizer_file (must match it).",
    )
    context_length: PositiveInt = Field(
        16, description="Caption tokens kept, special tokens included (longer captions are cut, "
        "keeping the end-of-text token)."
    )
    tokenizer: Literal["hash", "bpe", "file"] = Field(
        "hash",
        description="hash: lower-cased words hashed into model.vocab_size − 1 ids (no vocabulary); "
        "bpe: a byte-level BPE of model.vocab_size tokens trained once on a sample of the training "
        "captions and kept in the run directory; file: the tokenizer.json in model.tokenizer_file.",
    )
    tokenizer_file: str | None = Field(
        None,
        description="model.tokenizer=file: a tokenizer.json in Hugging Face tokenizers format (e.g. "
        "CLIP's or SigLIP's). Recorded as an absolute path.",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Recompute each transformer block's activations in the backward pass instead "
        "of storing them (less memory, about one more forward of compute; same gradients).",
    )
    lock_image: bool = Field(
        False,
        description="Freeze the image tower (LiT-style locked tuning). On a finite training pool "
        "(data.train_pool, or real data) its features are computed once per pool and tower and "
        "cached in RUN_DIR/cache/image_features, so a step runs only the text tower and the loss.",
    )
    image_init: str | None = Field(
        None,
        description="Start the image tower from a finished trial: its directory "
        "(RUN_DIR/trials/<id>, whose checkpoint.pt holds the final model), a run directory that "
        "holds exactly one trial, or a checkpoint file. "
        "Only the tensors image.* are loaded; the text tower, t and b start fresh. With "
        "model.lock_image this is locked-image tuning: LiT (Zhai et al. 2022), and with the "
        "sigmoid loss SigLiT, the setting of SigLIP §4.1 and Fig. 2. The tower must have this "
        "trial's shapes (model.* and data.image_size), which validate/plan/run check. Recorded "
        "as an absolute path.",
    )
    lock_text: bool = Field(False, description="Freeze the text tower.")

    @model_validator(mode="before")
    @classmethod
    def _preset_fills_unset_keys(cls, data: Any) -> Any:
        # Resolved before validation, like executor.slurm.profile, so the trial's config records
        # the architecture trained and reloading it changes nothing.
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(
                    f"model.preset={name!r} is not a known architecture; use one of "
                    f"{', '.join(PRESETS)}, or leave it out and set model.width, model.depth, …"
                )
            return {**PRESETS[name], **data}
        return data

    @field_validator("tokenizer_file", "image_init")
    @classmethod
    def _path_is_absolute(cls, path: str | None) -> str | None:
        # Whether it exists and fits is the preflight's question (scalestudy.preflight).
        return None if path is None else absolute(path)

    @property
    def text_tower(self) -> tuple[int, int, int]:
        """(width, depth, heads) of the text tower."""
        return (self.text_width or self.width, self.text_depth or self.depth,
                self.text_heads or self.heads)

    def overrides(self) -> dict[str, Any]:
        """The keys whose values model.preset (or, without one, the defaults) would not give.

        What a study set on top of its preset; a sweep that switches the preset keeps these and
        lets the new preset fill the rest.
        """
        given = ModelSpec(preset=self.preset).model_dump(mode="json")
        mine = self.model_dump(mode="json")
        return {key: value for key, value in mine.items() if key == "preset" or value != given[key]}

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        text_width, _, text_heads = self.text_tower
        for tower, width, heads, width_key, heads_key in (
            ("image", self.width, self.heads, "width", "heads"),
            ("text", text_width, text_heads, "text_width" if self.text_width else "width",
             "text_heads" if self.text_heads else "heads"),
        ):
            if width % heads:
                raise ValueError(
                    f"model.{heads_key}={heads} must divide the {tower} tower's width "
                    f"model.{width_key}={width}; pick heads from "
                    f"{[h for h in range(1, width + 1) if width % h == 0][:8]}"
                )
        return self

    @model_validator(mode="after")
    def _projection_and_tokenizer_fit(self) -> ModelSpec:
        if self.image_projection == "none" and self.embed_dim != self.width:
            raise ValueError(
                f"model.image_projection=none uses the pooled image feature as the embedding, so "
                f"model.embed_dim={self.embed_dim} must equal model.width={self.width}; set them "
                "equal or use model.image_projection=linear"
            )
        if (self.tokenizer == "file") != (self.tokenizer_file is not None):
            raise ValueError(
                "model.tokenizer_file is read only with model.tokenizer=file; "
                + ("set model.tokenizer_file to a tokenizer.json" if self.tokenizer == "file"
                   else f"remove it or set model.tokenizer=file (now {self.tokenizer})")
            )
        # Id 0 is padding, so the hash tokenizer needs at least one more id for words; a byte-level
        # BPE starts from 256 byte tokens plus its 3 special tokens.
        least = {"hash": 2, "bpe": 256 + 3, "file": 1}[self.tokenizer]
        if self.vocab_size < least:
            raise ValueError(
                f"model.vocab_size={self.vocab_size} is too small for model.tokenizer="
                f"{self.tokenizer}; it needs at least {least}"
            )
        return self


class LossSpec(Spec):
    kind: Literal["softmax", "sigmoid"] = Field(
        "sigmoid", description="softmax: CLIP's symmetric cross-entropy; sigmoid: SigLIP's pairwise loss."
    )
    temperature_init: float | None = Field(
        None,
        gt=0,
        description="Initial logit scale t (the multiplier 1/τ, not log t). Default per paper: "
        "softmax 1/0.07 (CLIP §2.5), sigmoid 10 (SigLIP §3.2, t' = log 10).",
    )
    bias_init: float | Literal["neg_log_batch"] | None = Field(
        None,
        description="Initial logit bias b of the sigmoid loss: a number, or neg_log_batch for "
        "b = −log(batch size) (proposed for open_clip so the initial loss is balanced at any "
        "batch size). Default −10 (SigLIP §3.2). Not allowed for softmax, which has no bias.",
    )
    use_bias: bool = Field(
        True, description="Sigmoid loss with a learnable bias b; false fixes b = 0 (no-bias variant)."
    )
    negative_weight: float | Literal["balanced"] | None = Field(
        None,
        description="Sigmoid loss: weight on each negative pair's term (default 1). balanced = "
        "1/(B−1), so the B positives and B(B−1) negatives weigh the same in total — a bias-free "
        "answer to the imbalance SigLIP's bias init addresses (§3.2); with loss.duplicates "
        "positive or masked it is the number of positive pairs over the number of pairs of "
        "different captions, counted in each batch.",
    )
    negative_mask_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Sigmoid loss: fraction of negative pairs dropped at random each step "
        "(SigLIP §4.7's positive:negative ratio study); seeded by train.seed and the step.",
    )
    duplicates: Literal["negative", "positive", "masked"] = Field(
        "negative",
        description="What two rows of a batch with the same caption are to each other. negative: "
        "the papers' losses (CLIP §2.3, SigLIP §3.1), which count them as negatives (false "
        "negatives); positive (sigmoid only): the pair is labelled +1; masked: the sigmoid "
        "loss drops the pair, the softmax loss leaves it out of its denominator. (A multi-positive "
        "softmax would equal CLIP's here, as equal captions get equal text features.) With positive "
        "or masked only pairs of different captions are negatives: loss.negative_weight and "
        "loss.negative_mask_ratio apply to them alone, and balanced counts them alone.",
    )
    chunk_size: PositiveInt | None = Field(
        None,
        description="Compute the loss in blocks of this many columns, never forming the B×B "
        "logits (same values and gradients; for large batches).",
    )
    learn_temperature: bool = Field(True, description="Whether t is trained (as log t).")
    max_temperature: float = Field(
        100.0, gt=0, description="Upper clip of t, as CLIP clips its logit scale at 100 (§2.5)."
    )

    @model_validator(mode="after")
    def _sigmoid_options_only_for_sigmoid(self) -> LossSpec:
        if self.kind == "softmax":
            for key, value, default in (
                ("bias_init", self.bias_init, None),
                ("use_bias", self.use_bias, True),
                ("negative_weight", self.negative_weight, None),
                ("negative_mask_ratio", self.negative_mask_ratio, 0.0),
            ):
                if value != default:
                    raise ValueError(
                        f"loss.{key}={value} only applies to loss.kind=sigmoid; remove it or "
                        "use loss.kind=sigmoid"
                    )
        if not self.use_bias and self.bias_init is not None:
            raise ValueError(
                f"loss.bias_init={self.bias_init} is set but loss.use_bias=false fixes b = 0; "
                "remove one of them"
            )
        if self.kind == "softmax" and self.duplicates == "positive":
            # Equal captions get equal text features, and the multi-positive cross-entropy then
            # equals CLIP's in value and gradients (proven in tests/test_losses.py).
            raise ValueError(
                "loss.duplicates=positive changes nothing for loss.kind=softmax: equal captions "
                "get equal text features, and CLIP's softmax already spreads each image's target "
                "over its caption's identical columns; use loss.duplicates=masked to take them out "
                "of the softmax, or loss.kind=sigmoid"
            )
        if self.duplicates == "masked" and self.negative_weight == 0:
            raise ValueError(
                "loss.duplicates=masked changes nothing with loss.negative_weight=0: every negative "
                "pair, duplicate captions included, already weighs 0; use loss.duplicates=negative "
                "(or positive), or a loss.negative_weight above 0"
            )
        return self


class OptimSpec(Spec):
    kind: Literal["adamw", "stable_adamw"] = Field(
        "adamw",
        description="adamw: torch's AdamW. stable_adamw: AdamW with per-tensor update clipping, "
        "lr / max(1, RMS_t) (Wortsman et al. 2023, §3.5 and Algorithm 2), which removes the loss "
        "spikes that follow a stale second-moment estimate (§3.4) without gradient clipping.",
    )
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate at optim.lr_reference_batch.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β1.")
    beta2: float = Field(
        0.999,
        gt=0,
        lt=1,
        description="AdamW β2. SigLIP §4.4 stabilised large batches by lowering it from 0.999 to 0.95.",
    )
    eps: float = Field(1e-8, gt=0, description="AdamW ε.")
    weight_decay: float = Field(
        1e-4, ge=0, description="Decoupled weight decay (not applied to gains, biases, t or b)."
    )
    warmup_fraction: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the steps spent in linear LR warm-up."
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description="Linear LR warm-up in steps, the same for every batch size (clipped to the "
        "trial's steps); when set it wins over optim.warmup_fraction. At a fixed examples-seen "
        "budget a fraction gives a large batch only a few warm-up steps (10 % of 64 steps is 6) "
        "and a small batch thousands.",
    )
    scalar_lr: float | None = Field(
        None,
        gt=0,
        description="Peak LR of the logit scale t (trained as log t) and the bias b, on the same "
        "warm-up and schedule as the rest; default: the main LR (optim.lr after "
        "optim.lr_scaling, which does not scale this one). Adam moves a parameter by at most about "
        "its LR per step, so at 1e-3 the scalars move at most Σ lr_s ≈ 0.15 in 300 steps of "
        "warm-up and cosine (measured on shapes, LiT at B = 256: b −10 → −9.92, log t +0.10): "
        "from SigLIP's init (§3.2: t = 10, b = −10) a short run cannot learn them at that LR.",
    )
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="LR after warm-up: cosine decay to zero, or constant."
    )
    grad_clip: float | None = Field(
        None, gt=0, description="Clip the global grad norm to this; the recorded norm stays the pre-clip one."
    )
    lr_scaling: Literal["none", "sqrt", "linear"] = Field(
        "none",
        description="How the LR scales with train.batch_size against optim.lr_reference_batch.",
    )
    lr_reference_batch: PositiveInt = Field(
        256, description="Batch size at which optim.lr applies unscaled."
    )


class TrainSpec(Spec):
    batch_size: PositiveInt = Field(64, description="Global batch size (image–caption pairs per step).")
    examples_seen: PositiveInt = Field(
        16384,
        description="Training budget in pairs; steps = ceil(examples_seen / batch_size), so batch "
        "sizes compare at a fixed budget.",
    )
    seed: int = Field(0, ge=0, description="Seeds model init and data order.")
    eval_every: int = Field(
        0, ge=0, description="Evaluate every N steps (0: only at the end, which always happens)."
    )
    checkpoint_every: int = Field(
        100, ge=0, description="Save a resumable checkpoint every N steps (0: only at the end)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: CUDA when the trial has GPUs (resources.gpus > 0) and torch sees them, "
        "else the CPU; cpu: always the CPU; cuda: the trial's GPUs, an error without them.",
    )
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32",
        description="The towers' arithmetic; parameters, optimizer state and the loss stay float32 "
        "in every mode. fp32: IEEE float32 throughout, CUDA matmuls included (the default, what "
        "trials always computed). tf32: CUDA matmuls on TF32 tensor cores (float32 otherwise; on a "
        "CPU the same as fp32). bf16 / fp16: the towers under torch.autocast in that type, their "
        "features cast to float32 before the loss, whose logits and tiles are float32; bf16 also "
        "runs on CPUs. fp16 adds dynamic loss scaling (Micikevicius et al. 2018 §3.2, "
        "torch.amp.GradScaler): a step whose gradients overflow is skipped and the scale halved "
        "(the step row's grad_overflow), not counted as divergence.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the towers' forward (and with it their backward). The first steps "
        "pay the compilation: 10–20 s on a CPU with gcc for a small model, about 2 s with a warm "
        "cache; longer for a ViT-B on a GPU. Losses equal the plain trial's to float32 rounding.",
    )
    micro_batch_size: PositiveInt | None = Field(
        None,
        description="Rows per forward/backward pass, for batches beyond memory: gradient caching "
        "(Gao et al. 2021, 'Scaling Deep Contrastive Learning Batch Size under Memory Limited "
        "Setup', §3): the features of the whole batch without activations, the loss over the whole "
        "batch back to the features, then each micro-batch again with gradients. The gradient is "
        "the full batch's (to float rounding) for one extra forward; memory holds one micro-batch's "
        "activations. At most this many rows per pass: a rank with fewer rows (train.batch_size / "
        "ranks) runs them at once, so one value can serve a sweep over batch sizes; below that it "
        "must divide them. None: all of a rank's rows at once.",
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak dense TFLOP/s of one device in train.precision's arithmetic, for the MFU "
        "figure: overrides the built-in table of NVIDIA GPUs (scalestudy/train/throughput.py), "
        "and gives a CPU or an unlisted GPU an MFU at all (None without it).",
    )

    @model_validator(mode="after")
    def _micro_batches_tile_the_batch(self) -> TrainSpec:
        micro = self.micro_batch_size
        if micro is not None and micro < self.batch_size and self.batch_size % micro:
            divisors = [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            below = max(d for d in divisors if d < micro)
            above = min(d for d in divisors if d > micro)
            raise ValueError(
                f"train.micro_batch_size={micro} must divide train.batch_size={self.batch_size} "
                f"(every micro-batch has the same rows); use {below} or {above}, or remove it to "
                "train the whole batch at once"
            )
        return self


class MonitorSpec(Spec):
    spike_threshold: float = Field(
        3.0,
        gt=1,
        description="A step is a grad-norm spike when its norm exceeds this many times the running "
        "median of the previous monitor.spike_window steps.",
    )
    spike_window: int = Field(
        50, ge=3, description="Steps in the running median that spikes are measured against."
    )
    loss_spike_threshold: float = Field(
        1.5,
        gt=1,
        description="A step is a loss spike, the primary instability event (Wortsman et al. 2023 "
        "§3.4), when its loss exceeds this many times the running median of the previous "
        "monitor.loss_spike_window losses. Lower than monitor.spike_threshold because a loss is "
        "O(1–10) and smooth, not a heavy-tailed norm: 3× would need a loss of 3 to reach 9, which "
        "only divergence does. In real shapes trials (batch 32–128) step-to-step noise stayed "
        "below 1.5× while the median loss was above 0.5; a nearly solved small-batch softmax "
        "(median loss 0.4, batch 32) reaches 1.5–1.75×, so raise it there.",
    )
    loss_spike_window: int = Field(
        50, ge=3,
        description="Losses in the running median that loss spikes are measured against; as "
        "monitor.spike_window, and the pre-spike level steps_to_recover measures recovery to.",
    )
    loss_spike_rule: Literal["ratio", "mad"] = Field(
        "ratio",
        description="ratio: a loss spike is a loss above monitor.loss_spike_threshold × the running "
        "median; mad: a loss more than monitor.loss_spike_mads robust standard deviations (1.4826 "
        "× the median absolute deviation of the same window) above the running median, which "
        "follows the loss's own noise: the same rule for a loss near its no-learning level and one "
        "driven towards 0, where a ratio flags sampling noise.",
    )
    loss_spike_mads: float = Field(
        6.0,
        gt=0,
        description="monitor.loss_spike_rule=mad: robust standard deviations above the running "
        "median that make a loss spike (6 flagged 0–1 steps in every stable trace of both losses "
        "at B = 128 on the shapes data, and 4–25 in unstable ones).",
    )
    extended: bool = Field(
        True,
        description="Also record per-tower grad norms, parameter and update norms, the update RMS "
        "of Wortsman et al. 2023 §3.4 (largest over weight matrices, and for the patch embedding, "
        "t and b) and mean positive/negative logits every step (grad norm, loss and both kinds of "
        "spikes are always on).",
    )
    sinks: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that mirror each trial (the run directory stays the record): "
        "tensorboard (RUN_DIR/tensorboard/<trial id>), wandb (project $WANDB_PROJECT or scalestudy, "
        "group = study name), mlflow (experiment = study name, at $MLFLOW_TRACKING_URI, else MLflow's "
        "default). Each needs its extra, e.g. pip install 'scalestudy[wandb]'; one that fails warns "
        "once in the trial's log and the trial goes on.",
    )

    @field_validator("sinks")
    @classmethod
    def _each_sink_once(cls, sinks: list[str]) -> list[str]:
        repeated = sorted({s for s in sinks if sinks.count(s) > 1})
        if repeated:
            raise ValueError(f"monitor.sinks names {', '.join(repeated)} more than once; list each "
                             "tracker once")
        return sinks


class ResourcesSpec(Spec):
    # Shares of one GPU that a fractional `gpus` is counted in: Ray's resource precision (0.0001;
    # `ray.remote(num_gpus=…)` refuses less), which the local executor's GPU pool uses too.
    GPU_SHARES: ClassVar[int] = 10_000

    cpus: PositiveInt = Field(
        1, description="CPU cores per trial, shared by its ranks; torch threads = cpus // ranks."
    )
    gpus: float = Field(
        0,
        ge=0,
        description="GPUs per trial. A whole number: that many GPUs of its own; more than one runs "
        "data-parallel, one rank per GPU (NCCL). A fraction below 1 (e.g. 0.25): one rank on a "
        "share of one GPU that other fractional trials share too (local and Ray executors; Slurm "
        "gives each job whole GPUs). A share is a scheduling promise, not a memory limit.",
    )
    workers: PositiveInt = Field(
        1, description="Data-parallel CPU ranks (gloo) when gpus is 0; the global batch is split."
    )
    allocator: Allocator = Field(
        "auto",
        description="The trial process's malloc, preloaded with LD_PRELOAD (Linux): tcmalloc or "
        "jemalloc serve a small model's many tiny tensor allocations faster than glibc's malloc "
        "(the tiny model's median step: 4.6–4.9 ms under tcmalloc, 5.1–5.3 under glibc's). auto: "
        "tcmalloc if installed, else jemalloc, else the system's; a named one must be installed. "
        "It changes no value.",
    )

    @field_validator("gpus")
    @classmethod
    def _whole_above_one(cls, gpus: float) -> float:
        if gpus == int(gpus):
            return int(gpus)  # whole GPUs count as an int (ranks, nodes, --gpus-per-node)
        if gpus > 1:
            raise ValueError(
                f"resources.gpus={gpus:g}: above 1 it must be a whole number (one data-parallel "
                f"rank per GPU); use {int(gpus)} or {int(gpus) + 1}, or a fraction below 1 to "
                "share one GPU with other trials"
            )
        if round(gpus * cls.GPU_SHARES) < 1:
            raise ValueError(
                f"resources.gpus={gpus:g} is below the smallest GPU share, {1 / cls.GPU_SHARES:g} "
                "(Ray's resource precision); ask for at least that, or 0 for a CPU trial"
            )
        return gpus

    @field_serializer("gpus")
    def _whole_gpus_as_int(self, gpus: float) -> int | float:
        # So config.json, study.yaml and `plan --json` say 2, never 2.0.
        return int(gpus) if gpus == int(gpus) else gpus

    @model_validator(mode="after")
    def _one_rank_on_a_gpu_share(self) -> ResourcesSpec:
        if 0 < self.gpus < 1 and self.workers > 1:
            raise ValueError(
                f"resources.gpus={self.gpus:g} runs one rank on a share of one GPU, so "
                f"resources.workers={self.workers} cannot apply (data-parallel ranks need a GPU "
                "each: NCCL refuses two ranks on one GPU); remove resources.workers, or ask for "
                "resources.gpus ≥ 2 to run data-parallel on GPUs"
            )
        return self

    @property
    def world_size(self) -> int:
        """Data-parallel ranks: one per whole GPU, one on a GPU share, else resources.workers."""
        if self.gpus >= 1:
            return int(self.gpus)
        return 1 if self.gpus > 0 else self.workers


class TrialConfig(Spec):
    """Everything that defines one training run. Its canonical form (minus resources) is the trial id."""

    data: DataSpec = Field(default_factory=DataSpec, description="Training and evaluation data.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The two towers.")
    loss: LossSpec = Field(default_factory=LossSpec, description="The contrastive loss.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="AdamW and the LR schedule.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Batch, budget, seed, cadence.")
    monitor: MonitorSpec = Field(default_factory=MonitorSpec, description="Spike detection.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="What one trial needs (not part of its identity)."
    )

    @model_validator(mode="after")
    def _batch_splits_over_ranks(self) -> TrialConfig:
        ranks = self.resources.world_size
        if self.train.batch_size % ranks:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must divide evenly over {ranks} "
                "data-parallel ranks (resources.gpus, or resources.workers without GPUs)"
            )
        return self

    @model_validator(mode="after")
    def _micro_batches_tile_each_rank(self) -> TrialConfig:
        micro, ranks = self.train.micro_batch_size, self.resources.world_size
        rows = self.train.batch_size // ranks
        if micro is not None and micro < rows and rows % micro:
            raise ValueError(
                f"train.micro_batch_size={micro} must divide the {rows} rows each of the {ranks} "
                f"data-parallel ranks trains (train.batch_size / ranks); use a divisor of {rows}, "
                "or resources with fewer ranks"
            )
        return self

    @model_validator(mode="after")
    def _cuda_needs_gpus(self) -> TrialConfig:
        if self.train.device == "cuda" and self.resources.gpus == 0:
            raise ValueError(
                "train.device=cuda but resources.gpus=0: a trial only gets the GPUs it asks for; "
                "set resources.gpus > 0 (a share such as 0.5 will do), or train.device=auto or cpu"
            )
        return self

    @model_validator(mode="after")
    def _patches_tile_image(self) -> TrialConfig:
        if self.data.image_size % self.model.patch_size:
            preset = self.model.preset
            hint = (
                f" (model.preset={preset} sets it; the preset was published at data.image_size="
                f"{PRESET_IMAGE_SIZE[preset]}, or set model.patch_size yourself)"
                if preset is not None and "patch_size" not in self.model.overrides() else ""
            )
            raise ValueError(
                f"model.patch_size={self.model.patch_size} must divide data.image_size="
                f"{self.data.image_size}{hint}"
            )
        return self


SweepValues = list[Any]


class SweepSpec(Spec):
    grid: dict[str, SweepValues] = Field(
        default_factory=dict,
        description="Cartesian product: every combination of the listed values of each dotted key.",
    )
    zip: dict[str, SweepValues] = Field(
        default_factory=dict,
        description="Lock-step lists of equal length: the i-th values of every key form one point.",
    )
    include: list[dict[str, Any]] = Field(
        default_factory=list, description="Extra points added after grid × zip, as {dotted key: value}."
    )
    exclude: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Points removed: a trial is dropped when all keys of one entry match.",
    )

    @field_validator("grid", "zip")
    @classmethod
    def _lists_not_empty(cls, axes: dict[str, SweepValues]) -> dict[str, SweepValues]:
        for key, values in axes.items():
            if not values:
                raise ValueError(f"{key}: the list of values is empty; give at least one value")
        return axes

    @model_validator(mode="after")
    def _zip_lists_same_length(self) -> SweepSpec:
        lengths = {key: len(values) for key, values in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"zip lists must have equal lengths, got {lengths}; make them the same length "
                "or move a key to grid"
            )
        shared = set(self.grid) & set(self.zip)
        if shared:
            raise ValueError(f"{sorted(shared)} appear in both grid and zip; keep each key in one")
        return self


class LocalExecutorSpec(Spec):
    max_parallel: int | None = Field(
        None,
        ge=1,
        description="Trials run at once; default: CPU cores // resources.cpus (at least 1). "
        "Trials with resources.gpus also wait for free GPUs of the machine's pool.",
    )


# `ray.init` addresses the Ray executor accepts; `ray://` (Ray Client) needs an extra that is not
# installed and only times out.
RAY_ADDRESS = re.compile(r"^(local|auto|[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})$")


class RayExecutorSpec(Spec):
    address: str = Field(
        "local",
        description="local: start a private Ray on this machine for the run (never joins another); "
        "auto: join the Ray that `ray start` runs on this machine; HOST:PORT: join the cluster "
        "whose head listens there (its GCS port, 6379 by default).",
    )
    max_retries: int = Field(
        2,
        ge=0,
        description="Times a trial runs again (from its last checkpoint) after its worker or trial "
        "process dies; after that it is failed with the reason. A trial that raises is not retried.",
    )
    num_cpus: PositiveInt | None = Field(
        None,
        description="CPUs of the private Ray (address=local only); default: all cores. A joined "
        "cluster has the resources its nodes were started with.",
    )

    @field_validator("address")
    @classmethod
    def _address_is_usable(cls, address: str) -> str:
        if not RAY_ADDRESS.match(address):
            raise ValueError(
                f"executor.ray.address={address!r} is not local, auto or HOST:PORT (e.g. "
                "10.0.0.5:6379); Ray Client addresses (ray://) are not supported"
            )
        return address

    @model_validator(mode="after")
    def _num_cpus_only_for_a_private_ray(self) -> RayExecutorSpec:
        if self.num_cpus is not None and self.address != "local":
            raise ValueError(
                f"executor.ray.num_cpus={self.num_cpus} only sizes a private Ray "
                f"(address=local), but address={self.address!r} joins a cluster; remove num_cpus"
            )
        return self


class SlurmExecutorSpec(Spec):
    """Where and how trials go to Slurm; resources.* of each trial set its nodes, tasks, CPUs, GPUs."""

    profile: str | None = Field(
        None,
        description="A cluster profile: a name (a shipped one such as gpu-a100, cpu or local, or one "
        "in a folder of $SCALESTUDY_SLURM_PROFILES) or the path of a YAML file with these same "
        "keys; keys set here override the profile's. Resolved when the study is loaded, so the "
        "run directory's study.yaml records the values used.",
    )
    partition: str | None = Field(
        None, description="sbatch --partition (default: the cluster's default partition)."
    )
    account: str | None = Field(None, description="sbatch --account, charged for the jobs.")
    qos: str | None = Field(None, description="sbatch --qos (quality of service).")
    time_min: PositiveInt = Field(
        60,
        description="Time limit of one job in minutes (sbatch --time). At the limit the trial "
        "checkpoints and is requeued (executor.slurm.max_requeues). At 50 or less submitit counts "
        "every preemption as a timeout too.",
    )
    mem_gb: float | None = Field(
        None, gt=0, description="Memory per node in GB (sbatch --mem); default: the cluster's."
    )
    constraint: str | None = Field(
        None, description="sbatch --constraint: node features, e.g. a100 or 'volta|ampere'."
    )
    gpus_per_node: PositiveInt | None = Field(
        None,
        description="GPUs on one node of the cluster. A trial with more resources.gpus spans "
        "resources.gpus / gpus_per_node nodes; default: every trial fits on one node.",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines the sbatch script runs before the trial, e.g. "
        "'module load cuda/12.1' or 'source /shared/venvs/scalestudy/bin/activate'.",
    )
    python: str | None = Field(
        None,
        description="Command that starts Python on the compute nodes (default: the interpreter "
        "running scalestudy, which must then be on a file system the nodes share).",
    )
    array_parallelism: PositiveInt = Field(
        64, description="Tasks of one job array that run at once (sbatch --array=…%N)."
    )
    max_requeues: int = Field(
        3,
        ge=0,
        description="Times a trial is requeued after preemption or its time limit, resuming from "
        "its checkpoint; after that it stays preempted and `scalestudy run` resumes it.",
    )
    signal_delay_s: PositiveInt = Field(
        90,
        description="Slurm sends USR2 this many seconds before the time limit, so the trial can "
        "checkpoint and requeue; must be shorter than executor.slurm.time_min.",
    )
    sbatch: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="Further sbatch options by long name without dashes, e.g. "
        "{exclusive: true, mail-type: FAIL}.",
    )

    @model_validator(mode="after")
    def _signal_before_time_limit(self) -> SlurmExecutorSpec:
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(
                f"executor.slurm.signal_delay_s={self.signal_delay_s} must be shorter than the "
                f"time limit executor.slurm.time_min={self.time_min} (= {self.time_min * 60} s); "
                "lower signal_delay_s or raise time_min"
            )
        return self


class ExecutorSpec(Spec):
    kind: Literal["local", "ray", "slurm"] = Field(
        "local",
        description="Where trials run: local worker processes, Ray tasks, or Slurm job arrays.",
    )
    local: LocalExecutorSpec = Field(
        default_factory=LocalExecutorSpec, description="Settings of the local executor."
    )
    ray: RayExecutorSpec = Field(
        default_factory=RayExecutorSpec, description="Settings of the Ray executor."
    )
    slurm: SlurmExecutorSpec = Field(
        default_factory=SlurmExecutorSpec, description="Settings of the Slurm executor."
    )


STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudySpec(Spec):
    name: str = Field(description="Study name; the run directory is OUT/<name>.")
    description: str = Field("", description="What the study asks, for the report.")
    base: TrialConfig = Field(
        default_factory=TrialConfig, description="The config every trial starts from."
    )
    sweep: SweepSpec = Field(default_factory=SweepSpec, description="The axes the trials vary.")
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec, description="How trials run.")

    @field_validator("name")
    @classmethod
    def _name_is_a_directory_name(cls, name: str) -> str:
        if not STUDY_NAME.match(name):
            raise ValueError(
                f"name={name!r} must be a plain directory name (letters, digits, '_', '-', '.')"
            )
        return name

    @field_validator("base", mode="before")
    @classmethod
    def _empty_base_is_defaults(cls, base: Any) -> Any:
        # `base:` with nothing under it parses as None in YAML; it means "all defaults".
        return {} if base is None else base
