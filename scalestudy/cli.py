"""The `scalestudy` command. `main(argv)` returns the exit status, so tests call it directly.

Exit status: 0 success; 2 invalid study or usage (nothing written, no traceback); 1 when some
trials of the study failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


from scalestudy.errors import ScalestudyError, UsageError
from scalestudy.expand import axes, expand
from scalestudy.load import load_study
from scalestudy.preflight import preflight
from scalestudy.spec import StudySpec
from scalestudy.store import RESULTS, Manifest, Rows, RunStore, Status, Trial


def _load(args: argparse.Namespace) -> tuple[StudySpec, list[Trial]]:
    overrides = list(args.set or [])
    if getattr(args, "executor", None):
        overrides.append(f"executor.kind={args.executor}")
    if getattr(args, "address", None):
        # JSON-quoted: YAML 1.1 reads some HOST:PORT-like text (`10:30`) as a base-60 number.
        overrides.append(f"executor.ray.address={json.dumps(args.address)}")
    study = load_study(args.study, overrides)
    if getattr(args, "address", None) and study.executor.kind != "ray":
        raise UsageError(f"--address {args.address} joins a Ray cluster, but executor.kind is "
                         f"{study.executor.kind}; add --executor ray")
    trials = expand(study, str(args.study))
    preflight(trials, str(args.study), axes(study))
    if study.executor.kind == "slurm":  # what Slurm cannot run is refused before anything is written
        from scalestudy.executors import get_executor

        get_executor("slurm")
        from scalestudy.executors.slurm import check_resources

        check_resources(trials, study.executor.slurm)
    return study, trials


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def plan_rows(trials: list[Trial]) -> list[dict[str, Any]]:
    return [
        {
            "trial_id": t.trial_id,
            **t.swept,
            **{f"derived.{k}": v for k, v in t.derived.model_dump().items()},
            "resources.cpus": t.config.resources.cpus,
            "resources.gpus": t.config.resources.gpus,
        }
        for t in trials
    ]


def cmd_validate(args: argparse.Namespace) -> int:
    study, trials = _load(args)
    print(f"{args.study}: valid study {study.name!r} with {len(trials)} trials")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    study, trials = _load(args)
    rows = plan_rows(trials)
    slurm = None
    if study.executor.kind == "slurm":
        from scalestudy.executors import get_executor

        get_executor("slurm")  # a missing [slurm] extra is an exit-2 message, not a traceback
        from scalestudy.executors import slurm as slurm_executor

        slurm = slurm_executor.describe(trials, study)
    if args.json:
        print(json.dumps({"study": study.name, "trials": rows,
                          **({"slurm": slurm} if slurm else {})}, indent=2))
    else:
        print(f"study {study.name}: {len(trials)} trials (swept: {', '.join(axes(study)) or 'nothing'})")
        print(format_table(rows, list(rows[0])))
        if slurm:
            print(slurm_executor.format_description(slurm))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from scalestudy.executors import get_executor
    from scalestudy.executors.base import BatchExecutor
    from scalestudy.reconcile import adopt_earlier_ids, check_unchanged

    study, trials = _load(args)
    executor = get_executor(study.executor.kind)
    store = RunStore(Path(args.out) / study.name)
    for old, new in adopt_earlier_ids(store, trials):
        print(f"trial {old} (stored under an earlier id scheme) is now {new}")
    retrained = check_unchanged(store, trials, args.retrain_changed,
                                f"scalestudy run {' '.join(_argv_of(args))}")
    for tid in retrained:
        print(f"trial {tid} changed: its earlier result moved to {store.superseded_dir}/, it trains again")
    store.write_study(Manifest(name=study.name, description=study.description, axes=axes(study),
                               trial_ids=[t.trial_id for t in trials],
                               study=study.model_dump(mode="json")))
    for trial in trials:
        store.add_trial(trial)
    if isinstance(executor, BatchExecutor):  # jobs that died unseen count as failed or preempted
        executor.job_states(store, [t.trial_id for t in trials])
    states = {t.trial_id: store.trial(t.trial_id).state().status for t in trials}
    skip = set(RESULTS) | ({Status.FAILED} if not args.retry_failed else set())
    todo = [t for t in trials if states[t.trial_id] not in skip]
    finished = sum(s.is_result for s in states.values())
    failed_before = sum(s == Status.FAILED for s in states.values())
    print(f"{store.root}: {len(trials)} trials, {finished} already finished, {len(todo)} to run"
          + (f", {failed_before} failed (skipped; --retry-failed runs them again)"
             if failed_before and not args.retry_failed else ""))
    if todo:
        executor.run(store, todo, study)
    if args.wait and isinstance(executor, BatchExecutor):
        executor.wait(store, [t.trial_id for t in trials])
    frame = Rows(store).write()
    failed = frame.filter(frame["in_study"] & (frame["status"] == Status.FAILED))
    for row in failed.iter_rows(named=True):
        print(f"trial {row['trial_id']} failed: {(row['error'] or '').strip().splitlines()[-1:]}",
              file=sys.stderr)
    print(f"results: {store.results_path}")
    return 1 if failed.height else 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The `run` command line as given (for messages that say what to run next)."""
    words = [str(args.study)] + [f"--set {a}" for a in args.set or []]
    if args.executor:
        words.append(f"--executor {args.executor}")
    if args.out != "runs":
        words.append(f"--out {args.out}")
    return words


