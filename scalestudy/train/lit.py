"""Locked-image tuning: LiT (Zhai et al. 2022) and, with the sigmoid loss, SigLiT (SigLIP §4.1,
Fig. 2): a pre-trained image tower, frozen, and a text tower trained from scratch against it.

`model.image_init` names the tower: a finished trial's directory (its checkpoint.pt holds the
final model) or a checkpoint file, of which only the tensors `image.*` are loaded. What can be
wrong with it — no such file, a trial that has not finished, a tower of other shapes or settings —
is found by `read_image_init`, which the preflight runs at validate/plan/run (exit 2) and the trial
runs again when it loads.

With `model.lock_image` and a finite training pool (data.train_pool, or real data) the tower maps
each pool item to the same feature at every step, so its features are computed once: a (N, D)
table, exactly what `TwoTower.encode_image` gives in eval mode (L2 normalisation included), kept in
RUN_DIR/cache/image_features/<key>.pt. A step then looks up its rows (`LockedImageForward`) and
runs only the text tower and the loss, which is what makes SigLIP's batch sizes affordable on a
CPU. The key hashes the tower's weights (loaded or freshly initialised), its settings, the data
and pool, and the device type, so every trial of a study that shares them reads one file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalestudy.errors import StoreError
from scalestudy.spec import ModelSpec, TrialConfig
from scalestudy.store import RunStore, Status, TrialStore
from scalestudy.store.files import load_torch, save_torch
from scalestudy.train.data import Dataset, normalize
from scalestudy.train.models import IMAGE_TOWER_KEYS, TwoTower, image_tower_shapes
from scalestudy.train.ranks import Ranks

# Bump when what the table holds changes, so an old cache file is never read as a new one.
CACHE_VERSION = 1
# Pool images per forward pass while the table is filled: bounds the memory of the pass.
FEATURE_CHUNK = 1024


def trial_of(path: str) -> Path:
    """What model.image_init names: a run directory with exactly one trial stands for that trial
    (so a study can name the run of a one-trial "tower" study without knowing its trial id)."""
    source = Path(path)
    if (source / "trials").is_dir() and not (source / "state.json").exists():
        ids = RunStore(source).trial_ids()
        if len(ids) == 1:
            return source / "trials" / ids[0]
    return source


def checkpoint_of(path: str) -> Path:
    """The checkpoint file model.image_init names: a trial directory's checkpoint.pt, or the file."""
    source = trial_of(path)
    return source / "checkpoint.pt" if source.is_dir() else source


def _shape(shape: torch.Size) -> str:
    return f"({', '.join(map(str, shape))})"


def source_problem(path: str) -> str | None:
    """Why model.image_init names no usable checkpoint (missing, an unfinished trial), or None."""
    source = trial_of(path)
    if (source / "trials").is_dir() and not (source / "state.json").exists():
        return (f"{path} is a run directory with {len(RunStore(source).trial_ids())} trials; name "
                "one of them: RUN_DIR/trials/<id>")
    if not source.exists():
        return (f"{path} does not exist; give a finished trial's directory (RUN_DIR/trials/<id>) "
                "or a checkpoint file")
    if not source.is_dir():
        return None
    store = TrialStore(source)
    if not store.state_path.is_file():
        return (f"{path} is a directory but not a trial's (it has no state.json); give "
                "RUN_DIR/trials/<id> or a checkpoint file")
    status = store.state().status
    if status != Status.DONE:
        return (f"the trial {path} is not finished (its status is {status}), so its checkpoint is "
                "not its final model; run it to the end first, or name a finished trial")
    if not store.checkpoint_path.is_file():
        return f"the trial {path} is done but has no checkpoint.pt to load the image tower from"
    return None


def settings_problem(path: str, spec: ModelSpec) -> str | None:
    """When model.image_init is a trial: the first image-tower setting it trained with that this
    model does not share. Same shapes under another activation or norm are another function."""
    source = trial_of(path)
    if not source.is_dir():
        return None  # a bare checkpoint records no settings; its shapes are checked
    trained = TrialStore(source).config().get("config", {}).get("model", {})
    for key in IMAGE_TOWER_KEYS:
        if key in trained and trained[key] != getattr(spec, key):
            return (f"the trial {path} trained its image tower with model.{key}={trained[key]!r} "
                    f"but this trial has model.{key}={getattr(spec, key)!r}; the same weights "
                    f"compute something else under other settings, so set model.{key}="
                    f"{trained[key]!r}")
    return None


def read_image_state(path: str) -> dict[str, torch.Tensor]:
    """The image tower's tensors in model.image_init's checkpoint, keyed without `image.`.

    Memory-mapped where the file allows it, so checking a large tower's shapes reads no weights.
    A trial's checkpoint holds the model under "model"; a bare TwoTower state dict works too.
    """
    file = checkpoint_of(path)
    payload: Any = None
    for mmap in (True, False):  # files torch saved in its legacy format cannot be mapped
        try:
            payload = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, OSError, ...
            why = f"{type(err).__name__}: {err}".splitlines()[0]
    if payload is None:
        raise ValueError(f"{file} is not a checkpoint torch can read ({why})")
    state = payload.get("model", payload) if isinstance(payload, dict) else None
    image = {
        key.removeprefix("image."): value for key, value in (state or {}).items()
        if isinstance(key, str) and key.startswith("image.") and isinstance(value, torch.Tensor)
    }
    if not image:
        raise ValueError(f"{file} holds no image tower (no tensors image.*); give a trial's "
                         "checkpoint.pt or a TwoTower state dict")
    return image


