"""StudySpec → [Trial]: grid × zip, include, exclude, derived values and stable trial ids.

Pure and deterministic: the same study always gives the same trials in the same order. Derived
values (steps from the examples-seen budget, the scaled LR, warm-up steps, loss inits) are computed
here and nowhere else, so `plan` shows exactly what `run` trains.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
from typing import Any

from pydantic import ValidationError

from scalestudy.errors import SpecError
from scalestudy.load import format_validation_error, get_dotted, model_at, set_dotted
from scalestudy.spec import ModelSpec, StudySpec, TrialConfig
from scalestudy.store.records import Derived, Trial

# CLIP §2.5: logit scale initialised to 1/0.07 (and clipped at 100). SigLIP §3.2: t' = log 10, b = −10.
DEFAULT_TEMPERATURE = {"softmax": 1 / 0.07, "sigmoid": 10.0}
DEFAULT_SIGMOID_BIAS = -10.0
# Parts of the config that do not change what a trial computes, so they are not in its id: where
# it runs, which experiment trackers mirror its metrics, activation checkpointing (bitwise the
# same gradients, tests/test_models.py) and how many processes build the batches (the same
# batches, tests/test_loader.py).
NOT_IDENTITY = ("resources", "monitor.sinks", "model.grad_checkpointing", "data.workers",
                "data.worker_timeout_s")
_MISSING = object()


@functools.cache
def defaults(config_type: type[TrialConfig] = TrialConfig) -> dict[str, Any]:
    """Every key of a trial config at its default value (nested, as JSON)."""
    return config_type().model_dump(mode="json")


def _non_default(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        default = defaults.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _non_default(value, default)
            if nested:
                out[key] = nested
        elif value != default:
            out[key] = value
    return out


def identity(config: TrialConfig) -> dict[str, Any]:
    """What a trial's id hashes: the config's keys that are not at their default, minus resources.

    Leaving defaults out means a key added to the spec (with a default that keeps the old
    behaviour) changes no existing id. The other side, a default that *changes*, would silently
    give the same id to a different computation; `run` guards against that by comparing each
    stored trial's full config with the new one (scalestudy.reconcile).
    """
    return _non_default(without_identityless(config.model_dump(mode="json")),
                        defaults(type(config)))


def in_identity(dotted: str) -> bool:
    """Whether a dotted config key is part of a trial's identity."""
    return not any(dotted == key or dotted.startswith(key + ".") for key in NOT_IDENTITY)


def without_identityless(values: dict[str, Any]) -> dict[str, Any]:
    """A config dump without the NOT_IDENTITY keys (the dicts on their paths copied)."""
    out = dict(values)
    for key in NOT_IDENTITY:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                break
            node[part] = dict(node[part])
            node = node[part]
        else:
            node.pop(leaf, None)
    return out


def trial_id(config: TrialConfig) -> str:
    """A short stable hash of the identity's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def derive(config: TrialConfig) -> Derived:
    batch = config.train.batch_size
    steps = math.ceil(config.train.examples_seen / batch)
    exponent = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[config.optim.lr_scaling]
    lr = config.optim.lr * (batch / config.optim.lr_reference_batch) ** exponent
    kind = config.loss.kind
    temperature = config.loss.temperature_init or DEFAULT_TEMPERATURE[kind]
    bias: float | None = None
    if kind == "sigmoid" and config.loss.use_bias:
        rule = config.loss.bias_init
        if rule is None:
            bias = DEFAULT_SIGMOID_BIAS
        elif rule == "neg_log_batch":
            bias = -math.log(batch)
        else:
            bias = float(rule)
    return Derived(
        params=_params(config.model.model_dump_json(), config.data.image_size,
                       kind == "sigmoid" and config.loss.use_bias),
        steps=steps,
        examples_seen=steps * batch,
        lr=lr,
        warmup_steps=warmup_steps(config, steps),
        temperature_init=min(temperature, config.loss.max_temperature),
        bias_init=bias,
    )


def warmup_steps(config: TrialConfig, steps: int) -> int:
    """optim.warmup_steps clipped to the trial's steps when set, else optim.warmup_fraction of them."""
    if config.optim.warmup_steps is not None:
        return min(config.optim.warmup_steps, steps)
    return round(config.optim.warmup_fraction * steps)