STATUS_COLUMNS = ["trial_id", "status", "step", "steps", "final_loss", "zeroshot_top1",
                  "spike_count", "max_spike_ratio"]


def cmd_status(args: argparse.Namespace) -> int:
    store = RunStore.open(args.run_dir)
    jobs = job_columns(store)  # first: it records ends that only the scheduler saw
    manifest = store.manifest()
    frame = Rows(store).frame()
    rows = [{**row, **jobs.get(row["trial_id"], {})} for row in frame.to_dicts()]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    job_states = sorted({k for j in jobs.values() for k in j if k.endswith("_state")})
    columns = STATUS_COLUMNS[:2] + job_states + manifest.axes + STATUS_COLUMNS[2:]
    print(format_table(rows, columns))
    counts = frame.group_by("status").len().sort("status").iter_rows()
    print("  ".join(f"{status}: {n}" for status, n in counts))
    for row in rows:
        if row["status"] in (Status.FAILED, Status.PREEMPTED) and (row.get("error") or "").strip():
            log = store.trial(row["trial_id"]).state().log
            print(f"\n{row['trial_id']} {row['status']}: {row['error'].strip().splitlines()[-1]}"
                  + (f"\n  log: {log}" if log else ""))
    return 0


def job_columns(store: RunStore) -> dict[str, dict[str, Any]]:
    """Per trial run by a batch scheduler: `<backend>_state` (lower case), job_id and log."""
    from scalestudy.executors import batch_jobs

    columns: dict[str, dict[str, Any]] = {}
    for executor, trial_ids in batch_jobs(store):
        for tid, job_state in executor.job_states(store, trial_ids).items():
            state = store.trial(tid).state()
            columns[tid] = {f"{executor.name}_state": job_state.lower(),
                            "job_id": state.job_id, "log": state.log}
    return columns


def cmd_cancel(args: argparse.Namespace) -> int:
    from scalestudy.executors import batch_jobs

    store = RunStore.open(args.run_dir)
    cancelled = [tid for executor, trial_ids in batch_jobs(store)
                 for tid in executor.cancel(store, trial_ids)]
    Rows(store).write()
    if not cancelled:
        print(f"{store.root}: no queued or running jobs to cancel")
        return 0
    print(f"cancelled {len(cancelled)} trials: {', '.join(cancelled)}\n"
          f"they are failed (cancelled); `scalestudy run STUDY --retry-failed` resumes them from "
          "their checkpoints")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from scalestudy.analysis.report import write_report

    store = RunStore.open(args.run_dir)
    index = write_report(store, include_diverged=not args.exclude_diverged)
    print(f"report: {index}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from scalestudy.dashboard import serve

    RunStore.open(args.run_dir)
    serve(args.run_dir, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scalestudy",
        description="Scaling studies of contrastive language–image pretraining (CLIP vs SigLIP).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_study(p: argparse.ArgumentParser) -> None:
        p.add_argument("study", help="the study YAML file")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a dotted key, e.g. --set train.batch_size=128 (repeatable)")

    p = sub.add_parser("validate", help="check a study file; exit 2 with the reason if invalid")
    with_study(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show the expanded trials and their derived values; runs nothing")
    with_study(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--executor", help="also show what this executor would submit (slurm: job "
                   "arrays, sbatch options, GPU-hours)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run the study's trials (skips finished ones, resumes interrupted)")
    with_study(p)
    p.add_argument("--executor", help="where trials run (default: the study's executor.kind)")
    p.add_argument("--address", help="with --executor ray: join the Ray cluster at HOST:PORT (or "
                   "auto) instead of starting a private one (sets executor.ray.address)")
    p.add_argument("--out", default="runs", help="the run directory is OUT/<study name> (default runs)")
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again too")
    p.add_argument("--retrain-changed", action="store_true",
                   help="train again the trials whose stored config differs from what the study "
                        "resolves to now (their earlier results move to RUN_DIR/superseded/); "
                        "without it, `run` stops and names the differences")
    p.add_argument("--wait", action="store_true", help="with a batch executor (slurm): block "
                   "until the submitted trials end, with live progress")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="one row per trial: state, step, key metrics, spikes")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="every column, as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel the queued and running batch jobs (slurm) of a run")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("report", help="results table and plots under RUN_DIR/report/")
    p.add_argument("run_dir")
    p.add_argument("--exclude-diverged", action="store_true",
                   help="leave diverged seeds out of the accuracy/retrieval curves (they are "
                        "always counted, and always in the instability figure)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="a live, read-only web page over RUN_DIR (overview, "
                       "gradient-norm spikes, runs, scaling curves)")
    p.add_argument("run_dir")
    p.add_argument("--port", type=int, default=8050, help="port to listen on (default 8050; 0: any free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this "
                   "machine only; the page has no login)")
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        return int(args.func(args))
    except ScalestudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: trials stopped at a checkpoint; run the same command to resume",
              file=sys.stderr)
        return 130


def main_entry() -> None:
    sys.exit(main())



if __name__ == "__main__":
    main_entry()