def shape_problem(image: dict[str, torch.Tensor], spec: ModelSpec, image_size: int, file: Path) -> str | None:
    """The first tensor whose shape differs from this trial's image tower (built on the meta
    device), or that one side has and the other lacks; None when every shape agrees."""
    fix = "the tower's shapes follow model.* and data.image_size: set them as the trial that trained it did"
    expected = image_tower_shapes(spec, image_size)
    for key, shape in expected.items():
        if key not in image:
            return f"{file} has no image.{key}, which this trial's image tower has, of shape {_shape(shape)}; {fix}"
        if image[key].shape != shape:
            return (f"image.{key} is {_shape(image[key].shape)} in {file} but {_shape(shape)} in this "
                    f"trial's model; {fix}")
    extra = next((key for key in image if key not in expected), None)
    if extra is not None:
        return (f"{file} has image.{extra} {_shape(image[extra].shape)}, which this trial's image "
                f"tower does not; {fix}")
    return None


def read_image_init(spec: ModelSpec, image_size: int) -> dict[str, torch.Tensor]:
    """model.image_init's image tensors, checked against this trial's tower; a ValueError says
    what is wrong (the preflight reports it as model.image_init)."""
    path = spec.image_init
    assert path is not None
    try:
        problem = source_problem(path) or settings_problem(path, spec)
    except StoreError as err:  # a trial directory whose state.json or config.json is unreadable
        problem = str(err)
    if problem is not None:
        raise ValueError(problem)
    image = read_image_state(path)
    problem = shape_problem(image, spec, image_size, checkpoint_of(path))
    if problem is not None:
        raise ValueError(problem)
    return image


def init_image_tower(model: TwoTower, spec: ModelSpec, image_size: int) -> None:
    """Load model.image_init's image tower into `model` (nothing else changes); no-op without one."""
    if spec.image_init is None:
        return
    try:
        image = read_image_init(spec, image_size)
    except ValueError as err:
        raise ValueError(f"model.image_init: {err}") from None
    model.image.load_state_dict(image)


def tower_digest(tower: nn.Module) -> str:
    """sha256 of a module's tensors (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tower.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(model: TwoTower, config: TrialConfig, dataset: Dataset, device: torch.device) -> dict[str, Any]:
    """What the feature table depends on: the tower's weights and settings, the data and its pool,
    and the device type (a GPU's kernels round differently from the CPU's)."""
    return {
        "version": CACHE_VERSION,
        "tower": tower_digest(model.image),
        "settings": {key: getattr(config.model, key) for key in IMAGE_TOWER_KEYS},
        "data": config.data.model_dump(mode="json"),
        "pool": [dataset.pool_size, dataset.pool_key],
        "device": device.type,
    }


def cache_path(run_dir: Path, key: dict[str, Any]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return run_dir / "cache" / "image_features" / f"{name}.pt"


@torch.no_grad()
def compute_features(model: TwoTower, dataset: Dataset, device: torch.device) -> torch.Tensor:
    """(N, D) encode_image of every pool item, in eval mode and FEATURE_CHUNK images at a time."""
    n = dataset.pool_size
    assert n is not None
    training = model.image.training
    model.image.eval()
    try:
        parts = []
        for start in range(0, n, FEATURE_CHUNK):
            images = dataset.pool_images(start, min(n, start + FEATURE_CHUNK)).to(device, non_blocking=True)
            parts.append(model.encode_image(normalize(images, dataset.mean, dataset.std)))
        return torch.cat(parts)
    finally:
        model.image.train(training)


def cached_image_features(
    model: TwoTower, config: TrialConfig, dataset: Dataset, run_dir: Path, device: torch.device,
    ranks: Ranks,
) -> torch.Tensor | None:
    """The pool's (N, D) image features on `device` when the tower is locked and the pool finite;
    None otherwise (the step runs the tower).

    Rank 0 computes a missing table and writes it atomically; the other ranks wait and read it.
    Two trials that miss it at once both compute it and the second rename wins with equal values.
    """
    if not config.model.lock_image or dataset.pool_size is None:
        return None
    key = cache_key(model, config, dataset, device)
    path = cache_path(run_dir, key)
    features = None
    if ranks.leader and not path.is_file():
        features = compute_features(model, dataset, device)
        save_torch(path, {"features": features.cpu(), "key": key})
    if ranks.world > 1:
        dist.barrier()
    if features is None:
        features = load_torch(path)["features"].to(device)
    return features


class LockedImageForward(nn.Module):
    """TwoTower's forward with each row's image features looked up by its pool index: what the
    locked tower gives those images, without running it. Data-parallel training wraps this
    module, so the text tower's gradients are averaged as usual."""

    def __init__(self, model: TwoTower, features: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        # A plain attribute, not a buffer: DistributedDataParallel would broadcast a buffer
        # every step, and the table is the same on every rank.
        self.features = features

    def forward(self, index: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.model.encode_text(tokens)
