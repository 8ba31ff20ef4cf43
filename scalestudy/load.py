"""Reading a study: YAML text → dotted `--set` overrides → a validated StudySpec.

Every failure is a `SpecError` whose message names the file (and line, for YAML syntax), the dotted
key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from scalestudy.errors import SpecError
from scalestudy.spec import SlurmExecutorSpec, StudySpec, TrialConfig


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse a study document; syntax errors name the line and column."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{source}: YAML syntax error at {where}: {problem}") from None
    if raw is None:
        raise SpecError(f"{source}: the file is empty; a study needs at least `name:`")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def model_at(model: type[BaseModel], dotted: str, context: str) -> type[BaseModel] | None:
    """The model class that holds the leaf of `dotted` inside `model`, checking every segment.

    Returns the leaf's own model class when the leaf is itself a section (e.g. ``loss``), else None.
    Raises a SpecError listing the allowed keys at the first unknown segment.
    """
    current: type[BaseModel] | None = model
    walked: list[str] = []
    for part in dotted.split("."):
        if current is None:
            raise SpecError(f"{context}: {'.'.join(walked)} is a value, it has no key {part!r}")
        if part not in current.model_fields:
            where = f"under {'.'.join(walked)!r}" if walked else "at the top level"
            allowed = ", ".join(current.model_fields)
            raise SpecError(f"{context}: unknown key {part!r} {where} (allowed: {allowed})")
        annotation = current.model_fields[part].annotation
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        walked.append(part)
    return current


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `tree` with the nested key `dotted` set to `value` (missing levels are created).

    Only the mappings on the key's path are copied; the rest is shared with `tree` (a sweep of
    thousands of points sets keys on the same base: a deep copy per key dominated expansion).
    """
    out = dict(tree)
    node = out
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, Mapping) else {}
        node = child
    node[leaf] = value
    return out


def get_dotted(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def apply_override(raw: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply one `--set key=value`; trial keys (``loss.kind``) set the base and replace any sweep axis.

    The value is parsed as YAML, so ``--set train.batch_size=128`` is an int and
    ``--set sweep.grid.train.seed=[0,1,2]`` a list.
    """
    context = f"--set {assignment}"
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(f"{context}: expected KEY=VALUE, e.g. --set train.batch_size=128")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{context}: the value is not valid YAML ({err})") from None
    first = key.split(".", 1)[0]
    if first in TrialConfig.model_fields:
        model_at(TrialConfig, key, context)
        out = set_dotted(raw, f"base.{key}", value)
        sweep = copy.deepcopy(out.get("sweep") or {})
        for kind in ("grid", "zip"):
            axes = sweep.get(kind)
            if isinstance(axes, dict) and key in axes:
                del axes[key]
        return {**out, "sweep": sweep} if sweep else out
    if key.startswith(("sweep.grid.", "sweep.zip.")):
        _, kind, axis = key.split(".", 2)
        model_at(TrialConfig, axis, context)
        sweep = copy.deepcopy(raw.get("sweep") or {})
        sweep.setdefault(kind, {})
        sweep[kind][axis] = value
        return {**raw, "sweep": sweep}
    model_at(StudySpec, key, context)
    return set_dotted(raw, key, value)


def format_validation_error(err: ValidationError, source: str, prefix: str = "") -> str:
    """One line per problem: `source: dotted.key: message (got value)`."""
    lines = []
    for problem in err.errors():
        loc = ".".join(str(p) for p in problem["loc"] if p not in ("function-after",))
        path = ".".join(p for p in (prefix, loc) if p)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = f"unknown key (allowed: {_allowed_keys(path.removeprefix(prefix + '.') if prefix else path)})"
        shown = "" if problem["type"] in ("extra_forbidden", "value_error") else f" (got {problem['input']!r})"
        lines.append(f"{source}: {path or '<top level>'}: {message}{shown}")
    return "\n".join(lines)


def _allowed_keys(path: str) -> str:
    parent, _, _ = path.rpartition(".")
    root: type[BaseModel] = StudySpec
    if parent:
        try:
            found = model_at(root, parent, "")
        except SpecError:
            found = None
        root = found or root
    return ", ".join(root.model_fields)


# Shipped Slurm profiles (package data); $SCALESTUDY_SLURM_PROFILES names more folders (os.pathsep
# separated, searched first); any other profile is given by path.
SLURM_PROFILES = Path(__file__).resolve().parent / "executors" / "slurm_profiles"
PROFILE_DIRS_ENV = "SCALESTUDY_SLURM_PROFILES"


def profile_dirs() -> list[Path]:
    extra = [Path(p).expanduser() for p in os.environ.get(PROFILE_DIRS_ENV, "").split(os.pathsep) if p]
    return extra + [SLURM_PROFILES]


def read_slurm_profile(ref: str) -> dict[str, Any]:
    """The keys of a Slurm profile: a name from `profile_dirs()` or a YAML file's path, checked."""
    is_path = "/" in ref or ref.endswith((".yaml", ".yml"))
    candidates = [Path(ref).expanduser()] if is_path else [d / f"{ref}.yaml" for d in profile_dirs()]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})
        where = candidates[0] if is_path else " or ".join(str(d) for d in profile_dirs())
        raise SpecError(
            f"executor.slurm.profile={ref!r}: not found in {where}; use a profile name "
            f"({', '.join(known) or 'none found'}; ${PROFILE_DIRS_ENV} adds folders) or the path "
            "of a YAML file of executor.slurm keys"
        )
    try:
        keys = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"profile {path} is not valid YAML: {err}") from None
    if not isinstance(keys, dict) or "profile" in keys:
        raise SpecError(f"profile {path} must be a mapping of executor.slurm keys other than profile")
    try:
        SlurmExecutorSpec.model_validate(keys)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise SpecError(f"profile {path}: {problems} (allowed keys: "
                        f"{', '.join(SlurmExecutorSpec.model_fields)})") from None
    return keys


def resolve_profiles(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill executor.slurm's unset keys from its profile, so the resolved study records them
    (and reloading the run directory's study.yaml changes nothing)."""
    executor = raw.get("executor")
    slurm = executor.get("slurm") if isinstance(executor, dict) else None
    if not isinstance(slurm, dict) or slurm.get("profile") is None:
        return raw
    resolved = {**read_slurm_profile(str(slurm["profile"])), **slurm}
    return set_dotted(raw, "executor.slurm", resolved)


def validate_study(raw: dict[str, Any], source: str) -> StudySpec:
    try:
        return StudySpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source)) from None


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> StudySpec:
    """Read, override and validate a study file. Nothing is written."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise SpecError(f"{path}: cannot read the study file ({err.strerror})") from None
    raw = parse_yaml(text, str(path))
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    return validate_study(resolve_profiles(raw), str(path))
