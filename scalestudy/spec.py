"""The study file's schema: one Pydantic tree, `extra="forbid"` everywhere, a description on every field.

A `StudySpec` holds a `base` TrialConfig, a `sweep` over dotted keys of it, and executor settings.
Expansion (`scalestudy.expand`) turns it into fully resolved trials; nothing here derives values.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scalestudy.datafiles import absolute, class_folders, csv_with_columns, expand_braces
from scalestudy.train.shapes_vocab import CLASSES, COLOURS, MAX_HOLDOUT_PAIRS, SHAPES


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
        "zero-shot images taken from data.zeroshot_dir (evenly across its classes).",
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
        "class embedding averages them (CLIP §3.1.4). Default: the built-in ones for shapes, "
        "CLIP's 7 ImageNet templates for an image folder.",
    )

    @field_validator("shards", "eval_shards", mode="before")
    @classmethod
    def _one_pattern_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("shards", "eval_shards")
    @classmethod
    def _shards_exist(cls, patterns: list[str] | None) -> list[str] | None:
        if patterns is None:
            return None
        if not patterns:
            raise ValueError("the list of shards is empty; give at least one path or brace pattern")
        resolved = [absolute(pattern) for pattern in patterns]
        for pattern in resolved:
            for path in expand_braces(pattern):
                if not os.path.isfile(path):
                    origin = f" (from the pattern {pattern})" if path != pattern else ""
                    raise ValueError(f"the shard {path}{origin} does not exist; check the path")
        return resolved

    @field_validator("csv", "eval_csv")
    @classmethod
    def _csv_exists(cls, path: str | None) -> str | None:
        return None if path is None else csv_with_columns(path)

    @field_validator("zeroshot_dir")
    @classmethod
    def _zeroshot_dir_has_classes(cls, path: str | None) -> str | None:
        if path is None:
            return None
        path = absolute(path)
        if not os.path.isdir(path):
            raise ValueError(f"{path} is not a directory; give a folder with one subfolder per class")
        if len(class_folders(path)) < 2:
            raise ValueError(f"{path} needs at least two class subfolders (one per class) for zero-shot")
        return path

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
    def _class_names_match_folders(self) -> DataSpec:
        if self.zeroshot_classes is None:
            return self
        if self.zeroshot_dir is None:
            raise ValueError("data.zeroshot_classes names the classes of data.zeroshot_dir; set it too")
        folders = class_folders(self.zeroshot_dir)
        if len(self.zeroshot_classes) != len(folders):
            raise ValueError(
                f"data.zeroshot_classes has {len(self.zeroshot_classes)} names but "
                f"{self.zeroshot_dir} has {len(folders)} class subfolders; give one name per "
                "subfolder, in sorted order"
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


# `ray.init` addresses the Ray executor accepts; `ray://` (Ray Client) needs an extra that is not
# installed and only times out (../shared/notes/ray-and-torch-on-these-machines.md §5).
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


# Shipped Slurm profiles (a checkout's cluster/slurm/profiles/); any other profile is given by path.
SLURM_PROFILES = Path(__file__).resolve().parents[1] / "cluster" / "slurm" / "profiles"


def read_slurm_profile(ref: str) -> dict[str, Any]:
    """The keys of a Slurm profile: a name from SLURM_PROFILES or a YAML file's path, checked."""
    is_path = "/" in ref or ref.endswith((".yaml", ".yml"))
    path = Path(ref).expanduser() if is_path else SLURM_PROFILES / f"{ref}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SLURM_PROFILES.glob("*.yaml"))) or "none found"
        raise ValueError(
            f"profile={ref!r}: {path} does not exist; use a profile name from {SLURM_PROFILES} "
            f"({known}) or the path of a YAML file of executor.slurm keys"
        )
    try:
        keys = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"profile {path} is not valid YAML: {err}") from None
    if not isinstance(keys, dict) or "profile" in keys:
        raise ValueError(f"profile {path} must be a mapping of executor.slurm keys other than profile")
    try:
        SlurmExecutorSpec.model_validate(keys)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"profile {path}: {problems} (allowed keys: "
                         f"{', '.join(SlurmExecutorSpec.model_fields)})") from None
    return keys


class SlurmExecutorSpec(Spec):
    """Where and how trials go to Slurm; resources.* of each trial set its nodes, tasks, CPUs, GPUs."""

    profile: str | None = Field(
        None,
        description="A cluster profile: a name from cluster/slurm/profiles/ (e.g. gpu-a100) or "
        "the path of a YAML file with these same keys; keys set here override the profile's.",
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

    @model_validator(mode="before")
    @classmethod
    def _profile_fills_unset_keys(cls, data: Any) -> Any:
        # Resolved here, not at submission, so `validate` checks the profile and the run
        # directory's study.yaml records the values used (reloading it changes nothing).
        if isinstance(data, dict) and data.get("profile") is not None:
            return {**read_slurm_profile(str(data["profile"])), **data}
        return data

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
