"""The trial process's memory allocator (`resources.allocator`): tcmalloc or jemalloc, preloaded
with LD_PRELOAD in place of glibc's malloc, or the system's own.

Why: a small model's step is hundreds of tiny tensor ops, each allocating its output and freeing
an input, and glibc's malloc serves that churn slowly. PyTorch's own CPU launcher
(`python -m torch.backends.xeon.run_cpu`) preloads these allocators for the same reason. Measured
on the 2-core machine (benchmarks/README.md, "Step time"): the canonical tiny model's median step
at B = 16 is 4.62–4.94 ms under tcmalloc against 5.14–5.30 ms under glibc's malloc; jemalloc
came out between them. The allocator decides where bytes live, never what is computed: a trial
under tcmalloc records the same values bit for bit as under glibc's malloc (tested), so the
choice is not part of a trial's identity.

The library must be preloaded before the process starts (a running process cannot change its
malloc), so the executors set it in the trial process's environment (`preload`); under Slurm the
job script exports it (`setup_line`). The trial records what it actually runs on (`in_use`) in
its state.json.
"""

from __future__ import annotations

import os
import platform
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

Allocator = Literal["auto", "tcmalloc", "jemalloc", "system"]

# The shared objects each allocator ships as: gperftools' minimal tcmalloc (Debian/Ubuntu
# libtcmalloc-minimal4, conda gperftools) or its full one, and jemalloc (libjemalloc2).
LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
# `auto` takes the first one found: tcmalloc measured faster than jemalloc for the tiny model.
AUTO_ORDER = ("tcmalloc", "jemalloc")
INSTALL_HINT = {
    "tcmalloc": "apt install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install gperftools-libs, "
                "or conda install gperftools",
    "jemalloc": "apt install libjemalloc2 (Debian/Ubuntu), dnf install jemalloc, or conda install "
                "jemalloc",
}
# tcmalloc prints a line for every allocation above 1 GiB by default; a B = 16,384 step makes
# several, and they are not errors.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def search_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where the libraries are looked for, in order: LD_LIBRARY_PATH, this Python's prefix (a
    conda environment's lib/), then the system's library directories."""
    triplet = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    dirs = [Path(d) for d in environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib", Path("/usr/local/lib"),
             Path("/usr/lib") / triplet, Path("/lib") / triplet, Path("/usr/lib64"), Path("/usr/lib")]
    return list(dict.fromkeys(dirs))


def find(name: str, environ: Mapping[str, str]) -> Path | None:
    """The path of allocator `name`'s library on this machine, or None."""
    for directory in search_dirs(environ):
        for library in LIBRARIES[name]:
            if (directory / library).is_file():
                return directory / library
    return None


def resolve(choice: Allocator, environ: Mapping[str, str]) -> tuple[str, Path | None]:
    """(allocator, library) for `choice`: `auto` is the first of AUTO_ORDER found, else the
    system's; a named allocator that is not installed is a ValueError naming the key and how to
    install it."""
    if choice == "system":
        return "system", None
    if not sys.platform.startswith("linux"):
        if choice == "auto":
            return "system", None
        raise ValueError(f"resources.allocator: {choice} is preloaded with LD_PRELOAD, which only "
                         f"Linux has; use resources.allocator=auto or system on {sys.platform}")
    for name in AUTO_ORDER if choice == "auto" else (choice,):
        library = find(name, environ)
        if library is not None:
            return name, library
    if choice == "auto":
        return "system", None
    raise ValueError(
        f"resources.allocator: {choice}: none of {', '.join(LIBRARIES[choice])} is in "
        f"{', '.join(str(d) for d in search_dirs(environ))}. Install it ({INSTALL_HINT[choice]}), "
        "add its directory to LD_LIBRARY_PATH, or use resources.allocator=auto (whatever is "
        "installed, else the system's malloc)"
    )


def _without_allocators(preload: str) -> list[str]:
    known = {library for libraries in LIBRARIES.values() for library in libraries}
    return [entry for entry in preload.replace(" ", ":").split(":")
            if entry and Path(entry).name not in known]


def preload(env: dict[str, str], choice: Allocator) -> None:
    """Set `env` (a trial process's environment) to run on `choice`.

    Any allocator LD_PRELOAD already named is replaced, so `system` means glibc's malloc even
    under a parent that preloads one; other preloaded libraries stay, after the allocator.
    """
    _, library = resolve(choice, env)
    entries = _without_allocators(env.get("LD_PRELOAD", ""))
    if library is not None:
        entries.insert(0, str(library))
        env.update(QUIET)
    if entries:
        env["LD_PRELOAD"] = ":".join(entries)
    else:
        env.pop("LD_PRELOAD", None)


def setup_line(choice: Allocator, environ: Mapping[str, str]) -> str | None:
    """A job-script line that preloads `choice` (resolved on the submitting machine) for the Slurm
    tasks, if the same file exists on the node; None when the choice is the system's malloc."""
    _, library = resolve(choice, environ)
    if library is None:
        return None
    quiet = " ".join(f"{key}={value}" for key, value in QUIET.items())
    return (f'[ -f {library} ] && export LD_PRELOAD="{library}${{LD_PRELOAD:+:$LD_PRELOAD}}" '
            f"{quiet}")


def in_use() -> str:
    """The allocator this process runs on: the allocator library mapped into it (a preloaded one
    replaces malloc for the whole process), else `system` (read from /proc/self/maps; `system`
    where there is no /proc)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    # The mapped file is the symlink's target (libtcmalloc_minimal.so.4.5.10): match by stem.
    stems = {library.split(".so")[0] + ".so": name
             for name, libraries in LIBRARIES.items() for library in libraries}
    for line in maps.splitlines():
        library = os.path.basename(line.rsplit(" ", 1)[-1])
        for stem, name in stems.items():
            if library.startswith(stem):
                return name
    return "system"