@functools.lru_cache(maxsize=256)
def _params(model: str, image_size: int, has_bias: bool) -> int:
    """The parameter count of a model (by its spec's JSON), computed once per distinct model."""
    from scalestudy.train.models import count_params  # torch: only plan and run need it

    config = TrialConfig.model_validate({"model": json.loads(model), "data": {"image_size": image_size},
                                         "loss": {"kind": "sigmoid" if has_bias else "softmax"}})
    return count_params(config)


def _validate_point(base: dict[str, Any], point: dict[str, Any], where: str) -> TrialConfig:
    tree = base
    if "model.preset" in point:
        # The base holds every model key its own preset (or the defaults) filled in; keep only
        # what the study set on top, so the point's preset fills the rest.
        tree = set_dotted(tree, "model", ModelSpec.model_validate(base["model"]).overrides())
    for key, value in point.items():
        tree = set_dotted(tree, key, value)
    try:
        return TrialConfig.model_validate(tree)
    except ValidationError as err:
        shown = ", ".join(f"{k}={v!r}" for k, v in point.items())
        raise SpecError(
            format_validation_error(err, where, prefix="base") + f"\n  (in the sweep point {shown})"
        ) from None


def _points(study: StudySpec) -> list[dict[str, Any]]:
    sweep = study.sweep
    grid_keys = list(sweep.grid)
    zip_rows = [dict(zip(sweep.zip, row)) for row in zip(*sweep.zip.values())] or [{}]
    points = [
        {**dict(zip(grid_keys, combo)), **row}
        for combo in itertools.product(*sweep.grid.values())
        for row in zip_rows
    ]
    return points + [dict(extra) for extra in sweep.include]


def axes(study: StudySpec) -> list[str]:
    """The swept dotted keys, in declaration order (grid, zip, then keys only in include)."""
    keys = list(study.sweep.grid) + list(study.sweep.zip)
    for extra in study.sweep.include:
        keys += [k for k in extra if k not in keys]
    return keys


def expand(study: StudySpec, source: str = "study") -> list[Trial]:
    """All trials of the study, deduplicated by id, in sweep order."""
    for kind, entries in (("include", study.sweep.include), ("exclude", study.sweep.exclude)):
        for i, entry in enumerate(entries):
            for key in entry:
                model_at(TrialConfig, key, f"{source}: sweep.{kind}[{i}]")
    for kind, keyed in (("grid", study.sweep.grid), ("zip", study.sweep.zip)):
        for key in keyed:
            model_at(TrialConfig, key, f"{source}: sweep.{kind}")

    base = study.base.model_dump(mode="json")
    # Each value on its own first, so an error names the one bad value rather than a whole point.
    for kind, keyed in (("grid", study.sweep.grid), ("zip", study.sweep.zip)):
        for key, values in keyed.items():
            for i, value in enumerate(values):
                _validate_point(base, {key: value}, f"{source}: sweep.{kind}.{key}[{i}]")

    keys = axes(study)
    excluded = [
        _validate_point(base, entry, f"{source}: sweep.exclude").model_dump(mode="json")
        for entry in study.sweep.exclude
    ]
    trials: dict[str, Trial] = {}
    for point in _points(study):
        config = _validate_point(base, point, f"{source}: sweep")
        dumped = config.model_dump(mode="json")
        if any(
            all(get_dotted(dumped, k) == get_dotted(ex, k) for k in entry)
            for entry, ex in zip(study.sweep.exclude, excluded)
        ):
            continue
        tid = trial_id(config)
        if tid not in trials:
            swept = {k: get_dotted(dumped, k) for k in keys}
            trials[tid] = Trial(trial_id=tid, config=config, derived=derive(config), swept=swept)
    if not trials:
        raise SpecError(f"{source}: the sweep's exclude entries remove every trial; nothing would run")
    return list(trials.values())

