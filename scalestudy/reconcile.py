"""Before `run` trains anything: the study's trials against what the run directory already holds.

A trial id hashes only the keys that are not at their default (scalestudy.expand.identity), so a
key added to the spec keeps every id. The price is that a *changed* default would give a stored
trial's id to a different computation. So every trial already in the directory is compared with
its new resolution, key by key (its config, resources aside, and its derived values); where they
differ `run` stops before writing anything, naming the trial, the key and both values, and says how
to go on: pin the old value with `--set`, or `--retrain-changed` (the old trial is moved to
RUN_DIR/superseded/, never deleted).

Trial directories written under the earlier id scheme (a hash of the whole config) are adopted:
renamed to their id under this scheme, then compared like any other stored trial, so an upgrade
does not re-train finished work.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from typing import Any

from scalestudy.errors import ConfigChanged
from scalestudy.expand import defaults, in_identity, trial_id
from scalestudy.spec import TrialConfig
from scalestudy.store import RunStore, Status, Trial, flatten

ABSENT = "(absent)"
# At most this many changed trials are listed in the message (the rest are counted).
SHOWN = 10


@dataclass(frozen=True)
class Change:
    trial_id: str
    key: str
    stored: Any
    now: Any

    def describe(self) -> str:
        return f"trial {self.trial_id}: {self.key} was {self.stored!r}, the study now gives {self.now!r}"


def differences(stored: dict[str, Any], trial: Trial) -> list[Change]:
    """Keys whose stored value differs from the trial's new resolution (config minus resources,
    and derived values). A key the stored config lacks is new in the spec: fine at its default."""
    at_default = flatten(defaults(type(trial.config)))
    changes: list[Change] = []
    for section, old, new in (
        ("", stored.get("config") or {}, trial.config.model_dump(mode="json")),
        ("derived.", stored.get("derived") or {}, trial.derived.model_dump(mode="json")),
    ):
        old_flat = {k: v for k, v in flatten(old, section).items() if in_identity(k)}
        new_flat = {k: v for k, v in flatten(new, section).items() if in_identity(k)}
        for key in sorted(old_flat.keys() | new_flat.keys()):
            before, after = old_flat.get(key, ABSENT), new_flat.get(key, ABSENT)
            if before == after:
                continue
            if before == ABSENT and (section or after == at_default.get(key, ABSENT)):
                continue  # added to the spec (or to the derived values) since the trial was stored
            changes.append(Change(trial.trial_id, key, before, after))
    return changes


def adopt_earlier_ids(store: RunStore, trials: list[Trial]) -> list[tuple[str, str]]:
    """Rename trial directories stored under another id scheme to their id now; returns (old, new).

    Only trials no process is running (a running trial would lose its directory mid-write).
    """
    wanted = {t.trial_id for t in trials}
    existing = set(store.trial_ids())
    adopted = []
    for old in sorted(existing - wanted):
        ts = store.trial(old)
        try:
            stored = ts.config()
            new = trial_id(TrialConfig.model_validate(stored["config"]))
            running = ts.state().status == Status.RUNNING
        except Exception:  # noqa: BLE001 - a directory this version cannot read is left alone
            continue
        if new == old or new not in wanted or new in existing or running:
            continue
        shutil.move(str(ts.path), store.trial(new).path)
        store.add_trial(Trial.model_validate({**stored, "trial_id": new}))
        existing.add(new)
        adopted.append((old, new))
    return adopted


def check_unchanged(store: RunStore, trials: list[Trial], retrain_changed: bool,
                    command: str) -> list[str]:
    """Raise ConfigChanged when a stored trial differs from its new resolution (listing every
    difference and the ways on); with `retrain_changed`, set such trials aside instead and return
    their ids."""
    existing = set(store.trial_ids())
    changed: dict[str, list[Change]] = {}
    for trial in trials:
        if trial.trial_id in existing:
            found = differences(store.trial(trial.trial_id).config(), trial)
            if found:
                changed[trial.trial_id] = found
    if not changed:
        return []
    if retrain_changed:
        for tid in changed:
            store.set_aside(tid)
        return list(changed)
    lines = [change.describe() for changes in list(changed.values())[:SHOWN] for change in changes]
    if len(changed) > SHOWN:
        lines.append(f"… and {len(changed) - SHOWN} more trials")
    pins = sorted({f"--set {c.key}={_yaml(c.stored)}" for cs in changed.values() for c in cs
                   if not c.key.startswith("derived.") and c.stored != ABSENT})
    ways = [f"  to keep their results, pin the old values: {command} {' '.join(pins)}"] if pins else []
    ways.append(f"  to train them again with the new values: {command} --retrain-changed (the "
                f"old trials move to {store.superseded_dir}/)")
    raise ConfigChanged(
        f"{len(changed)} trials in {store.root} were computed with settings that differ from "
        "what the study resolves to now (a default or a derivation changed since they ran); "
        "nothing was run:\n  " + "\n  ".join(lines) + "\n" + "\n".join(ways)
    )


def _yaml(value: Any) -> str:
    """A value as `--set` reads it (YAML): strings bare, the rest as JSON (a subset of YAML)."""
    return value if isinstance(value, str) else json.dumps(value)
