"""The study file's schema: one Pydantic tree, `extra="forbid"` everywhere, a description on every field.

A `StudySpec` holds a `base` TrialConfig, a `sweep` over dotted keys of it, and executor settings.
Expansion (`scalestudy.expand`) turns it into fully resolved trials; nothing here derives values.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Spec(BaseModel):
    """Base of every spec model: unknown keys are errors, so a typo never silently runs a default."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


PositiveInt = Annotated[int, Field(gt=0)]


class DataSpec(Spec):
    kind: Literal["shapes", "webdataset", "csv"] = Field(
        "shapes",
        description="shapes: the built-in procedural coloured-shapes set (deterministic from the seed); "
        "webdataset: tar shards of {key}.jpg|png + {key}.txt; csv: a file of image paths and captions.",
    )
    shards: list[str] | None = Field(
        None, description="WebDataset shard paths or brace patterns (data.kind=webdataset)."
    )
    image_size: PositiveInt = Field(32, description="Square image side in pixels.")
    eval_images: PositiveInt = Field(
        512, description="Held-out images for zero-shot and retrieval evaluation."
    )

    @model_validator(mode="after")
    def _kind_is_available(self) -> DataSpec:
        if self.kind != "shapes":
            raise ValueError(
                f"data.kind={self.kind!r} is not available in this version; use data.kind=shapes "
                "(the built-in procedural dataset)"
            )
        return self


class ModelSpec(Spec):
    image_tower: Literal["vit"] = Field("vit", description="Image encoder architecture.")
    patch_size: PositiveInt = Field(8, description="ViT patch side in pixels; must divide data.image_size.")
    width: PositiveInt = Field(64, description="Transformer width of both towers.")
    depth: PositiveInt = Field(2, description="Transformer layers per tower.")
    heads: PositiveInt = Field(4, description="Attention heads; must divide model.width.")
    embed_dim: PositiveInt = Field(64, description="Dimension of the shared embedding space.")
    vocab_size: PositiveInt = Field(
        4096, description="Buckets of the hashing word tokenizer (no vocabulary download needed)."
    )
    context_length: PositiveInt = Field(16, description="Caption tokens kept (longer captions are cut).")
    lock_image: bool = Field(False, description="Freeze the image tower (LiT-style locked tuning).")
    lock_text: bool = Field(False, description="Freeze the text tower.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSpec:
        if self.width % self.heads:
            raise ValueError(
                f"model.heads={self.heads} must divide model.width={self.width}; "
                f"pick heads from {[h for h in range(1, self.width + 1) if self.width % h == 0][:8]}"
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
        "answer to the imbalance SigLIP's bias init addresses (§3.2).",
    )
    negative_mask_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Sigmoid loss: fraction of negative pairs dropped at random each step "
        "(SigLIP §4.7's positive:negative ratio study); seeded by train.seed and the step.",
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
        return self


class OptimSpec(Spec):
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
        "auto", description="auto: CUDA when torch sees a GPU, else CPU. cuda without a GPU is an error."
    )


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
    extended: bool = Field(
        True,
        description="Also record per-tower grad norms, parameter and update norms, Adam staleness "
        "and mean positive/negative logits every step (grad norm, loss and spikes are always on).",
    )


class ResourcesSpec(Spec):
    cpus: PositiveInt = Field(
        1, description="CPU cores per trial, shared by its ranks; torch threads = cpus // ranks."
    )
    gpus: int = Field(
        0, ge=0, description="GPUs per trial; more than one runs data-parallel, one rank per GPU (NCCL)."
    )
    workers: PositiveInt = Field(
        1, description="Data-parallel CPU ranks (gloo) when gpus is 0; the global batch is split."
    )

    @property
    def world_size(self) -> int:
        """Data-parallel ranks: one per GPU, else resources.workers."""
        return self.gpus if self.gpus > 0 else self.workers


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
    def _patches_tile_image(self) -> TrialConfig:
        if self.data.image_size % self.model.patch_size:
            raise ValueError(
                f"model.patch_size={self.model.patch_size} must divide data.image_size="
                f"{self.data.image_size}"
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
        description="Trials run at once; default: CPU cores // resources.cpus (at least 1).",
    )


class ExecutorSpec(Spec):
    kind: Literal["local"] = Field("local", description="Where trials run: local worker processes.")
    local: LocalExecutorSpec = Field(
        default_factory=LocalExecutorSpec, description="Settings of the local executor."
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
