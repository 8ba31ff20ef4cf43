"""Ray executor benchmark: per-trial scheduling overhead against the local executor, and the
memory of the Ray processes.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/bench_ray.py [--trials 50] [--rounds 5]

`--trials` tiny trials per executor (1 CPU each, `--steps` training steps, one evaluation), split
into `--rounds` studies. Each study runs through the real CLI on both executors, into fresh run
directories: `--executor local` and `--executor ray` (a private Ray, `address=local`), the first
of the pair alternating between rounds so that a machine whose load drifts favours neither. Both
executors run as many trials at once as the machine has cores.

- wall: the whole `scalestudy run` command, Ray's start included.
- span: from the first trial's start to the last trial's end (state.json's started_at and
  finished_at): the time once the executor is up, which is what scheduling overhead is about.
- overhead per trial: (Ray span − local span) / trials × cores, i.e. the extra time each trial
  slot spends per trial on Ray. Target: < 0.5 s. gap overhead: the same, after subtracting each
  run's time inside trials (so slower training under a passing load spike does not count).
- Ray memory: the processes below the driver that are not trials (GCS, raylet, agents, idle and
  busy workers), sampled every 0.5 s; RSS double-counts shared pages, PSS does not.

Results are recorded in benchmarks/README.md (## Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from scalestudy.store import RunStore

SAMPLE_S = 0.5


def study(trials: int, steps: int) -> dict:
    return {
        "name": "bench",
        "base": {
            "data": {"image_size": 16, "eval_images": 64},
            "model": {"patch_size": 8, "width": 16, "depth": 1, "heads": 2, "embed_dim": 16,
                      "context_length": 12, "vocab_size": 512},
            "train": {"examples_seen": 32 * steps, "batch_size": 32, "eval_every": 0,
                      "checkpoint_every": 0},
            "resources": {"cpus": 1},
        },
        "sweep": {"grid": {"train.seed": list(range(trials))}},
    }


def children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def ray_processes(driver: int) -> list[int]:
    """Processes below the driver, minus trial processes and theirs (they are the trials' cost,
    the same under any executor)."""
    children, found, todo = children_of(), [], [driver]
    while todo:
        for pid in children.get(todo.pop(), []):
            try:
                if b"scalestudy.trial" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    continue
            except OSError:
                continue
            found.append(pid)
            todo.append(pid)
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, from /proc/PID/smaps_rollup; zeros once it is gone."""
    values = {"Rss:": 0, "Pss:": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, *rest = line.split()
            if key in values:
                values[key] = int(rest[0])
    except OSError:
        pass
    return values["Rss:"], values["Pss:"]


def run(args: list[str], sample_ray: bool) -> dict:
    peak = {"rss_mib": 0.0, "pss_mib": 0.0, "processes": 0}
    started = time.perf_counter()
    driver = subprocess.Popen([sys.executable, "-m", "scalestudy.cli", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            pids = ray_processes(driver.pid)
            rss, pss = (sum(m) / 1024 for m in zip(*map(memory_kib, pids))) if pids else (0, 0)
            if pss > peak["pss_mib"]:
                peak.update(rss_mib=rss, pss_mib=pss, processes=len(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_ray:
        sampler.start()
    output, _ = driver.communicate(timeout=3600)
    done.set()
    wall = time.perf_counter() - started
    if driver.returncode != 0:
        raise SystemExit(f"scalestudy {' '.join(args)} failed:\n{output}")
    return {"wall_s": wall, **({"ray_memory_peak": peak} if sample_ray else {})}


def timing(run_dir: Path) -> dict[str, float]:
    """span: first trial start → last trial end; busy: the trials' own time (start → end), summed.

    started_at is written once the trial process has imported torch, so span − busy / cores is
    what each slot spends between trials: process start, imports, and the executor's scheduling.
    """
    store = RunStore(run_dir)
    states = [store.trial(t).state() for t in store.trial_ids()]
    assert all(s["status"] == "done" for s in states), "every benchmark trial must finish"
    return {"span_s": max(s["finished_at"] for s in states) - min(s["started_at"] for s in states),
            "busy_s": sum(s["finished_at"] - s["started_at"] for s in states)}


def one_round(root: Path, index: int, trials: int, steps: int, cores: int) -> dict:
    """The same study on both executors; which goes first alternates, so load drift cancels."""
    path = root / f"bench{index}.yaml"
    spec = study(trials, steps)
    spec["name"] = f"bench{index}"
    spec["sweep"]["grid"]["train.seed"] = [index * trials + i for i in range(trials)]
    path.write_text(yaml.safe_dump(spec))
    commands = {"local": ["run", str(path), "--out", str(root / "local")],
                "ray": ["run", str(path), "--executor", "ray", "--out", str(root / "ray")]}
    result = {}
    for name in (("local", "ray") if index % 2 == 0 else ("ray", "local")):
        result[name] = {**run(commands[name], sample_ray=name == "ray"),
                        **timing(root / name / spec["name"]), "load_average_1m": os.getloadavg()[0]}
    local, on_ray = result["local"], result["ray"]
    result["overhead_per_trial_s"] = (on_ray["span_s"] - local["span_s"]) / trials * cores
    result["gap_overhead_per_trial_s"] = (
        (on_ray["span_s"] - on_ray["busy_s"] / cores) - (local["span_s"] - local["busy_s"] / cores)
    ) / trials * cores
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50, help="trials per executor, in all")
    parser.add_argument("--rounds", type=int, default=5,
                        help="local/Ray pairs the trials split into")
    parser.add_argument("--steps", type=int, default=2, help="training steps per trial")
    parser.add_argument("--dir", type=Path,
                        help="where the run directories go (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    root.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    per_round = args.trials // args.rounds
    rounds = [one_round(root, i, per_round, args.steps, cores) for i in range(args.rounds)]
    print(json.dumps({
        "trials": per_round * args.rounds, "rounds": args.rounds, "steps": args.steps,
        "cores": cores,
        "overhead_per_trial_s": {
            "median": statistics.median(r["overhead_per_trial_s"] for r in rounds),
            "pooled": sum(r["ray"]["span_s"] - r["local"]["span_s"] for r in rounds)
            / (per_round * args.rounds) * cores},
        "gap_overhead_per_trial_s_median": statistics.median(
            r["gap_overhead_per_trial_s"] for r in rounds),
        "ray_memory_peak": max((r["ray"]["ray_memory_peak"] for r in rounds),
                               key=lambda m: m["pss_mib"]),
        "rounds_detail": rounds,
    }, indent=2))


if __name__ == "__main__":
    main()
